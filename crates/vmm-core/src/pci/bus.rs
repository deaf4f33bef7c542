//! The PCI bus: configuration mechanism #1, BAR placement and decoding.

use std::sync::{Arc, Mutex, MutexGuard};

use kvm_ioctls::VmFd;
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{DeviceMmio, DevicePio};

use super::config::{command, BarKind, NUM_BARS};
use super::{BarMemory, HostBridge, PciDevice};
use crate::irq::{IntxLine, KvmIntxLine};
use crate::layout;
use crate::memory::MemorySlots;
use crate::{Error, Result};

/// What the bus needs from the platform: mapping memory BARs and INTx lines.
pub trait PciPlatform: Send + Sync {
    /// Maps `len` bytes of host memory at `host` to guest address `gpa`,
    /// writable by the guest or (`read_only`) not; returns a handle for
    /// [`PciPlatform::unmap_memory`].
    ///
    /// # Safety
    /// The host range must stay mapped until it is unmapped again.
    unsafe fn map_memory(&self, gpa: u64, host: u64, len: u64, read_only: bool) -> Result<u32>;
    /// Undoes a [`PciPlatform::map_memory`].
    fn unmap_memory(&self, handle: u32) -> Result<()>;
    /// The INTx line for IOAPIC pin `gsi`.
    fn intx_line(&self, gsi: u32) -> Box<dyn IntxLine>;
}

/// [`PciPlatform`] on KVM.
pub struct KvmPciPlatform {
    vm: Arc<VmFd>,
    slots: MemorySlots,
    /// KVM_CAP_READONLY_MEM.
    read_only_slots: bool,
}

impl KvmPciPlatform {
    /// Maps through `vm`'s memory slots.
    pub fn new(vm: Arc<VmFd>, slots: MemorySlots) -> Self {
        let read_only_slots = vm.check_extension(kvm_ioctls::Cap::ReadonlyMem);
        Self {
            vm,
            slots,
            read_only_slots,
        }
    }
}

impl PciPlatform for KvmPciPlatform {
    unsafe fn map_memory(&self, gpa: u64, host: u64, len: u64, read_only: bool) -> Result<u32> {
        let read_only = if read_only && !self.read_only_slots {
            // Every x86 KVM since Linux 3.8 has them; say so loudly if not.
            log::warn!(
                "KVM has no read-only memory slots: guest memory at {gpa:#x}+{len:#x} \
                 that should be read-only is mapped writable"
            );
            false
        } else {
            read_only
        };
        // SAFETY: forwarded contract.
        unsafe { self.slots.map(&self.vm, gpa, host, len, read_only) }
    }
    fn unmap_memory(&self, handle: u32) -> Result<()> {
        self.slots.unmap(&self.vm, handle)
    }
    fn intx_line(&self, gsi: u32) -> Box<dyn IntxLine> {
        Box::new(KvmIntxLine::new(self.vm.clone(), gsi))
    }
}

/// Where a device landed on the bus.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlotInfo {
    /// Device number on bus 0.
    pub device: u8,
    /// Firmware-assigned BAR addresses and sizes.
    pub bars: [Option<(u64, u64)>; NUM_BARS],
    /// IOAPIC pin of its INTx, if it has an interrupt pin.
    pub intx_gsi: Option<u32>,
}

/// A device and the BAR an access landed in, with the offset inside it.
type Routed = (Arc<Mutex<dyn PciDevice>>, usize, u64);

struct Slot {
    dev: Arc<Mutex<dyn PciDevice>>,
    /// BAR specs (fixed once on the bus): size and whether it is I/O.
    specs: [Option<(u64, bool)>; NUM_BARS],
    decoded: [Option<u64>; NUM_BARS],
    /// The memory slots of each memory-backed BAR that is decoded.
    mem_handle: [Vec<u32>; NUM_BARS],
    /// The host memory those slots map, kept (with its owner) until every
    /// slot of the BAR is gone from KVM: the guest never reaches memory
    /// its owner has unmapped.
    mem_kept: [Vec<BarMemory>; NUM_BARS],
}

struct Windows {
    io_next: u64,
    mmio32_next: u64,
    mmio64_next: u64,
}

struct BusState {
    slots: Vec<Option<Slot>>,
    config_address: u32,
    windows: Windows,
}

