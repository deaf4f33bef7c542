//! CPUID for each vCPU: KVM's supported set with the vCPU's APIC ID.

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::{Error, Result};

/// KVM's supported CPUID, read once per VM.
pub fn supported(kvm: &Kvm) -> Result<CpuId> {
    kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))
}

/// Sets `base` on `vcpu`, patched with its APIC ID and the vCPU count.
pub fn configure(vcpu: &VcpuFd, base: &CpuId, id: u8, count: u8) -> Result<()> {
    let mut c = base.clone();
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (count as u32) << 16 | (id as u32) << 24;
                // Hypervisor present.
                e.ecx |= 1 << 31;
            }
            0xb | 0x1f => e.edx = id as u32,
            _ => {}
        }
    }
    vcpu.set_cpuid2(&c).map_err(Error::kvm("KVM_SET_CPUID2"))
}
