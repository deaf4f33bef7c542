//! The Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI finds its CPUs, its IOAPIC and where ISA and PCI interrupts go.
//!
//! Linux looks for the floating pointer in the BIOS area (`0xf0000` ..
//! `0x100000`) among other places, so the table lives there;
//! [`MPTABLE_GPA`] .. [`MPTABLE_END`] must be reserved in the e820 map.
//!
//! Interrupt routing written here matches the rest of vmm-core: ISA IRQ n is
//! IOAPIC pin n (IRQ 0, the PIT, is pin 2 as on PCs), and INTA# of PCI slot
//! `d` is pin `16 + d % 8` (see [`crate::pci::PciBus::add_device`]).
//!
//! PCI INTx is level-triggered and active-low by the bus's rules. PVM never
//! injects level-triggered IOAPIC interrupts, so there the table declares
//! the PCI pins edge-triggered, active-high ([`PciIntx::Edge`]): vmm-core's
//! INTx lines go up once per assertion, and a guest that reads the device's
//! status (which lowers the line) before the next one loses nothing.

use vm_memory::{Bytes, GuestAddress};

use crate::layout;
use crate::memory::GuestMemoryMmap;
use crate::{Error, Result};

/// Where the floating pointer starts (the BIOS ROM area of a PC).
pub const MPTABLE_GPA: u64 = 0xf0000;
/// End of the area the table may use (1 MiB).
pub const MPTABLE_END: u64 = 0x10_0000;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
// Linux matches a PCI device's bus number against the MP bus ID, so the
// PCI bus (bus 0) must have ID 0.
const PCI_BUS: u8 = 0;
const ISA_BUS: u8 = 1;
const IOAPIC_ID_BASE: u8 = 0xf0;
/// Most vCPUs the MP table describes: APIC IDs below the IOAPIC's.
pub const MAX_VCPUS: u8 = IOAPIC_ID_BASE - 1;

// Entry types.
const PROCESSOR: u8 = 0;
const BUS: u8 = 1;
const IOAPIC: u8 = 2;
const IO_INTERRUPT: u8 = 3;
const LOCAL_INTERRUPT: u8 = 4;

// Interrupt types.
const INT: u8 = 0;
const NMI: u8 = 1;
const EXTINT: u8 = 3;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

fn processor(apic_id: u8, bsp: bool) -> [u8; 20] {
    let mut e = [0u8; 20];
    e[0] = PROCESSOR;
    e[1] = apic_id;
    e[2] = APIC_VERSION;
    e[3] = 1 | if bsp { 2 } else { 0 }; // enabled, bootstrap
    e[4..8].copy_from_slice(&0x600u32.to_le_bytes()); // family 6 signature
    e[8..12].copy_from_slice(&0x201u32.to_le_bytes()); // FPU, APIC
    e
}

fn bus(id: u8, name: &[u8; 6]) -> [u8; 8] {
    let mut e = [0u8; 8];
    e[0] = BUS;
    e[1] = id;
    e[2..8].copy_from_slice(name);
    e
}

fn ioapic(id: u8) -> [u8; 8] {
    let mut e = [0u8; 8];
    e[0] = IOAPIC;
    e[1] = id;
    e[2] = 0x11; // IOAPIC version
    e[3] = 1; // usable
    e[4..8].copy_from_slice(&(layout::IOAPIC_BASE as u32).to_le_bytes());
    e
}

/// How PCI INTx pins are declared.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciIntx {
    /// As the PCI bus defines them: level-triggered, active-low.
    Level,
    /// Edge-triggered, active-high (for PVM; see the module docs).
    Edge,
}

/// Entry flags: polarity in bits 0-1, trigger mode in bits 2-3.
const FLAGS_CONFORM: u16 = 0;
const FLAGS_EDGE_HIGH: u16 = 0b01 | 0b01 << 2;

/// An I/O interrupt entry; `flags` 0 means "conforms to the bus"
/// (edge/high for ISA, level/low for PCI).
fn io_interrupt(kind: u8, flags: u16, bus: u8, source: u8, apic: u8, pin: u8) -> [u8; 8] {
    let f = flags.to_le_bytes();
    [IO_INTERRUPT, kind, f[0], f[1], bus, source, apic, pin]
}

fn local_interrupt(kind: u8, lint: u8) -> [u8; 8] {
    // Destination 0xff: every local APIC.
    [LOCAL_INTERRUPT, kind, 0, 0, ISA_BUS, 0, 0xff, lint]
}

