//! The guest-physical address map of an intervm VM.
//!
//! ```text
//! 0x0000_0000 ..  RAM (low part, at most LOW_RAM_MAX)
//! 0xc000_0000 ..  0xfec0_0000  PCI 32-bit MMIO window
//! 0xfec0_0000     IOAPIC          0xfee0_0000  LAPIC
//! 0x1_0000_0000.. RAM (high part, the rest)
//! 0x10_0000_0000 .. +16 GiB     PCI 64-bit MMIO window
//! ports 0xc000 .. 0xffff         PCI I/O window
//! ```

/// Highest end of the low RAM part.
pub const LOW_RAM_MAX: u64 = 0xc000_0000;
/// Start of the high RAM part.
pub const HIGH_RAM_START: u64 = 0x1_0000_0000;
/// PCI 32-bit MMIO window base.
pub const PCI_MMIO32_BASE: u64 = 0xc000_0000;
/// PCI 32-bit MMIO window size (up to the IOAPIC).
pub const PCI_MMIO32_SIZE: u64 = 0xfec0_0000 - PCI_MMIO32_BASE;
/// PCI 64-bit MMIO window base (64 GiB).
pub const PCI_MMIO64_BASE: u64 = 0x10_0000_0000;
/// PCI 64-bit MMIO window size (16 GiB).
pub const PCI_MMIO64_SIZE: u64 = 0x4_0000_0000;
/// PCI I/O port window base.
pub const PCI_IO_BASE: u16 = 0xc000;
/// PCI I/O port window size.
pub const PCI_IO_SIZE: u16 = 0x4000;
/// IOAPIC MMIO base.
pub const IOAPIC_BASE: u64 = 0xfec0_0000;
/// LAPIC MMIO base.
pub const LAPIC_BASE: u64 = 0xfee0_0000;
/// Largest RAM size accepted (RAM must end below the 64-bit PCI window).
pub const MAX_RAM: u64 = LOW_RAM_MAX + (PCI_MMIO64_BASE - HIGH_RAM_START);
/// First IOAPIC pin used for PCI INTx (pins 16..23).
pub const PCI_INTX_FIRST_GSI: u32 = 16;
/// Number of IOAPIC pins.
pub const IOAPIC_PINS: u32 = 24;
/// COM1 I/O base and its IRQ.
pub const COM1_BASE: u16 = 0x3f8;
/// COM1 IRQ line (GSI).
pub const COM1_GSI: u32 = 4;

/// The RAM ranges `(guest address, length)` for `mem_size` bytes.
pub fn ram_ranges(mem_size: u64) -> Vec<(u64, u64)> {
    let low = mem_size.min(LOW_RAM_MAX);
    let mut v = vec![(0, low)];
    if mem_size > LOW_RAM_MAX {
        v.push((HIGH_RAM_START, mem_size - LOW_RAM_MAX));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_splits_around_the_pci_hole() {
        assert_eq!(ram_ranges(64 << 20), vec![(0, 64 << 20)]);
        assert_eq!(
            ram_ranges(4 << 30),
            vec![(0, LOW_RAM_MAX), (HIGH_RAM_START, (4 << 30) - LOW_RAM_MAX)]
        );
        let max = ram_ranges(MAX_RAM);
        assert_eq!(max[1].0 + max[1].1, PCI_MMIO64_BASE);
    }
}
