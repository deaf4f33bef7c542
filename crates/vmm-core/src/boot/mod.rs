//! Loading guests: the bare-metal probe and Linux.

pub mod linux;
pub mod probe;
