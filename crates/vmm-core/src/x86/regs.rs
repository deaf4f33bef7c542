//! Register state for entering a guest directly in 64-bit mode.

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress};

use super::gdt::{self, BOOT_GDT_GPA};
use crate::memory::GuestMemoryMmap;
use crate::{Error, Result};

const CR0_PE: u64 = 1;
const CR0_MP: u64 = 1 << 1;
const CR0_ET: u64 = 1 << 4;
const CR0_NE: u64 = 1 << 5;
const CR0_WP: u64 = 1 << 16;
const CR0_PG: u64 = 1 << 31;
const CR4_PAE: u64 = 1 << 5;
const CR4_OSFXSR: u64 = 1 << 9;
const CR4_OSXMMEXCPT: u64 = 1 << 10;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;
const EFER_SCE: u64 = 1;

/// Writes the boot GDT to guest memory.
pub fn write_boot_gdt(mem: &GuestMemoryMmap) -> Result<()> {
    for (i, e) in gdt::boot_gdt().iter().enumerate() {
        mem.write_obj(*e, GuestAddress(BOOT_GDT_GPA + 8 * i as u64))
            .map_err(|e| Error::Load(format!("writing GDT: {e}")))?;
    }
    Ok(())
}

/// Puts `vcpu` in 64-bit mode with paging (`cr3`), flat segments from the
/// boot GDT, SSE enabled, at `rip` with `rsp` and `rsi` (Linux's
/// boot_params pointer; the probe ignores it).
pub fn setup_long_mode(vcpu: &VcpuFd, cr3: u64, rip: u64, rsp: u64, rsi: u64) -> Result<()> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
    let g = gdt::boot_gdt();
    let code = gdt::kvm_segment_from(g[1], gdt::KERNEL_CS);
    let data = gdt::kvm_segment_from(g[2], gdt::KERNEL_DS);
    let tss = gdt::kvm_segment_from(g[3], gdt::BOOT_TSS);
    sregs.gdt.base = BOOT_GDT_GPA;
    sregs.gdt.limit = (std::mem::size_of_val(&g) - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    sregs.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_PG;
    sregs.cr3 = cr3;
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT;
    sregs.efer = EFER_LME | EFER_LMA | EFER_SCE;
    vcpu.set_sregs(&sregs)
        .map_err(Error::kvm("KVM_SET_SREGS"))?;

    let regs = kvm_regs {
        rip,
        rsp,
        rbp: rsp,
        rsi,
        rflags: 0x2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(Error::kvm("KVM_SET_REGS"))?;

    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(Error::kvm("KVM_SET_FPU"))?;
    Ok(())
}
