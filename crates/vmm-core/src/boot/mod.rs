//! Loading guests: the bare-metal probe (Linux boot comes with its own module).

pub mod probe;
