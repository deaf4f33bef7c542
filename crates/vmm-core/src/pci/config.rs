//! A type-0 PCI configuration space: header, BARs and a capability list.
//!
//! Writes go through per-register write masks, so BAR sizing (write
//! all-ones, read back) and read-only fields behave as on hardware without
//! special cases. The space is 256 bytes; extended config space reads as 0.

/// Number of BAR slots in a type-0 header.
pub const NUM_BARS: usize = 6;

/// Command register bits.
pub mod command {
    /// I/O space decode.
    pub const IO: u16 = 1 << 0;
    /// Memory space decode.
    pub const MEMORY: u16 = 1 << 1;
    /// Bus mastering.
    pub const BUS_MASTER: u16 = 1 << 2;
    /// INTx disable.
    pub const INTX_DISABLE: u16 = 1 << 10;
}

/// What a BAR decodes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BarKind {
    /// I/O ports.
    Io,
    /// 32-bit memory.
    Mem32,
    /// 64-bit memory (uses this slot and the next).
    Mem64 {
        /// Prefetchable.
        prefetchable: bool,
    },
}

/// One BAR's static description.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarSpec {
    /// Kind of BAR.
    pub kind: BarKind,
    /// Size in bytes: a power of two, at least 16 (4 for I/O).
    pub size: u64,
}

/// Identity of a function: the read-only header fields.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciIds {
    /// Vendor ID.
    pub vendor: u16,
    /// Device ID.
    pub device: u16,
    /// Subsystem vendor ID.
    pub subsystem_vendor: u16,
    /// Subsystem ID.
    pub subsystem: u16,
    /// Revision.
    pub revision: u8,
    /// Class code: base class << 16 | subclass << 8 | prog-if.
    pub class: u32,
}

/// A configuration space.
#[derive(Clone, Debug)]
pub struct PciConfiguration {
    regs: [u32; 64],
    wmask: [u32; 64],
    bars: [Option<BarSpec>; NUM_BARS],
    last_cap: Option<u8>,
    next_cap: u8,
}

impl PciConfiguration {
    /// A header with the given IDs, INTx pin (0 = none, 1 = INTA#) and no BARs.
    pub fn new(ids: PciIds, interrupt_pin: u8) -> Self {
        let mut c = Self {
            regs: [0; 64],
            wmask: [0; 64],
            bars: [None; NUM_BARS],
            last_cap: None,
            next_cap: 0x40,
        };
        c.regs[0] = ids.vendor as u32 | (ids.device as u32) << 16;
        c.regs[2] = ids.revision as u32 | ids.class << 8;
        c.regs[11] = ids.subsystem_vendor as u32 | (ids.subsystem as u32) << 16;
        c.regs[15] = (interrupt_pin as u32) << 8;
        let cmd_mask =
            (command::IO | command::MEMORY | command::BUS_MASTER | command::INTX_DISABLE) as u32;
        c.wmask[1] = cmd_mask;
        // Interrupt line is a scratch byte for the OS.
        c.wmask[15] = 0xff;
        c
    }

    /// Declares BAR `index`. Returns `None` if the slot is taken, out of
    /// range, or the size is not a power of two.
    pub fn add_bar(&mut self, index: usize, spec: BarSpec) -> Option<()> {
        let min = if spec.kind == BarKind::Io { 4 } else { 16 };
        let wide = matches!(spec.kind, BarKind::Mem64 { .. });
        if index >= NUM_BARS
            || (wide && index + 1 >= NUM_BARS)
            || !spec.size.is_power_of_two()
            || spec.size < min
        {
            return None;
        }
        if self.bars[index].is_some()
            || (wide && self.bars[index + 1].is_some())
            || self.is_upper_half(index)
        {
            return None;
        }
        if spec.kind == BarKind::Io && spec.size > 0x1_0000
            || spec.kind == BarKind::Mem32 && spec.size > 1 << 31
        {
            return None;
        }
        let reg = 4 + index;
        let mask = !(spec.size - 1);
        match spec.kind {
            BarKind::Io => {
                self.regs[reg] = 1;
                self.wmask[reg] = mask as u32 & !0x3;
            }
            BarKind::Mem32 => {
                self.regs[reg] = 0;
                self.wmask[reg] = mask as u32 & !0xf;
            }
            BarKind::Mem64 { prefetchable } => {
                self.regs[reg] = 0x4 | if prefetchable { 0x8 } else { 0 };
                self.wmask[reg] = mask as u32 & !0xf;
                self.regs[reg + 1] = 0;
                self.wmask[reg + 1] = (mask >> 32) as u32;
            }
        }
        self.bars[index] = Some(spec);
        Some(())
    }

