//! `IvshmemPlain`: QEMU's `ivshmem-plain` as a [`PciDevice`].
//!
//! | BAR | what |
//! |---|---|
//! | 0 | 256 bytes of 32-bit registers (4-byte accesses only) |
//! | 2 | the shared region, 64-bit prefetchable memory, mapped into the guest |
//!
//! Registers (offsets in BAR0): `0x00` IntrMask, `0x04` IntrStatus (cleared
//! on read), `0x08` IVPosition, `0x0c` Doorbell. Without interrupts, as in
//! QEMU's plain device, IntrMask and IntrStatus hold what is written,
//! IVPosition reads 0 and Doorbell writes are ignored. No BAR1, no interrupt pin.

use std::ops::Range;
use std::sync::Arc;

use vmm_core::pci::{BarKind, BarMemory, BarSpec, PciConfiguration, PciDevice, PciIds};

use crate::region::SharedRegion;

pub use intervm_protocol::ivshmem::{
    DOORBELL, INTR_MASK, INTR_STATUS, IV_POSITION, REGS_BAR, REGS_SIZE, SHM_BAR,
};

/// The ivshmem identity: Red Hat vendor, ivshmem device, RAM controller
/// class (both personalities; the values are in
/// [`intervm_protocol::ivshmem`]).
pub fn ivshmem_ids() -> PciIds {
    use intervm_protocol::ivshmem as iv;
    PciIds {
        vendor: iv::VENDOR,
        device: iv::DEVICE,
        subsystem_vendor: iv::SUBSYSTEM_VENDOR,
        subsystem: iv::SUBSYSTEM,
        revision: iv::REVISION,
        class: iv::CLASS,
    }
}

/// Counters of guest accesses the device ignored.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Ignored {
    /// Accesses that were not 4 bytes wide or not at a register.
    pub bad_access: u64,
    /// Doorbell writes (no interrupts in this personality).
    pub doorbell: u64,
}

/// The plain (polling) ivshmem device.
pub struct IvshmemPlain {
    config: PciConfiguration,
    region: Arc<SharedRegion>,
    intr_mask: u32,
    intr_status: u32,
    ignored: Ignored,
    read_only: Vec<Range<u64>>,
}

impl IvshmemPlain {
    /// A device exposing `region` as BAR2.
    pub fn new(region: Arc<SharedRegion>) -> Self {
        let mut config = PciConfiguration::new(ivshmem_ids(), 0);
        // Both specs are valid by construction (power-of-two sizes, free slots).
        let _ = config.add_bar(
            REGS_BAR,
            BarSpec {
                kind: BarKind::Mem32,
                size: REGS_SIZE,
            },
        );
        let _ = config.add_bar(
            SHM_BAR,
            BarSpec {
                kind: BarKind::Mem64 { prefetchable: true },
                size: region.size(),
            },
        );
        Self {
            config,
            region,
            intr_mask: 0,
            intr_status: 0,
            ignored: Ignored::default(),
            read_only: Vec::new(),
        }
    }

    /// Makes the `read_only` pieces of the region (offsets into it, widened
    /// to pages) read-only to the guest: its writes there exit and are
    /// dropped. A VMM passes the parts of the ring layout other members
    /// write (`Transport::guest_read_only`). Takes effect when the guest
    /// next maps BAR2 (set it before the guest runs).
    pub fn set_guest_read_only(&mut self, read_only: Vec<Range<u64>>) {
        self.read_only = read_only;
    }

    /// The shared region.
    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }

    /// What the guest did that was ignored.
    pub fn ignored(&self) -> Ignored {
        self.ignored
    }
}

impl PciDevice for IvshmemPlain {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        let v = match (bar, offset, data.len()) {
            (REGS_BAR, INTR_MASK, 4) => Some(self.intr_mask),
            (REGS_BAR, INTR_STATUS, 4) => Some(std::mem::take(&mut self.intr_status)),
            (REGS_BAR, IV_POSITION, 4) => Some(0),
            (REGS_BAR, DOORBELL, 4) => Some(0),
            _ => None,
        };
        match v {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()),
            None => {
                self.ignored.bad_access += 1;
                log::debug!(
                    "ivshmem: ignored read BAR{bar}+{offset:#x} width {}",
                    data.len()
                );
                data.fill(0xff);
            }
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        let v = match data {
            [a, b, c, d] if bar == REGS_BAR => u32::from_le_bytes([*a, *b, *c, *d]),
            _ => {
                self.ignored.bad_access += 1;
                return;
            }
        };
        match offset {
            INTR_MASK => self.intr_mask = v,
            INTR_STATUS => self.intr_status = v,
            DOORBELL => self.ignored.doorbell += 1,
            _ => self.ignored.bad_access += 1,
        }
    }

    fn bar_memory(&self, bar: usize) -> Option<BarMemory> {
        (bar == SHM_BAR).then(|| {
            // SAFETY: the region's mapping lives as long as its Arc, the
            // owner.
            unsafe {
                BarMemory::new(
                    self.region.clone(),
                    self.region.host_addr(),
                    self.region.size(),
                )
            }
            .with_read_only(self.read_only.clone())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::Backing;

    fn dev() -> IvshmemPlain {
        IvshmemPlain::new(Arc::new(
            SharedRegion::open(&Backing::Memfd, 1 << 20).unwrap(),
        ))
    }

    fn read(d: &mut IvshmemPlain, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn looks_like_qemu_ivshmem_plain() {
        let d = dev();
        let c = d.config();
        assert_eq!(c.read(0, 4), 0x1110_1af4);
        assert_eq!(c.read(0x08, 4) >> 8, 0x050000);
        assert_eq!(c.read(0x2c, 4), 0x1100_1af4);
        assert_eq!(c.bar_spec(0).unwrap().size, 256);
        assert!(c.bar_spec(1).is_none(), "plain has no MSI-X BAR");
        assert_eq!(
            c.bar_spec(2).unwrap().kind,
            BarKind::Mem64 { prefetchable: true }
        );
        assert_eq!(c.bar_spec(2).unwrap().size, 1 << 20);
        assert_eq!(c.interrupt_pin(), 0);
        assert_eq!(d.bar_memory(2).unwrap().len(), 1 << 20);
        assert!(d.bar_memory(0).is_none());
    }

    #[test]
    fn registers_follow_the_spec_and_ignore_bad_accesses() {
        let mut d = dev();
        d.bar_write(0, INTR_MASK, &0xffu32.to_le_bytes());
        assert_eq!(read(&mut d, INTR_MASK), 0xff);
        d.bar_write(0, INTR_STATUS, &1u32.to_le_bytes());
        assert_eq!(read(&mut d, INTR_STATUS), 1);
        assert_eq!(read(&mut d, INTR_STATUS), 0, "cleared on read");
        assert_eq!(read(&mut d, IV_POSITION), 0);
        d.bar_write(0, DOORBELL, &0x0001_0000u32.to_le_bytes());
        let mut w = [0u8; 2];
        d.bar_read(0, INTR_MASK, &mut w);
        assert_eq!(w, [0xff, 0xff], "2-byte access refused");
        d.bar_write(0, 0x80, &[1, 2, 3, 4]);
        d.bar_write(0, 0, &[1]);
        d.bar_write(1, 0, &[1, 2, 3, 4]);
        assert_eq!(
            d.ignored(),
            Ignored {
                bad_access: 4,
                doorbell: 1
            }
        );
    }
}
