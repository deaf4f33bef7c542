//! PCI configuration mechanism #1 (ports 0xCF8/0xCFC), BAR sizing and
//! MSI-X programming, all from CPL3.

use crate::arch::{inl, mmio_write32, outl};

/// A bus/device/function on bus 0.
#[derive(Clone, Copy)]
pub struct Bdf(pub u8, pub u8);

impl Bdf {
    fn addr(self, reg: u8) -> u32 {
        0x8000_0000 | ((self.0 as u32) << 11) | ((self.1 as u32) << 8) | (reg as u32 & 0xfc)
    }
    /// The 16-bit BDF number (bus 0).
    pub fn raw(self) -> u16 {
        ((self.0 as u16) << 3) | self.1 as u16
    }
    /// Reads a config dword.
    pub fn read(self, reg: u8) -> u32 {
        outl(0xcf8, self.addr(reg));
        inl(0xcfc)
    }
    /// Writes a config dword.
    pub fn write(self, reg: u8, v: u32) {
        outl(0xcf8, self.addr(reg));
        outl(0xcfc, v);
    }
    /// Vendor and device ID as `vendor << 16 | device`, or `None`.
    pub fn id(self) -> Option<u32> {
        let v = self.read(0);
        if v & 0xffff == 0xffff {
            None
        } else {
            Some(((v & 0xffff) << 16) | (v >> 16))
        }
    }
}

/// Calls `f` for every function present on bus 0.
pub fn for_each(mut f: impl FnMut(Bdf)) {
    for dev in 0..32u8 {
        let f0 = Bdf(dev, 0);
        if f0.id().is_none() {
            continue;
        }
        f(f0);
        if (f0.read(0x0c) >> 16) & 0x80 != 0 {
            for func in 1..8 {
                let b = Bdf(dev, func);
                if b.id().is_some() {
                    f(b);
                }
            }
        }
    }
}

/// Finds the first function with the given `vendor << 16 | device`.
pub fn find(id: u32) -> Option<Bdf> {
    find_nth(id, 0)
}

/// Finds the `n`-th function (from 0, in bus order) with the given
/// `vendor << 16 | device`.
pub fn find_nth(id: u32, n: usize) -> Option<Bdf> {
    let mut found = None;
    let mut seen = 0;
    for_each(|b| {
        if found.is_none() && b.id() == Some(id) {
            if seen == n {
                found = Some(b);
            }
            seen += 1;
        }
    });
    found
}

/// A decoded BAR.
#[derive(Clone, Copy, Default)]
pub struct Bar {
    /// Address the BAR holds now.
    pub addr: u64,
    /// Size found by sizing (0: not implemented).
    pub size: u64,
    /// I/O space BAR.
    pub io: bool,
    /// Occupies this slot and the next.
    pub is64: bool,
}

/// Sizes BAR `i` the way firmware does (decode off, write ones, read back,
/// restore). Returns a default `Bar` for the upper half of a 64-bit BAR.
pub fn size_bar(b: Bdf, i: u8) -> Bar {
    let reg = 0x10 + 4 * i;
    let cmd = b.read(0x04);
    b.write(0x04, cmd & !0x3);
    let orig = b.read(reg);
    b.write(reg, 0xffff_ffff);
    let lo = b.read(reg);
    b.write(reg, orig);
    let mut bar = Bar::default();
    if lo == 0 {
        b.write(0x04, cmd);
        return bar;
    }
    if orig & 1 == 1 {
        bar.io = true;
        bar.addr = (orig & !0x3) as u64;
        bar.size = (!(lo & !0x3)).wrapping_add(1) as u64 & 0xffff;
    } else {
        let mut mask = (lo & !0xf) as u64 | 0xffff_ffff_0000_0000;
        bar.addr = (orig & !0xf) as u64;
        if (orig >> 1) & 3 == 2 && i < 5 {
            bar.is64 = true;
            let hreg = reg + 4;
            let horig = b.read(hreg);
            b.write(hreg, 0xffff_ffff);
            let hi = b.read(hreg);
            b.write(hreg, horig);
            mask = ((hi as u64) << 32) | (lo & !0xf) as u64;
            bar.addr |= (horig as u64) << 32;
        }
        bar.size = (!mask).wrapping_add(1);
    }
    b.write(0x04, cmd);
    bar
}

/// Address of BAR `i` without sizing it.
pub fn bar_addr(b: Bdf, i: u8) -> u64 {
    let lo = b.read(0x10 + 4 * i);
    if lo & 1 == 1 {
        return (lo & !0x3) as u64;
    }
    let mut a = (lo & !0xf) as u64;
    if (lo >> 1) & 3 == 2 {
        a |= (b.read(0x14 + 4 * i) as u64) << 32;
    }
    a
}

/// Config offset of capability `id`, if present.
pub fn find_cap(b: Bdf, id: u8) -> Option<u8> {
    if (b.read(0x04) >> 16) & 0x10 == 0 {
        return None;
    }
    let mut ptr = (b.read(0x34) & 0xfc) as u8;
    let mut guard = 0;
    while ptr != 0 && guard < 48 {
        let v = b.read(ptr);
        if (v & 0xff) as u8 == id {
            return Some(ptr);
        }
        ptr = ((v >> 8) & 0xfc) as u8;
        guard += 1;
    }
    None
}

/// Bitmap of the capability IDs (0..63) in the list.
pub fn cap_bitmap(b: Bdf) -> u64 {
    let mut map = 0u64;
    if (b.read(0x04) >> 16) & 0x10 == 0 {
        return 0;
    }
    let mut ptr = (b.read(0x34) & 0xfc) as u8;
    let mut guard = 0;
    while ptr != 0 && guard < 48 {
        let v = b.read(ptr);
        map |= 1u64 << ((v & 0x3f) as u64);
        ptr = ((v >> 8) & 0xfc) as u8;
        guard += 1;
    }
    map
}

/// Programs the first `vectors` MSI-X entries to IDT vectors
/// `base..base+vectors` on APIC 0, unmasks them and enables MSI-X.
/// Returns the table size, or `None` without an MSI-X capability.
pub fn enable_msix(b: Bdf, vectors: u32, base: u8) -> Option<u32> {
    let cap = find_cap(b, 0x11)?;
    let ctrl = b.read(cap) >> 16;
    let table_size = (ctrl & 0x7ff) + 1;
    let tbl = b.read(cap + 4);
    let table = bar_addr(b, (tbl & 7) as u8) + (tbl & !7) as u64;
    // Memory decode and bus mastering on, INTx off.
    b.write(0x04, (b.read(0x04) & 0xffff) | 0x6 | 0x400);
    for v in 0..vectors.min(table_size) {
        let e = table + 16 * v as u64;
        mmio_write32(e, 0xfee0_0000);
        mmio_write32(e + 4, 0);
        mmio_write32(e + 8, base as u32 + v);
        mmio_write32(e + 12, 0);
    }
    // Enable (bit 15), function mask off (bit 14).
    let new_ctrl = (ctrl | 0x8000) & !0x4000;
    b.write(cap, (b.read(cap) & 0xffff) | (new_ctrl << 16));
    Some(table_size)
}
