//! Data layouts shared between the intervm host side and its guests.
//!
//! This crate is `no_std` and has no dependencies so that the bare-metal probe
//! guest, the Linux guest tools and the VMM all compile the very same
//! definitions. Nothing here touches hardware: it only describes memory
//! layouts and numbers both sides must agree on.
#![no_std]
#![deny(missing_docs)]

pub mod portio;
pub mod probe;
pub mod ring;
pub mod units;
