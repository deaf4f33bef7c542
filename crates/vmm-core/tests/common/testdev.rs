//! A PCI test device built only from vmm-core's public API.
//!
//! BAR0: 256 bytes of trapped registers (offset 0: scratch, offset 4:
//! interrupt status, cleared on read, which also deasserts INTx).
//! BAR1: MSI-X table (offset 0) and PBA (offset 0x800).
//! BAR2: 1 MiB of host memory mapped straight into the guest (64-bit, prefetchable).

use std::sync::{Arc, Mutex};

use vm_memory::MmapRegion;
use vmm_core::irq::{IntxLine, KvmMsiVectors};
use vmm_core::pci::{BarKind, BarMemory, BarSpec, Msix, PciConfiguration, PciDevice, PciIds};
use vmm_core::Vm;

pub const VENDOR: u16 = 0x1af4;
pub const DEVICE: u16 = 0x7e57;
pub const SHARED_SIZE: u64 = 1 << 20;
pub const STATUS_OFFSET: u64 = 4;

pub struct TestDevice {
    config: PciConfiguration,
    pub msix: Msix,
    scratch: u32,
    status: u32,
    intx: Option<Box<dyn IntxLine>>,
    pub shared: Arc<MmapRegion<()>>,
    pub moves: Vec<(usize, Option<u64>)>,
    /// Pieces of BAR2 the guest may only read.
    pub read_only: Vec<std::ops::Range<u64>>,
    /// Panics on the next config-space read (a device bug a guest hits).
    pub panic_on_config: bool,
}

impl TestDevice {
    pub fn new(vm: &Vm, vectors: usize) -> Arc<Mutex<Self>> {
        let ids = PciIds {
            vendor: VENDOR,
            device: DEVICE,
            subsystem_vendor: VENDOR,
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
                    size: 256,
                },
            )
            .unwrap();
        config
            .add_bar(
                1,
                BarSpec {
                    kind: BarKind::Mem32,
                    size: 4096,
                },
            )
            .unwrap();
        config
            .add_bar(
                2,
                BarSpec {
                    kind: BarKind::Mem64 { prefetchable: true },
                    size: SHARED_SIZE,
                },
            )
            .unwrap();
        let vecs = KvmMsiVectors::new(vm.gsi_router().clone(), vectors).unwrap();
        let msix = Msix::new(&mut config, Box::new(vecs), 1, 0, 0x800).unwrap();
        let shared = Arc::new(MmapRegion::new(SHARED_SIZE as usize).unwrap());
        Arc::new(Mutex::new(Self {
            config,
            msix,
            scratch: 0,
            status: 0,
            intx: None,
            shared,
            moves: Vec::new(),
            read_only: Vec::new(),
            panic_on_config: false,
        }))
    }

    /// Sets the status bit and asserts INTx.
    pub fn raise_intx(&mut self) {
        self.status = 1;
        if let Some(l) = &self.intx {
            l.set_level(true);
        }
    }

    pub fn write_shared_u64(&self, off: usize, v: u64) {
        // SAFETY: off + 8 <= SHARED_SIZE in the tests; the mapping is live.
        unsafe { std::ptr::write_volatile(self.shared.as_ptr().add(off) as *mut u64, v) }
    }

    pub fn read_shared_u64(&self, off: usize) -> u64 {
        // SAFETY: as above.
        unsafe { std::ptr::read_volatile(self.shared.as_ptr().add(off) as *const u64) }
    }
}

impl PciDevice for TestDevice {
    fn config(&self) -> &PciConfiguration {
        if self.panic_on_config {
            panic!("test device: a bug hit by a config-space read");
        }
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn config_written(&mut self, _reg: usize) {
        self.msix.config_written(&self.config);
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match (bar, offset, data.len()) {
            (0, 0, 4) => data.copy_from_slice(&self.scratch.to_le_bytes()),
            (0, STATUS_OFFSET, 4) => {
                data.copy_from_slice(&self.status.to_le_bytes());
                self.status = 0;
                if let Some(l) = &self.intx {
                    l.set_level(false);
                }
            }
            (1, o, _) if o < 0x800 => self.msix.read_table(o, data),
            (1, o, _) => self.msix.read_pba(o - 0x800, data),
            _ => data.fill(0xff),
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match (bar, offset, data.len()) {
            (0, 0, 4) => self.scratch = u32::from_le_bytes([data[0], data[1], data[2], data[3]]),
            (1, o, _) if o < 0x800 => self.msix.write_table(o, data),
            _ => {}
        }
    }
    fn bar_memory(&self, bar: usize) -> Option<BarMemory> {
        (bar == 2).then(|| {
            // SAFETY: `shared` is a mapping of SHARED_SIZE bytes, alive as
            // long as its Arc, the owner.
            unsafe { BarMemory::new(self.shared.clone(), self.shared.as_ptr(), SHARED_SIZE) }
                .with_read_only(self.read_only.clone())
        })
    }
    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        self.moves.push((bar, addr));
    }
    fn set_intx(&mut self, line: Box<dyn IntxLine>) {
        self.intx = Some(line);
    }
}
