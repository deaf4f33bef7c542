//! Shared memory without interrupts: an ivshmem-plain PCI device.
//!
//! - [`device`]: [`IvshmemPlain`], a [`vmm_core::pci::PciDevice`] with QEMU's
//!   `ivshmem-plain` layout: BAR0 = 256 bytes of registers, BAR2 = the region,
//!   64-bit prefetchable, mapped straight into the guest (no exits).
//! - The region and the ring transport come from the `shared-region` crate
//!   and are re-exported here ([`region`], [`transport`], [`SharedRegion`],
//!   [`Transport`], ...), so a VMM that only wants this device needs this
//!   crate and the PCI model it plugs into: `vmm-core`'s
//!   [`PciDevice`](vmm_core::pci::PciDevice) (config space, BARs, a bus
//!   that maps BAR2 into KVM). A VMM with its own PCI bus implements the
//!   few calls that trait makes, or maps [`SharedRegion`] itself.
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
