//! Helpers shared by the tests that boot real guests on /dev/kvm.
#![allow(dead_code, unused_imports)]

pub mod testdev;

pub use intervm_testkit::{finish, kvm_available, probe_vm, require_kvm, run_to_exit, RUN_TIMEOUT};

/// A probe VM with `vcpus` vCPUs and the default RAM.
pub fn probe_vm_with(
    name: &str,
    info: &intervm_protocol::probe::BootInfo,
    vcpus: u8,
) -> (vmm_core::Vm, vmm_core::devices::serial::SerialBuffer) {
    intervm_testkit::probe_vm_with(name, info, vcpus, intervm_testkit::PROBE_MEM)
}
