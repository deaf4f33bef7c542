//! Shared memory without interrupts: an ivshmem-plain PCI device.
//!
//! - [`device`]: [`IvshmemPlain`], a [`vmm_core::pci::PciDevice`] with QEMU's
//!   `ivshmem-plain` layout: BAR0 = 256 bytes of registers, BAR2 = the region,
//!   64-bit prefetchable, mapped straight into the guest (no exits).
//! - The region and the ring transport come from the `shared-region` crate
//!   and are re-exported here ([`region`], [`transport`], [`SharedRegion`],
//!   [`Transport`], ...), so a VMM that only wants this device needs only
//!   this crate.
//!
//! The device knows nothing of the ring; any program that maps the same
//! backing (another VMM, QEMU's `ivshmem-plain` with the same `/dev/shm`
//! object, a host tool) shares the bytes.
#![deny(missing_docs)]

pub mod device;

pub use device::IvshmemPlain;
pub use shared_region::{
    is_shm_name, region, transport, Backing, Error, Membership, Result, SharedRegion, Transport,
};
