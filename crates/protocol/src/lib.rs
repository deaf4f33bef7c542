//! Data layouts shared between the intervm host side and its guests.
//!
//! This crate is `no_std` and, with its default features, has no dependencies,
//! so that the bare-metal probe guest, the Linux guest tools and the VMM all
//! compile the very same definitions. Nothing here touches hardware: it only
//! describes memory layouts and numbers both sides must agree on. The `std`
//! feature (which pulls in `libc`) adds [`heartbeat`], the member presence
//! thread the VMM and the Linux guest tools share; the `serde` feature derives
//! `Deserialize` for the settings a host reads from its configuration.
#![no_std]
#![deny(missing_docs)]

#[cfg(feature = "std")]
pub mod heartbeat;
pub mod ivshmem;
pub mod notify;
pub mod portio;
pub mod probe;
pub mod ring;
pub mod units;
