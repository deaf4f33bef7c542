//! [`Workload::Chaos`](intervm_protocol::probe::Workload::Chaos): a hostile
//! guest. Every access is random: which PCI function, config offset, BAR,
//! offset in it, width and value; port-I/O registers; doorbells to any
//! peer and vector; words of its shared regions. Interrupts stay off (the
//! MSI-X capability's control word is left alone, so no random vector can
//! reach this guest's IDT), so the guest itself survives to the end: what
//! is tested is that the VMM, and every other VM, does.

use crate::{arch, arg, pci, set_result};
use intervm_protocol::ivshmem;
use intervm_protocol::probe::{chaos_args as a, results, EXIT_OK};

/// xorshift64*: small, and the same sequence for the same seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// The PCI windows the VMM decodes; MMIO is aimed only inside them (the
/// probe's page tables map them, and nothing outside is a device).
const WINDOWS: [(u64, u64); 2] = [(0xc000_0000, 0xfec0_0000), (0x10_0000_0000, 0x14_0000_0000)];

fn in_window(addr: u64, len: u64) -> bool {
    WINDOWS
        .iter()
        .any(|&(lo, hi)| addr >= lo && addr.saturating_add(len) <= hi)
}

pub fn run() -> u32 {
    // Spread the seed (splitmix64's constant) so that nearby seeds give
    // unrelated sequences; xorshift needs a non-zero state.
    let mut rng = Rng(arg(a::SEED).wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1);
    let ops = arg(a::OPS);
    let port_base = arg(a::PORT_BASE) as u16;
    let mut funcs = [pci::Bdf(0, 0); 16];
    let mut n = 0;
    pci::for_each(|b| {
        if n < funcs.len() {
            funcs[n] = b;
            n += 1;
        }
    });
    set_result(results::CHAOS_FUNCTIONS, n as u64);
    // Command and BAR registers as firmware left them: put back now and
    // then, so that accesses keep reaching devices after random config
    // writes moved their BARs away.
    let mut saved = [[0u32; 7]; 16];
    for (i, f) in funcs[..n].iter().enumerate() {
        saved[i][0] = f.read(0x04);
        for bar in 0..6u8 {
            saved[i][1 + bar as usize] = f.read(0x10 + 4 * bar);
        }
    }
    let restore = || {
        for (i, f) in funcs[..n].iter().enumerate() {
            for bar in 0..6u8 {
                f.write(0x10 + 4 * bar, saved[i][1 + bar as usize]);
            }
            f.write(0x04, saved[i][0]);
        }
    };
    let ivshmem_id = ((ivshmem::VENDOR as u32) << 16) | ivshmem::DEVICE as u32;
    let mut skipped = 0u64;
    for done in 0..ops {
        set_result(results::CHAOS_OPS, done + 1);
        if done % 128 == 127 {
            restore();
        }
        let f = funcs[rng.below(n as u64) as usize];
        let v = rng.next();
        match rng.below(8) {
            // Config space: any dword but the MSI-X control word.
            0 => {
                let reg = (rng.below(64) * 4) as u8;
                let msix = pci::find_cap(f, 0x11);
                if msix == Some(reg) {
                    skipped += 1;
                } else {
                    f.write(reg, v as u32);
                }
            }
            // A BAR: read or write at any offset in its first page, at
            // any width, if it sits inside a PCI window.
            1..=3 => {
                let bar = rng.below(6) as u8;
                let lo = f.read(0x10 + 4 * bar);
                let off = rng.below(4096) & !7;
                if lo & 1 == 1 {
                    let port = ((lo & !3) as u64 + (off & 0xff)) as u16;
                    if port >= 0xc000 {
                        arch::outl(port, v as u32);
                    } else {
                        skipped += 1;
                    }
                    continue;
                }
                let addr = pci::bar_addr(f, bar).wrapping_add(off);
                if lo == 0 || !in_window(addr, 8) {
                    skipped += 1;
                    continue;
                }
                match rng.below(4) {
                    0 => arch::mmio_write32(addr, v as u32),
                    1 => {
                        let _ = arch::mmio_read32(addr);
                    }
                    2 => {
                        let _ = arch::read64(addr);
                    }
                    // SAFETY: inside a PCI window, which the probe's page
                    // tables map; a device (or nothing) answers.
                    _ => unsafe { core::ptr::write_volatile(addr as *mut u8, v as u8) },
                }
            }
            // Doorbells to any peer and vector.
            4 => match f.id() {
                Some(id) if id == ivshmem_id => {
                    let bar0 = pci::bar_addr(f, ivshmem::REGS_BAR as u8);
                    if in_window(bar0, 16) {
                        arch::mmio_write32(bar0 + ivshmem::DOORBELL, v as u32);
                    } else {
                        skipped += 1;
                    }
                }
                _ => skipped += 1,
            },
            // The port-I/O block: any register, any width.
            5 if port_base != 0 => {
                let port = port_base + rng.below(0x40) as u16;
                match rng.below(5) {
                    0 => arch::outb(port, v as u8),
                    1 => arch::outw(port, v as u16),
                    2 => arch::outl(port, v as u32),
                    3 => {
                        let _ = arch::inl(port);
                    }
                    _ => {
                        let _ = arch::inb(port);
                    }
                }
            }
            // A word of a shared region (BAR2 of an ivshmem function),
            // ring indices and headers included.
            _ => match f.id() {
                Some(id) if id == ivshmem_id => {
                    let bar2 = pci::bar_addr(f, ivshmem::SHM_BAR as u8);
                    let at = bar2.wrapping_add(rng.below(1 << 20) & !7);
                    if bar2 != 0 && in_window(at, 8) {
                        // SAFETY: inside a PCI window (mapped); the
                        // region, if it is still there, is shared memory.
                        unsafe { core::ptr::write_volatile(at as *mut u64, v) };
                    } else {
                        skipped += 1;
                    }
                }
                _ => skipped += 1,
            },
        }
    }
    restore();
    set_result(results::CHAOS_SKIPPED, skipped);
    EXIT_OK
}
