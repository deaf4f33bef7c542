//! Identity page tables for direct 64-bit entry.
//!
//! Maps `[0, 4 GiB)` and the 64-bit PCI window with 2 MiB pages, all
//! user-accessible and writable, so a guest that runs its workload at CPL3
//! (the probe) can reach RAM, BARs and the LAPIC/IOAPIC pages without
//! building page tables itself (every CPL0 instruction costs ~1 µs on PVM).

use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMemoryMmap;
use crate::{Error, Result};

/// Guest address of the PML4.
pub const PML4_GPA: u64 = 0x20000;
const PDPT_GPA: u64 = PML4_GPA + 0x1000;
const PD_GPA: u64 = PML4_GPA + 0x2000;
/// First byte after the page tables.
pub const PAGE_TABLES_END: u64 = PD_GPA + 0x1000 * (4 + (layout::PCI_MMIO64_SIZE >> 30));
// The tables must stay below the probe image at 1 MiB.
const _: () = assert!(PAGE_TABLES_END <= 0x10_0000);

const PRESENT: u64 = 1;
const WRITABLE: u64 = 2;
const USER: u64 = 4;
const HUGE: u64 = 1 << 7;

/// Writes the tables and returns the CR3 value.
pub fn write_identity_tables(mem: &GuestMemoryMmap) -> Result<u64> {
    let err = |e: vm_memory::GuestMemoryError| Error::Load(format!("writing page tables: {e}"));
    let flags = PRESENT | WRITABLE | USER;
    mem.write_obj(PDPT_GPA | flags, GuestAddress(PML4_GPA))
        .map_err(err)?;
    // PDPT entries 0..4 cover [0, 4 GiB); entries for the 64-bit window follow.
    let gib_ranges = (0..4u64).chain(
        (layout::PCI_MMIO64_BASE >> 30)
            ..((layout::PCI_MMIO64_BASE + layout::PCI_MMIO64_SIZE) >> 30),
    );
    for (k, gib) in gib_ranges.enumerate() {
        let pd = PD_GPA + 0x1000 * k as u64;
        mem.write_obj(pd | flags, GuestAddress(PDPT_GPA + 8 * gib))
            .map_err(err)?;
        let mut table = [0u64; 512];
        for (i, e) in table.iter_mut().enumerate() {
            *e = ((gib << 30) + ((i as u64) << 21)) | flags | HUGE;
        }
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(pd)).map_err(err)?;
    }
    Ok(PML4_GPA)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::memory::{create_ram, RamBacking};

    #[test]
    fn maps_low_4g_and_the_64bit_window() {
        let mem = create_ram(2 << 20, RamBacking::Anonymous).unwrap();
        let cr3 = write_identity_tables(&mem).unwrap();
        let pml4: u64 = mem.read_obj(GuestAddress(cr3)).unwrap();
        assert_eq!(pml4 & !0xfff, PDPT_GPA);
        let walk = |va: u64| -> u64 {
            let pdpte: u64 = mem
                .read_obj(GuestAddress(PDPT_GPA + 8 * (va >> 30)))
                .unwrap();
            assert_ne!(pdpte & PRESENT, 0, "PDPTE for {va:#x}");
            let pde: u64 = mem
                .read_obj(GuestAddress((pdpte & !0xfff) + 8 * ((va >> 21) & 511)))
                .unwrap();
            (pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff)
        };
        assert_eq!(walk(0x10_0000), 0x10_0000);
        assert_eq!(walk(0xfee0_00b0), 0xfee0_00b0);
        assert_eq!(
            walk(layout::PCI_MMIO64_BASE + 0x1234),
            layout::PCI_MMIO64_BASE + 0x1234
        );
    }
}
