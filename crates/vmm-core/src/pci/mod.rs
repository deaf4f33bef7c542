//! PCI: configuration space, MSI-X, and a bus with a type-1 host bridge.
//!
//! A device implements [`PciDevice`]: it owns a [`PciConfiguration`] and
//! answers BAR accesses. The [`PciBus`] assigns BAR addresses from the
//! layout's windows (as firmware would), decodes guest BAR moves, and maps
//! memory BARs straight into the guest through a [`PciPlatform`]. Nothing in
//! this module needs KVM except the [`KvmPciPlatform`] implementation, so
//! device models can be tested with fakes and embedded in other VMMs.

pub mod bus;
pub mod config;
pub mod msix;

pub use bus::{KvmPciPlatform, PciBus, PciConfigIo, PciPlatform, PciWindowRouter, SlotInfo};
pub use config::{BarKind, BarSpec, PciConfiguration, PciIds};
pub use msix::Msix;

use crate::irq::IntxLine;

/// Host memory that backs a BAR directly (mapped into the guest, no exits).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarMemory {
    /// Host virtual address of the first byte.
    pub host_addr: u64,
    /// Length in bytes (the BAR size).
    pub len: u64,
}

/// A PCI function on the [`PciBus`].
///
/// Accesses arrive as register-level calls with an offset inside the BAR;
/// implementations must accept any offset and width from the guest: bad
/// reads fill `0xff`, bad writes are ignored.
pub trait PciDevice: Send {
    /// The configuration space.
    fn config(&self) -> &PciConfiguration;
    /// The configuration space, mutably (the bus writes guest values through it).
    fn config_mut(&mut self) -> &mut PciConfiguration;
    /// Called after the guest wrote dword register `reg` of the config space.
    fn config_written(&mut self, _reg: usize) {}
    /// A guest read of a trapped BAR.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A guest write to a trapped BAR.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Host memory to map directly for BAR `bar`, or `None` to trap it.
    ///
    /// The memory must stay mapped for as long as the device is on a bus.
    fn bar_memory(&self, _bar: usize) -> Option<BarMemory> {
        None
    }
    /// BAR `bar` is now decoded at `addr` (`None`: no longer decoded).
    /// Devices that registered ioeventfds on a BAR move them here.
    fn bar_moved(&mut self, _bar: usize, _addr: Option<u64>) {}
    /// Hands the device its INTx line (only for devices with an interrupt pin).
    fn set_intx(&mut self, _line: Box<dyn IntxLine>) {}
}

/// The host bridge at 00:00.0 (Intel 440FX IDs, which every OS accepts).
pub struct HostBridge {
    config: PciConfiguration,
}

impl Default for HostBridge {
    fn default() -> Self {
        let ids = PciIds {
            vendor: 0x8086,
            device: 0x1237,
            subsystem_vendor: 0,
            subsystem: 0,
            revision: 2,
            class: 0x060000,
        };
        Self {
            config: PciConfiguration::new(ids, 0),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}