/// Builds the floating pointer and configuration table for `cpus` vCPUs
/// (APIC IDs `0..cpus`), as they sit at [`MPTABLE_GPA`].
pub fn build(cpus: u8, intx: PciIntx) -> Result<Vec<u8>> {
    if cpus == 0 || cpus as u16 >= IOAPIC_ID_BASE as u16 {
        return Err(Error::InvalidArgument(format!(
            "MP table for {cpus} CPUs (1..{IOAPIC_ID_BASE})"
        )));
    }
    let ioapic_id = IOAPIC_ID_BASE;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    let mut push = |e: &[u8]| {
        entries.extend_from_slice(e);
        count += 1;
    };
    for id in 0..cpus {
        push(&processor(id, id == 0));
    }
    push(&bus(PCI_BUS, b"PCI   "));
    push(&bus(ISA_BUS, b"ISA   "));
    push(&ioapic(ioapic_id));
    // ISA IRQs: 0 (the PIT) arrives on pin 2, the others on their own pin.
    for irq in 0..16u8 {
        if irq == 2 {
            continue;
        }
        let pin = if irq == 0 { 2 } else { irq };
        push(&io_interrupt(
            INT,
            FLAGS_CONFORM,
            ISA_BUS,
            irq,
            ioapic_id,
            pin,
        ));
    }
    // PCI: source = device << 2 | pin (0 = INTA#); only INTA# is wired.
    let pci_flags = match intx {
        PciIntx::Level => FLAGS_CONFORM,
        PciIntx::Edge => FLAGS_EDGE_HIGH,
    };
    for dev in 1..32u8 {
        let pin = layout::PCI_INTX_FIRST_GSI as u8 + dev % 8;
        push(&io_interrupt(
            INT,
            pci_flags,
            PCI_BUS,
            dev << 2,
            ioapic_id,
            pin,
        ));
    }
    push(&local_interrupt(EXTINT, 0));
    push(&local_interrupt(NMI, 1));

    const FLOATING_LEN: usize = 16;
    const HEADER_LEN: usize = 44;
    let table_gpa = MPTABLE_GPA + FLOATING_LEN as u64;
    let table_len = HEADER_LEN + entries.len();

    let mut header = [0u8; HEADER_LEN];
    header[0..4].copy_from_slice(b"PCMP");
    header[4..6].copy_from_slice(&(table_len as u16).to_le_bytes());
    header[6] = SPEC_REV;
    header[8..16].copy_from_slice(b"INTERVM ");
    header[16..28].copy_from_slice(b"VMM-CORE    ");
    header[34..36].copy_from_slice(&count.to_le_bytes());
    header[36..40].copy_from_slice(&(layout::LAPIC_BASE as u32).to_le_bytes());
    let mut table = header.to_vec();
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut floating = [0u8; FLOATING_LEN];
    floating[0..4].copy_from_slice(b"_MP_");
    floating[4..8].copy_from_slice(&(table_gpa as u32).to_le_bytes());
    floating[8] = 1; // length in 16-byte units
    floating[9] = SPEC_REV;
    floating[10] = checksum(&floating);

    let mut out = floating.to_vec();
    out.extend_from_slice(&table);
    if MPTABLE_GPA + out.len() as u64 > MPTABLE_END {
        return Err(Error::InvalidArgument(format!(
            "MP table for {cpus} CPUs needs {} bytes, more than fit below {MPTABLE_END:#x}",
            out.len()
        )));
    }
    Ok(out)
}

/// Writes the MP table for `cpus` vCPUs at [`MPTABLE_GPA`].
pub fn write(mem: &GuestMemoryMmap, cpus: u8, intx: PciIntx) -> Result<()> {
    let bytes = build(cpus, intx)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_GPA))
        .map_err(|e| Error::Load(format!("writing the MP table: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn floating_pointer_and_table_checksum_to_zero() {
        let t = build(2, PciIntx::Level).unwrap();
        assert_eq!(&t[0..4], b"_MP_");
        assert_eq!(sum(&t[0..16]), 0);
        let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
        assert_eq!(ptr, MPTABLE_GPA + 16);
        let table = &t[16..];
        assert_eq!(&table[0..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(sum(table), 0);
    }

    #[test]
    fn lists_every_cpu_once_with_one_bootstrap() {
        let t = build(3, PciIntx::Edge).unwrap();
        let table = &t[16..];
        let count = u16::from_le_bytes([table[34], table[35]]) as usize;
        let mut at = 44;
        let (mut cpus, mut bsp, mut pci_pins) = (vec![], 0, vec![]);
        for _ in 0..count {
            let len = if table[at] == PROCESSOR { 20 } else { 8 };
            if table[at] == PROCESSOR {
                cpus.push(table[at + 1]);
                bsp += (table[at + 3] & 2 != 0) as u32;
            }
            if table[at] == IO_INTERRUPT && table[at + 4] == PCI_BUS {
                pci_pins.push((table[at + 5] >> 2, table[at + 7]));
                assert_eq!(table[at + 2] as u16, FLAGS_EDGE_HIGH, "PCI pins as asked");
            }
            if table[at] == IO_INTERRUPT && table[at + 4] == ISA_BUS {
                assert_eq!(
                    table[at + 2] as u16,
                    FLAGS_CONFORM,
                    "ISA pins as the bus says"
                );
            }
            at += len;
        }
        assert_eq!(at, table.len());
        assert_eq!(cpus, vec![0, 1, 2]);
        assert_eq!(bsp, 1);
        assert!(pci_pins.contains(&(3, 16 + 3)));
        assert!(pci_pins.contains(&(9, 16 + 1)));
    }

    #[test]
    fn refuses_what_does_not_fit() {
        assert!(build(0, PciIntx::Level).is_err());
        assert!(build(IOAPIC_ID_BASE, PciIntx::Level).is_err());
        assert!(build(IOAPIC_ID_BASE - 1, PciIntx::Level).is_ok());
    }
}
