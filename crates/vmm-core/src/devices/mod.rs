//! Platform devices: the COM1 serial console (with console input from the
//! host) and the debug/exit port.

pub mod console;
pub mod debug;
pub mod serial;