/// PCI bus 0 with its host bridge.
pub struct PciBus {
    state: Mutex<BusState>,
    platform: Box<dyn PciPlatform>,
}

/// The least alignment of a memory BAR (a 4 KiB page).
const MEM_BAR_ALIGN: u64 = 4096;

fn window_of(kind: BarKind) -> (u64, u64) {
    match kind {
        BarKind::Io => (layout::PCI_IO_BASE as u64, layout::PCI_IO_SIZE as u64),
        BarKind::Mem32 => (layout::PCI_MMIO32_BASE, layout::PCI_MMIO32_SIZE),
        BarKind::Mem64 { .. } => (layout::PCI_MMIO64_BASE, layout::PCI_MMIO64_SIZE),
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panicking device must not take the whole VM down with poisoned locks.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl PciBus {
    /// A bus with a host bridge at 00:00.0.
    pub fn new(platform: Box<dyn PciPlatform>) -> Self {
        let bus = Self {
            state: Mutex::new(BusState {
                slots: (0..32).map(|_| None).collect(),
                config_address: 0,
                windows: Windows {
                    io_next: layout::PCI_IO_BASE as u64,
                    mmio32_next: layout::PCI_MMIO32_BASE,
                    mmio64_next: layout::PCI_MMIO64_BASE,
                },
            }),
            platform,
        };
        let bridge: Arc<Mutex<dyn PciDevice>> = Arc::new(Mutex::new(HostBridge::default()));
        lock(&bus.state).slots[0] = Some(Slot {
            dev: bridge,
            specs: [None; NUM_BARS],
            decoded: [None; NUM_BARS],
            mem_handle: Default::default(),
            mem_kept: Default::default(),
        });
        bus
    }

    /// Adds `dev` in the first free slot: assigns its BARs from the windows,
    /// enables decoding (as firmware does), and wires its INTx.
    pub fn add_device(&self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<SlotInfo> {
        let mut st = lock(&self.state);
        let n = st
            .slots
            .iter()
            .position(|s| s.is_none())
            .ok_or_else(|| Error::Pci("no free slot on bus 0".into()))?;
        let mut info = SlotInfo {
            device: n as u8,
            bars: [None; NUM_BARS],
            intx_gsi: None,
        };
        let mut specs = [None; NUM_BARS];
        {
            let mut d = lock(&dev);
            let mut cmd = d.config().command();
            for (i, spec_slot) in specs.iter_mut().enumerate() {
                let Some(spec) = d.config().bar_spec(i) else {
                    continue;
                };
                let (base, size) = window_of(spec.kind);
                let next = match spec.kind {
                    BarKind::Io => &mut st.windows.io_next,
                    BarKind::Mem32 => &mut st.windows.mmio32_next,
                    BarKind::Mem64 { .. } => &mut st.windows.mmio64_next,
                };
                // Memory BARs get a page of their own at least: a guest
                // maps BARs to userspace (sysfs resourceN, UIO) by pages,
                // and Linux's UIO refuses a BAR that starts inside one.
                let align = match spec.kind {
                    BarKind::Io => spec.size,
                    _ => spec.size.max(MEM_BAR_ALIGN),
                };
                let addr = next.next_multiple_of(align);
                if addr + spec.size > base + size {
                    return Err(Error::Pci(format!(
                        "no room for BAR{i} of {} bytes",
                        spec.size
                    )));
                }
                *next = addr + spec.size;
                d.config_mut().set_bar_address(i, addr);
                info.bars[i] = Some((addr, spec.size));
                *spec_slot = Some((spec.size, spec.kind == BarKind::Io));
                cmd |= if spec.kind == BarKind::Io {
                    command::IO
                } else {
                    command::MEMORY
                };
            }
            d.config_mut().set_command(cmd);
            if d.config().interrupt_pin() != 0 {
                let gsi = layout::PCI_INTX_FIRST_GSI + (n as u32 % 8);
                d.config_mut().set_interrupt_line(gsi as u8);
                d.set_intx(self.platform.intx_line(gsi));
                info.intx_gsi = Some(gsi);
            }
        }
        st.slots[n] = Some(Slot {
            dev,
            specs,
            decoded: [None; NUM_BARS],
            mem_handle: Default::default(),
            mem_kept: Default::default(),
        });
        self.update_decoding(&mut st, n);
        Ok(info)
    }

    /// Re-evaluates which BARs of slot `n` are decoded and where, mapping or
    /// unmapping memory BARs as needed.
    fn update_decoding(&self, st: &mut BusState, n: usize) {
        let Some(slot) = st.slots.get_mut(n).and_then(|s| s.as_mut()) else {
            return;
        };
        let mut d = lock(&slot.dev);
        let cmd = d.config().command();
        for i in 0..NUM_BARS {
            let Some(spec) = d.config().bar_spec(i) else {
                continue;
            };
            let enabled =
                cmd & if spec.kind == BarKind::Io {
                    command::IO
                } else {
                    command::MEMORY
                } != 0;
            let (wbase, wsize) = window_of(spec.kind);
            let want = d.config().bar_address(i).filter(|&a| {
                enabled
                    && a >= wbase
                    && a.checked_add(spec.size)
                        .is_some_and(|end| end <= wbase + wsize)
            });
            if want == slot.decoded[i] {
                continue;
            }
            self.unmap_bar(&mut slot.mem_handle[i], &mut slot.mem_kept[i], n, i);
            slot.decoded[i] = want;
            if let (Some(addr), Some(mut mem)) = (want, d.bar_memory(i)) {
                mem.clip(spec.size);
                // Kept before KVM maps any of it.
                slot.mem_kept[i].push(mem.clone());
                for piece in mem.pieces() {
                    // SAFETY: `BarMemory::new`'s contract keeps the host
                    // range mapped while its owner lives, and `mem_kept`
                    // holds the owner until KVM no longer maps any piece.
                    // Each piece lies inside that range.
                    match unsafe {
                        self.platform.map_memory(
                            addr + piece.offset,
                            mem.host_addr() + piece.offset,
                            piece.len,
                            piece.read_only,
                        )
                    } {
                        Ok(h) => slot.mem_handle[i].push(h),
                        Err(e) => {
                            log::warn!(
                                "PCI 00:{n:02x}.0 BAR{i} at {addr:#x}: {e}; BAR not decoded"
                            );
                            self.unmap_bar(&mut slot.mem_handle[i], &mut slot.mem_kept[i], n, i);
                            slot.decoded[i] = None;
                            break;
                        }
                    }
                }
            }
            d.bar_moved(i, slot.decoded[i]);
            log::debug!("PCI 00:{n:02x}.0 BAR{i} decoded at {:?}", slot.decoded[i]);
        }
    }

    /// Removes the memory slots of BAR `i` of slot `n`. A slot that fails
    /// to unmap stays in `handles`, so that it is not forgotten while KVM
    /// still maps it: the next change of that BAR tries again. Once none is
    /// left, the memory they mapped (and its owner) in `kept` is let go.
    fn unmap_bar(&self, handles: &mut Vec<u32>, kept: &mut Vec<BarMemory>, n: usize, i: usize) {
        handles.retain(|&h| match self.platform.unmap_memory(h) {
            Ok(()) => false,
            Err(e) => {
                log::error!(
                    "PCI 00:{n:02x}.0 BAR{i}: unmap of memory slot {h}: {e}; \
                     kept, to be retried when the BAR changes again"
                );
                true
            }
        });
        if handles.is_empty() {
            kept.clear();
        }
    }

    fn config_access(&self, write: Option<&[u8]>, read: Option<&mut [u8]>, port_off: u64) {
        let mut st = lock(&self.state);
        let addr = st.config_address;
        let bus = (addr >> 16) & 0xff;
        let dev = ((addr >> 11) & 0x1f) as usize;
        let func = (addr >> 8) & 0x7;
        let reg_off = (addr & 0xfc) as usize + port_off as usize;
        let present = addr & 0x8000_0000 != 0 && bus == 0 && func == 0 && st.slots[dev].is_some();
        if let Some(data) = read {
            if !present || data.len() > 4 || reg_off % 4 + data.len() > 4 {
                data.fill(0xff);
                return;
            }
            let Some(slot) = st.slots[dev].as_ref() else {
                return;
            };
            let v = lock(&slot.dev).config().read(reg_off, data.len());
            data.copy_from_slice(&v.to_le_bytes()[..data.len()]);
        } else if let Some(data) = write {
            if !present {
                return;
            }
            let Some(slot) = st.slots[dev].as_ref() else {
                return;
            };
            let reg = {
                let mut d = lock(&slot.dev);
                let reg = d.config_mut().write(reg_off, data);
                if let Some(r) = reg {
                    d.config_written(r);
                }
                reg
            };
            if matches!(reg, Some(1) | Some(4..=9)) {
                self.update_decoding(&mut st, dev);
            }
        }
    }

    /// Finds the device and BAR decoding `addr` in `kind`'s window.
    fn route(&self, addr: u64, io: bool) -> Option<Routed> {
        let st = lock(&self.state);
        for slot in st.slots.iter().flatten() {
            for (i, dec) in slot.decoded.iter().enumerate() {
                let (Some(base), Some((size, is_io))) = (*dec, slot.specs[i]) else {
                    continue;
                };
                if slot.mem_handle[i].is_empty()
                    && is_io == io
                    && addr >= base
                    && addr - base < size
                {
                    return Some((slot.dev.clone(), i, addr - base));
                }
            }
        }
        None
    }

    /// Where BAR `bar` of device `device` is decoded now.
    pub fn decoded_bar(&self, device: u8, bar: usize) -> Option<u64> {
        let st = lock(&self.state);
        st.slots
            .get(device as usize)?
            .as_ref()?
            .decoded
            .get(bar)
            .copied()
            .flatten()
    }
}

impl Drop for PciBus {
    fn drop(&mut self) {
        let st = lock(&self.state);
        for slot in st.slots.iter().flatten() {
            for h in slot.mem_handle.iter().flatten() {
                let _ = self.platform.unmap_memory(*h);
            }
        }
    }
}

/// Ports 0xCF8..0xD00: CONFIG_ADDRESS (dword at 0xCF8) and CONFIG_DATA (0xCFC..0xCFF).
pub struct PciConfigIo(
    /// The bus whose config space the ports reach.
    pub Arc<PciBus>,
);

impl DevicePio for PciConfigIo {
    fn pio_read(&self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match offset {
            0 if data.len() == 4 => {
                data.copy_from_slice(&lock(&self.0.state).config_address.to_le_bytes())
            }
            4..=7 => self.0.config_access(None, Some(data), offset as u64 - 4),
            _ => data.fill(0xff),
        }
    }

    fn pio_write(&self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match offset {
            0 if data.len() == 4 => {
                lock(&self.0.state).config_address =
                    u32::from_le_bytes([data[0], data[1], data[2], data[3]]) & 0x80ff_fffc
            }
            4..=7 => self.0.config_access(Some(data), None, offset as u64 - 4),
            _ => {}
        }
    }
}

/// Dispatches accesses in one PCI window to the BAR that decodes them.
pub struct PciWindowRouter(
    /// The bus whose BARs decode the window.
    pub Arc<PciBus>,
);

impl DeviceMmio for PciWindowRouter {
    fn mmio_read(&self, base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        match self.0.route(base.0 + offset, false) {
            Some((dev, bar, off)) => lock(&dev).bar_read(bar, off, data),
            None => data.fill(0xff),
        }
    }
    fn mmio_write(&self, base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if let Some((dev, bar, off)) = self.0.route(base.0 + offset, false) {
            lock(&dev).bar_write(bar, off, data)
        }
    }
}

impl DevicePio for PciWindowRouter {
    fn pio_read(&self, base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match self.0.route(base.0 as u64 + offset as u64, true) {
            Some((dev, bar, off)) => lock(&dev).bar_read(bar, off, data),
            None => data.fill(0xff),
        }
    }
    fn pio_write(&self, base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let Some((dev, bar, off)) = self.0.route(base.0 as u64 + offset as u64, true) {
            lock(&dev).bar_write(bar, off, data)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::{BarSpec, PciConfiguration, PciIds};
    use crate::pci::BarMemory;
    use std::sync::atomic::{AtomicU32, Ordering};

    type Log = Arc<Mutex<Vec<String>>>;

    #[derive(Default)]
    struct FakePlatform {
        log: Log,
        /// Handles handed out so far (the first is 7).
        mapped: AtomicU32,
        /// How many of the next unmaps fail.
        failing_unmaps: Arc<AtomicU32>,
    }
    impl PciPlatform for FakePlatform {
        unsafe fn map_memory(&self, gpa: u64, _host: u64, len: u64, ro: bool) -> Result<u32> {
            let mut log = self.log.lock().unwrap();
            log.push(format!(
                "map {gpa:#x}+{len:#x}{}",
                if ro { " ro" } else { "" }
            ));
            Ok(7 + self.mapped.fetch_add(1, Ordering::Relaxed))
        }
        fn unmap_memory(&self, handle: u32) -> Result<()> {
            let fail = self
                .failing_unmaps
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok();
            if fail {
                self.log
                    .lock()
                    .unwrap()
                    .push(format!("unmap {handle} failed"));
                return Err(crate::Error::Memory("injected unmap failure".into()));
            }
            self.log.lock().unwrap().push(format!("unmap {handle}"));
            Ok(())
        }
        fn intx_line(&self, _gsi: u32) -> Box<dyn IntxLine> {
            struct Nop;
            impl IntxLine for Nop {
                fn set_level(&self, _: bool) {}
            }
            Box::new(Nop)
        }
    }

    struct Dev {
        config: PciConfiguration,
        reads: Vec<(usize, u64)>,
        read_only: Vec<std::ops::Range<u64>>,
        /// What "keeps BAR2's memory mapped".
        owner: Arc<()>,
    }
    impl PciDevice for Dev {
        fn config(&self) -> &PciConfiguration {
            &self.config
        }
        fn config_mut(&mut self) -> &mut PciConfiguration {
            &mut self.config
        }
        fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
            self.reads.push((bar, offset));
            data.fill(0x5a);
        }
        fn bar_write(&mut self, _: usize, _: u64, _: &[u8]) {}
        fn bar_memory(&self, bar: usize) -> Option<BarMemory> {
            (bar == 2).then(|| {
                // SAFETY: the fake platform records the address, never maps it.
                unsafe { BarMemory::new(self.owner.clone(), 0x7000_0000 as *mut u8, 1 << 20) }
                    .with_read_only(self.read_only.clone())
            })
        }
    }

    fn setup() -> (Arc<PciBus>, Log, Arc<Mutex<Dev>>) {
        let (bus, log, dev, _) = setup_failing();
        (bus, log, dev)
    }

    /// [`setup`], with a counter of unmaps to fail.
    fn setup_failing() -> (Arc<PciBus>, Log, Arc<Mutex<Dev>>, Arc<AtomicU32>) {
        let p = FakePlatform::default();
        let log = p.log.clone();
        let failing = p.failing_unmaps.clone();
        let bus = Arc::new(PciBus::new(Box::new(p)));
        let ids = PciIds {
            vendor: 0x1af4,
            device: 0x1110,
            subsystem_vendor: 0,
            subsystem: 0,
            revision: 0,
            class: 0x050000,
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
                2,
                BarSpec {
                    kind: BarKind::Mem64 { prefetchable: true },
                    size: 1 << 20,
                },
            )
            .unwrap();
        let dev = Arc::new(Mutex::new(Dev {
            config,
            reads: Vec::new(),
            read_only: Vec::new(),
            owner: Arc::new(()),
        }));
        bus.add_device(dev.clone()).unwrap();
        (bus, log, dev, failing)
    }

    fn cfg_write(io: &PciConfigIo, dev: u32, reg: u32, v: u32) {
        io.pio_write(
            PioAddress(0xcf8),
            0,
            &(0x8000_0000 | dev << 11 | reg).to_le_bytes(),
        );
        io.pio_write(PioAddress(0xcf8), 4, &v.to_le_bytes());
    }

    fn cfg_read(io: &PciConfigIo, dev: u32, reg: u32) -> u32 {
        io.pio_write(
            PioAddress(0xcf8),
            0,
            &(0x8000_0000 | dev << 11 | reg).to_le_bytes(),
        );
        let mut d = [0u8; 4];
        io.pio_read(PioAddress(0xcf8), 4, &mut d);
        u32::from_le_bytes(d)
    }

    #[test]
    fn firmware_assignment_maps_the_memory_bar() {
        let (bus, log, _) = setup();
        assert_eq!(bus.decoded_bar(1, 0), Some(layout::PCI_MMIO32_BASE));
        assert_eq!(bus.decoded_bar(1, 2), Some(layout::PCI_MMIO64_BASE));
        assert_eq!(
            *log.lock().unwrap(),
            vec![format!("map {:#x}+0x100000", layout::PCI_MMIO64_BASE)]
        );
    }

    #[test]
    fn small_memory_bars_get_a_page_each() {
        let (bus, _, dev) = setup();
        // A second device like the first: its 256-byte BAR0 must not share
        // the first one's page.
        let config = dev.lock().unwrap().config.clone();
        let second = Arc::new(Mutex::new(Dev {
            config,
            reads: Vec::new(),
            read_only: Vec::new(),
            owner: Arc::new(()),
        }));
        let info = bus.add_device(second).unwrap();
        let (a, b) = (bus.decoded_bar(1, 0).unwrap(), info.bars[0].unwrap().0);
        assert_eq!(b % 4096, 0, "BAR0 at {b:#x} is not page aligned");
        assert!(b >= a + 4096, "BAR0s share a page: {a:#x} and {b:#x}");
    }

    #[test]
    fn a_memory_bar_with_read_only_pieces_maps_one_slot_per_piece() {
        let (bus, log, dev) = setup();
        let io = PciConfigIo(bus.clone());
        dev.lock().unwrap().read_only = vec![0..0x1000, 0x3000..0x5000];
        // Moving the BAR maps it again, now in pieces.
        let at = layout::PCI_MMIO64_BASE + (1 << 30);
        cfg_write(&io, 1, 0x18, at as u32 | 0xc);
        cfg_write(&io, 1, 0x1c, (at >> 32) as u32);
        assert_eq!(bus.decoded_bar(1, 2), Some(at));
        let log = log.lock().unwrap();
        let n = log.len();
        assert_eq!(
            log[n - 4..],
            [
                format!("map {at:#x}+0x1000 ro"),
                format!("map {:#x}+0x2000", at + 0x1000),
                format!("map {:#x}+0x2000 ro", at + 0x3000),
                format!("map {:#x}+0xfb000", at + 0x5000),
            ]
        );
        // Writes into the read-only pieces are not routed to the device
        // as register accesses (they exit, and nobody claims them).
        assert!(bus.route(at + 8, false).is_none());
    }

    #[test]
    fn hostile_bar_addresses_are_not_decoded() {
        let (bus, log, _) = setup();
        let io = PciConfigIo(bus.clone());
        // Move the memory BAR onto guest RAM (2 MiB): outside the window.
        cfg_write(&io, 1, 0x18, 0x20_000c);
        cfg_write(&io, 1, 0x1c, 0);
        assert_eq!(bus.decoded_bar(1, 2), None);
        // (The low dword's write alone moved it inside the window first.)
        assert_eq!(log.lock().unwrap().last().unwrap(), "unmap 8");
        // Just past the 64-bit window (addresses are masked to the BAR's
        // 1 MiB alignment, so a BAR can only start inside or beyond it).
        let top = layout::PCI_MMIO64_BASE + layout::PCI_MMIO64_SIZE;
        cfg_write(&io, 1, 0x18, top as u32 | 0xc);
        cfg_write(&io, 1, 0x1c, (top >> 32) as u32);
        assert_eq!(
            bus.decoded_bar(1, 2),
            None,
            "a BAR beyond the window is refused"
        );
        // Back inside: mapped again.
        let ok = layout::PCI_MMIO64_BASE + (1 << 30);
        cfg_write(&io, 1, 0x18, ok as u32 | 0xc);
        cfg_write(&io, 1, 0x1c, (ok >> 32) as u32);
        assert_eq!(bus.decoded_bar(1, 2), Some(ok));
        // Memory decode off unmaps everything; on maps again.
        cfg_write(&io, 1, 0x04, 0);
        assert_eq!((bus.decoded_bar(1, 0), bus.decoded_bar(1, 2)), (None, None));
        cfg_write(&io, 1, 0x04, 2);
        assert_eq!(bus.decoded_bar(1, 2), Some(ok));
    }

    #[test]
    fn a_memory_slot_that_fails_to_unmap_is_kept_and_retried() {
        let (bus, log, _, failing) = setup_failing();
        let io = PciConfigIo(bus.clone());
        let first = layout::PCI_MMIO64_BASE;
        let second = first + (1 << 30);
        failing.store(1, Ordering::Relaxed);
        cfg_write(&io, 1, 0x18, second as u32 | 0xc);
        cfg_write(&io, 1, 0x1c, (second >> 32) as u32);
        // The low dword's write already moves the BAR (the high dword is
        // unchanged): unmapping slot 7 there failed, so it is kept.
        assert_eq!(bus.decoded_bar(1, 2), Some(second));
        let tail = |k: usize| {
            let l = log.lock().unwrap();
            l[l.len() - k..].to_vec()
        };
        assert_eq!(
            tail(2),
            [
                "unmap 7 failed".to_string(),
                format!("map {second:#x}+0x100000")
            ]
        );
        // The next change unmaps both the kept slot and the current one.
        cfg_write(&io, 1, 0x04, 0);
        assert_eq!(bus.decoded_bar(1, 2), None);
        assert_eq!(tail(2), ["unmap 7", "unmap 8"]);
    }

    #[test]
    fn bar_memory_stays_owned_while_kvm_maps_any_of_it() {
        let (bus, _, dev, failing) = setup_failing();
        let io = PciConfigIo(bus.clone());
        let first = Arc::downgrade(&dev.lock().unwrap().owner);
        // The device lets go of the memory it mapped: the bus still holds
        // it, since KVM maps it into the guest.
        dev.lock().unwrap().owner = Arc::new(());
        assert!(first.upgrade().is_some(), "released while mapped");
        // Decoding off, with an unmap that fails: still mapped, still held.
        failing.store(1, Ordering::Relaxed);
        cfg_write(&io, 1, 0x04, 0);
        assert_eq!(bus.decoded_bar(1, 2), None);
        assert!(first.upgrade().is_some(), "released while a slot maps it");
        // Decoding on: the kept slot goes, then the new memory is mapped.
        cfg_write(&io, 1, 0x04, 2);
        assert!(first.upgrade().is_none(), "held after its last slot went");
        let second = Arc::downgrade(&dev.lock().unwrap().owner);
        dev.lock().unwrap().owner = Arc::new(());
        assert!(second.upgrade().is_some());
        cfg_write(&io, 1, 0x04, 0);
        assert!(second.upgrade().is_none());
        // And the bus going releases what it maps.
        cfg_write(&io, 1, 0x04, 2);
        let third = Arc::downgrade(&dev.lock().unwrap().owner);
        dev.lock().unwrap().owner = Arc::new(());
        drop((io, bus));
        assert!(third.upgrade().is_none());
    }

    #[test]
    fn absent_functions_and_odd_accesses_read_all_ones() {
        let (bus, _, dev) = setup();
        let io = PciConfigIo(bus.clone());
        assert_eq!(cfg_read(&io, 5, 0), 0xffff_ffff, "empty slot");
        io.pio_write(PioAddress(0xcf8), 0, &(0x8001_0800u32).to_le_bytes());
        let mut d = [0u8; 4];
        io.pio_read(PioAddress(0xcf8), 4, &mut d);
        assert_eq!(d, [0xff; 4], "bus 1 does not exist");
        assert_eq!(cfg_read(&io, 1, 0), 0x1110_1af4);
        // A 4-byte access at CONFIG_DATA+2 would cross the dword: refused.
        io.pio_write(PioAddress(0xcf8), 0, &(0x8000_0800u32).to_le_bytes());
        io.pio_read(PioAddress(0xcf8), 6, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Trapped BAR0 accesses reach the device with the offset in the BAR.
        let r = PciWindowRouter(bus.clone());
        let mut b = [0u8; 4];
        r.mmio_read(MmioAddress(layout::PCI_MMIO32_BASE), 0x10, &mut b);
        assert_eq!(b, [0x5a; 4]);
        r.mmio_read(MmioAddress(layout::PCI_MMIO32_BASE), 0x100, &mut b);
        assert_eq!(b, [0xff; 4], "past BAR0's 256 bytes");
        assert_eq!(dev.lock().unwrap().reads, vec![(0, 0x10)]);
    }
}