    fn is_upper_half(&self, index: usize) -> bool {
        index > 0
            && matches!(
                self.bars[index - 1],
                Some(BarSpec {
                    kind: BarKind::Mem64 { .. },
                    ..
                })
            )
    }

    /// The BAR declared at `index`.
    pub fn bar_spec(&self, index: usize) -> Option<BarSpec> {
        self.bars.get(index).copied().flatten()
    }

    /// The address BAR `index` currently holds (flag bits removed).
    pub fn bar_address(&self, index: usize) -> Option<u64> {
        let spec = self.bar_spec(index)?;
        let lo = self.regs[4 + index];
        Some(match spec.kind {
            BarKind::Io => (lo & !0x3) as u64,
            BarKind::Mem32 => (lo & !0xf) as u64,
            BarKind::Mem64 { .. } => (lo & !0xf) as u64 | (self.regs[5 + index] as u64) << 32,
        })
    }

    /// Sets BAR `index`'s address (as firmware would).
    pub fn set_bar_address(&mut self, index: usize, addr: u64) {
        let Some(spec) = self.bar_spec(index) else {
            return;
        };
        let reg = 4 + index;
        let flags = self.regs[reg] & if spec.kind == BarKind::Io { 0x3 } else { 0xf };
        self.regs[reg] = (addr as u32 & self.wmask[reg]) | flags;
        if matches!(spec.kind, BarKind::Mem64 { .. }) {
            self.regs[reg + 1] = (addr >> 32) as u32 & self.wmask[reg + 1];
        }
    }

    /// The command register.
    pub fn command(&self) -> u16 {
        self.regs[1] as u16
    }

    /// Sets command-register bits (firmware-style enable).
    pub fn set_command(&mut self, v: u16) {
        self.regs[1] = (self.regs[1] & 0xffff_0000) | (v as u32 & self.wmask[1]);
    }

    /// The interrupt line register.
    pub fn interrupt_line(&self) -> u8 {
        self.regs[15] as u8
    }

    /// Sets the interrupt line register.
    pub fn set_interrupt_line(&mut self, line: u8) {
        self.regs[15] = (self.regs[15] & !0xff) | line as u32;
    }

    /// The interrupt pin (0 = none).
    pub fn interrupt_pin(&self) -> u8 {
        (self.regs[15] >> 8) as u8
    }

    /// Sets the read-only interrupt-status bit (status bit 3).
    pub fn set_interrupt_status(&mut self, on: bool) {
        if on {
            self.regs[1] |= 1 << 19;
        } else {
            self.regs[1] &= !(1 << 19);
        }
    }

    /// Appends a capability. `body` starts after the ID and next-pointer
    /// bytes; `wmask` (same length) marks guest-writable bits. Returns the
    /// capability's config offset.
    pub fn add_capability(&mut self, id: u8, body: &[u8], wmask: &[u8]) -> Option<u8> {
        let len = 2 + body.len();
        let off = self.next_cap as usize;
        if body.len() != wmask.len() || off + len > 256 {
            return None;
        }
        self.write_byte_raw(off, id);
        self.write_byte_raw(off + 1, 0);
        for (i, (&b, &m)) in body.iter().zip(wmask).enumerate() {
            self.write_byte_raw(off + 2 + i, b);
            let reg = (off + 2 + i) / 4;
            let shift = ((off + 2 + i) % 4) * 8;
            self.wmask[reg] |= (m as u32) << shift;
        }
        match self.last_cap {
            Some(prev) => self.write_byte_raw(prev as usize + 1, off as u8),
            None => {
                self.regs[13] = off as u32;
                self.regs[1] |= 1 << 20;
            }
        }
        self.last_cap = Some(off as u8);
        self.next_cap = ((off + len + 3) & !3) as u8;
        Some(off as u8)
    }

    fn write_byte_raw(&mut self, off: usize, v: u8) {
        let shift = (off % 4) * 8;
        self.regs[off / 4] = (self.regs[off / 4] & !(0xff << shift)) | (v as u32) << shift;
    }

    /// Reads the dword register `reg` (0..1024; above 63 reads 0).
    pub fn read_reg(&self, reg: usize) -> u32 {
        self.regs.get(reg).copied().unwrap_or(0)
    }

    /// Reads `len` (1, 2, 4) bytes at byte offset `off`.
    pub fn read(&self, off: usize, len: usize) -> u32 {
        let v = self.read_reg(off / 4) >> ((off % 4) * 8);
        match len {
            1 => v & 0xff,
            2 => v & 0xffff,
            _ => v,
        }
    }

