//! The boot GDT and the segment descriptors KVM wants in `kvm_sregs`.

use kvm_bindings::kvm_segment;

/// Guest address of the boot GDT.
pub const BOOT_GDT_GPA: u64 = 0x1000;
/// Selector of the 64-bit kernel code segment.
pub const KERNEL_CS: u16 = 0x08;
/// Selector of the kernel data segment.
pub const KERNEL_DS: u16 = 0x10;
/// Selector of the TSS (Linux's boot protocol wants a valid TR).
pub const BOOT_TSS: u16 = 0x18;

/// Builds a descriptor from flags (bits 52..55 | 40..47 as in the manuals), base and limit.
pub const fn descriptor(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0xffff)
        | ((limit as u64 & 0xf_0000) << 32)
        | ((flags as u64 & 0xf0ff) << 40)
}

/// The boot GDT: null, code64, data, TSS.
pub fn boot_gdt() -> [u64; 4] {
    [
        0,
        descriptor(0xa09b, 0, 0xfffff),
        descriptor(0xc093, 0, 0xfffff),
        descriptor(0x808b, 0, 0xfffff),
    ]
}

/// Decodes a GDT entry into the form `KVM_SET_SREGS` takes.
pub fn kvm_segment_from(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let mut limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = (entry >> 55) & 1;
    if g == 1 {
        limit = (limit << 12) | 0xfff;
    }
    kvm_segment {
        base,
        limit,
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g: g as u8,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 0 { 1 } else { 0 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code64_descriptor_decodes_to_a_long_mode_segment() {
        let g = boot_gdt();
        assert_eq!(g[1], 0x00af_9b00_0000_ffff);
        let cs = kvm_segment_from(g[1], KERNEL_CS);
        assert_eq!((cs.l, cs.db, cs.present, cs.s, cs.type_), (1, 0, 1, 1, 0xb));
        assert_eq!(cs.limit, 0xffff_ffff);
        let tss = kvm_segment_from(g[3], BOOT_TSS);
        assert_eq!((tss.s, tss.type_), (0, 0xb));
    }
}
