//! The PCI bus as a guest drives it: config space through 0xCF8/0xCFC
//! (BAR sizing and moving, command register, capabilities, the MSI-X
//! control word) and BAR accesses through the PCI windows (MSI-X table
//! and PBA, the ivshmem-plain registers), at any offset and width. Two
//! devices: ivshmem-plain and one with an MSI-X table. Nothing may panic.

#![no_main]

use std::sync::{Arc, Mutex};

use libfuzzer_sys::fuzz_target;
use shmem_device::{Backing, IvshmemPlain, SharedRegion};
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::{DeviceMmio, DevicePio};
use vmm_core::irq::{IntxLine, MsiMessage, MsiVectors};
use vmm_core::layout;
use vmm_core::pci::bus::PciPlatform;
use vmm_core::pci::BarMemory;
use vmm_core::pci::{
    BarKind, BarSpec, Msix, PciBus, PciConfigIo, PciConfiguration, PciDevice, PciIds,
    PciWindowRouter,
};

/// A platform that maps nothing and whose lines go nowhere.
struct NoPlatform;

impl PciPlatform for NoPlatform {
    unsafe fn map_memory(
        &self,
        _gpa: u64,
        _host: u64,
        _len: u64,
        _ro: bool,
    ) -> vmm_core::Result<u32> {
        Ok(0)
    }
    fn unmap_memory(&self, _handle: u32) -> vmm_core::Result<()> {
        Ok(())
    }
    fn intx_line(&self, _gsi: u32) -> Box<dyn IntxLine> {
        Box::new(NoLine)
    }
}

struct NoLine;
impl IntxLine for NoLine {
    fn set_level(&self, _asserted: bool) {}
}

/// Vectors that remember their routes and pending bits.
struct FakeVectors {
    routes: Vec<Option<MsiMessage>>,
}

impl MsiVectors for FakeVectors {
    fn len(&self) -> usize {
        self.routes.len()
    }
    fn configure(&mut self, index: usize, msg: Option<MsiMessage>) {
        self.routes[index] = msg;
    }
    fn trigger(&self, _index: usize) {}
    fn pending(&self, index: usize) -> bool {
        index.is_multiple_of(2)
    }
}

/// BAR0: MSI-X table at 0 and PBA at 0x800.
struct MsixDevice {
    config: PciConfiguration,
    msix: Msix,
}

impl MsixDevice {
    fn new(vectors: usize) -> Self {
        let ids = PciIds {
            vendor: 0x1af4,
            device: 0x7e57,
            subsystem_vendor: 0x1af4,
            subsystem: 1,
            revision: 0,
            class: 0xff0000,
        };
        let mut config = PciConfiguration::new(ids, 1);
        config
            .add_bar(
                0,
                BarSpec {
                    kind: BarKind::Mem32,
                    size: 4096,
                },
            )
            .expect("BAR0");
        let v = Box::new(FakeVectors {
            routes: vec![None; vectors],
        });
        let msix = Msix::new(&mut config, v, 0, 0, 0x800).expect("MSI-X");
        Self { config, msix }
    }
}

impl PciDevice for MsixDevice {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn config_written(&mut self, _reg: usize) {
        self.msix.config_written(&self.config);
    }
    fn bar_read(&mut self, _bar: usize, offset: u64, data: &mut [u8]) {
        if offset < 0x800 {
            self.msix.read_table(offset, data)
        } else {
            self.msix.read_pba(offset - 0x800, data)
        }
    }
    fn bar_write(&mut self, _bar: usize, offset: u64, data: &[u8]) {
        if offset < 0x800 {
            self.msix.write_table(offset, data)
        }
    }
    fn bar_memory(&self, _bar: usize) -> Option<BarMemory> {
        None
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&n, ops)) = data.split_first() else {
        return;
    };
    let bus = Arc::new(PciBus::new(Box::new(NoPlatform)));
    let region = SharedRegion::open(&Backing::Memfd, 1 << 20).expect("region");
    let mut plain = IvshmemPlain::new(Arc::new(region));
    // BAR2 mapped in pieces (read-only ones where a ring layout would put
    // the header and other members' sections), moved wherever the ops say.
    let at = (n as u64) << 12;
    plain.set_guest_read_only(vec![0..4096, at..at + 0x3000, at + 0x1800..at + 0x10_0000]);
    let plain = Arc::new(Mutex::new(plain));
    let msix = Arc::new(Mutex::new(MsixDevice::new(1 + n as usize % 64)));
    if bus.add_device(plain).is_err() || bus.add_device(msix.clone()).is_err() {
        return;
    }
    let cfg = PciConfigIo(bus.clone());
    let win = PciWindowRouter(bus.clone());
    for op in ops.chunks_exact(8) {
        let width = [1usize, 2, 4, 8][(op[0] & 3) as usize];
        let write = op[0] & 4 != 0;
        let v = u32::from_le_bytes([op[4], op[5], op[6], op[7]]);
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&v.to_le_bytes());
        value[4..].copy_from_slice(&v.rotate_left(13).to_le_bytes());
        let mut buf = [0u8; 8];
        match (op[0] >> 3) & 3 {
            // CONFIG_ADDRESS: enable bit, slot 0-3, function, register.
            0 => {
                let addr = 0x8000_0000 | ((op[1] as u32 & 3) << 11) | (op[2] as u32 & 0xfc);
                cfg.pio_write(PioAddress(0xcf8), 0, &addr.to_le_bytes());
            }
            // CONFIG_DATA, any width at 0xCFC..0xCFF.
            1 => {
                let off = 4 + (op[1] & 3) as u16;
                let w = width.min(4);
                if write {
                    cfg.pio_write(PioAddress(0xcf8), off, &value[..w]);
                } else {
                    cfg.pio_read(PioAddress(0xcf8), off, &mut buf[..w]);
                }
            }
            // The 32-bit MMIO window, near its base (where BARs land).
            2 => {
                let off = u32::from_le_bytes([op[1], op[2], op[3], 0]) as u64;
                let base = MmioAddress(layout::PCI_MMIO32_BASE);
                if write {
                    win.mmio_write(base, off, &value[..width]);
                } else {
                    win.mmio_read(base, off, &mut buf[..width]);
                }
            }
            // The 64-bit window, near its base.
            _ => {
                let off = u32::from_le_bytes([op[1], op[2], op[3], 0]) as u64;
                let base = MmioAddress(layout::PCI_MMIO64_BASE);
                if write {
                    win.mmio_write(base, off, &value[..width]);
                } else {
                    win.mmio_read(base, off, &mut buf[..width]);
                }
            }
        }
    }
    let _ = msix.lock().map(|d| d.msix.enabled());
});