    /// Writes `data` at byte offset `off` through the write masks. Returns
    /// the dword register index written, or `None` if nothing was written.
    pub fn write(&mut self, off: usize, data: &[u8]) -> Option<usize> {
        let reg = off / 4;
        let shift = (off % 4) * 8;
        if reg >= 64 || data.is_empty() || data.len() > 4 || off % 4 + data.len() > 4 {
            return None;
        }
        let mut v = 0u32;
        for (i, b) in data.iter().enumerate() {
            v |= (*b as u32) << (8 * i);
        }
        let width_mask = if data.len() == 4 {
            u32::MAX
        } else {
            ((1u32 << (8 * data.len())) - 1) << shift
        };
        let mask = self.wmask[reg] & width_mask;
        self.regs[reg] = (self.regs[reg] & !mask) | ((v << shift) & mask);
        Some(reg)
    }

    /// Index of the BAR whose (low or high) register is `reg`.
    pub fn bar_of_reg(&self, reg: usize) -> Option<usize> {
        if !(4..10).contains(&reg) {
            return None;
        }
        let i = reg - 4;
        if self.bars[i].is_some() {
            Some(i)
        } else if self.is_upper_half(i) {
            Some(i - 1)
        } else {
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids() -> PciIds {
        PciIds {
            vendor: 0x1af4,
            device: 0x1110,
            subsystem_vendor: 0x1af4,
            subsystem: 0x1100,
            revision: 1,
            class: 0x050000,
        }
    }

    #[test]
    fn ids_and_readonly_fields() {
        let mut c = PciConfiguration::new(ids(), 1);
        assert_eq!(c.read(0, 4), 0x1110_1af4);
        c.write(0, &[0, 0, 0, 0]);
        assert_eq!(c.read(0, 2), 0x1af4, "vendor is read-only");
        assert_eq!(c.read(0x3d, 1), 1);
        c.write(0x3c, &[11]);
        assert_eq!(c.interrupt_line(), 11);
    }

    #[test]
    fn bar_sizing_reads_back_the_size_mask() {
        let mut c = PciConfiguration::new(ids(), 0);
        c.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mem32,
                size: 256,
            },
        )
        .unwrap();
        c.add_bar(
            2,
            BarSpec {
                kind: BarKind::Mem64 { prefetchable: true },
                size: 1 << 32,
            },
        )
        .unwrap();
        c.write(0x10, &u32::MAX.to_le_bytes());
        assert_eq!(c.read(0x10, 4), 0xffff_ff00);
        c.write(0x18, &u32::MAX.to_le_bytes());
        c.write(0x1c, &u32::MAX.to_le_bytes());
        assert_eq!(
            c.read(0x18, 4),
            0x0000_000c,
            "64-bit prefetchable, 4 GiB: low bits all zero"
        );
        assert_eq!(c.read(0x1c, 4), 0xffff_ffff);
        c.set_bar_address(2, 0x10_0000_0000);
        assert_eq!(c.bar_address(2), Some(0x10_0000_0000));
        assert_eq!(c.bar_of_reg(7), Some(2));
        assert_eq!(c.bar_of_reg(5), None);
    }

    #[test]
    fn bad_bars_are_refused() {
        let mut c = PciConfiguration::new(ids(), 0);
        assert!(c
            .add_bar(
                0,
                BarSpec {
                    kind: BarKind::Mem32,
                    size: 100
                }
            )
            .is_none());
        assert!(c
            .add_bar(
                5,
                BarSpec {
                    kind: BarKind::Mem64 {
                        prefetchable: false
                    },
                    size: 4096
                }
            )
            .is_none());
        c.add_bar(
            0,
            BarSpec {
                kind: BarKind::Mem64 {
                    prefetchable: false,
                },
                size: 4096,
            },
        )
        .unwrap();
        assert!(
            c.add_bar(
                1,
                BarSpec {
                    kind: BarKind::Mem32,
                    size: 4096
                }
            )
            .is_none(),
            "upper half is taken"
        );
    }

    #[test]
    fn capabilities_chain_and_respect_masks() {
        let mut c = PciConfiguration::new(ids(), 0);
        let a = c
            .add_capability(
                0x11,
                &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                &[0, 0xc0, 0, 0, 0, 0, 0, 0, 0, 0],
            )
            .unwrap();
        let b = c.add_capability(0x09, &[0, 0], &[0, 0]).unwrap();
        assert_eq!(a, 0x40);
        assert_eq!(c.read(0x34, 1), 0x40);
        assert_eq!(c.read(a as usize + 1, 1), b as u32);
        assert_ne!(c.read(0x06, 2) & 0x10, 0, "capability list bit");
        c.write(a as usize + 2, &[0xff, 0xff]);
        assert_eq!(c.read(a as usize + 2, 2), 0xc000);
        assert!(
            c.write(0x3e, &[1, 2, 3, 4]).is_none(),
            "unaligned crossing write refused"
        );
    }
}
