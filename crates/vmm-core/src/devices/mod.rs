//! Platform devices: the COM1 serial console and the debug/exit port.

pub mod debug;
pub mod serial;
