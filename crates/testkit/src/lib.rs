//! Test support shared by every intervm crate that boots guests on
//! `/dev/kvm` in its tests.
//!
//! The policy: a test that needs KVM calls [`require_kvm!`]. Under
//! `CI=true` a missing or unusable `/dev/kvm` fails the test loudly;
//! elsewhere the test prints why and returns (skips).
#![deny(missing_docs)]

use std::time::Duration;

use intervm_protocol::probe::{results, BootInfo};
use vmm_core::devices::serial::{SerialBuffer, SerialOutput};
use vmm_core::{boot::probe, RunningVm, Vm, VmConfig, VmExit};

/// Returns false (after printing why) when KVM is unusable and the test
/// should be skipped; panics instead under `CI=true`, where a missing
/// `/dev/kvm` must fail the run.
pub fn kvm_available() -> bool {
    match vmm_core::host::kvm_unavailable_reason() {
        None => true,
        Some(why) => {
            if std::env::var("CI").is_ok_and(|v| v == "true") {
                panic!("CI=true but KVM is unavailable: {why}");
            }
            eprintln!("SKIPPED: KVM is unavailable here ({why})");
            false
        }
    }
}

/// Skips the calling test when KVM is unavailable (see [`kvm_available`]).
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_available() {
            return;
        }
    };
}

/// Default guest RAM of a probe VM.
pub const PROBE_MEM: u64 = 32 << 20;

/// A probe VM with one vCPU, [`PROBE_MEM`] of RAM and its console captured.
pub fn probe_vm(name: &str, info: &BootInfo) -> (Vm, SerialBuffer) {
    probe_vm_with(name, info, 1, PROBE_MEM)
}

/// A probe VM with `vcpus` vCPUs (the probe runs on vCPU 0) and `mem` bytes.
pub fn probe_vm_with(name: &str, info: &BootInfo, vcpus: u8, mem: u64) -> (Vm, SerialBuffer) {
    let buf = SerialBuffer::new();
    let mut cfg = VmConfig::new(name, mem);
    cfg.vcpus = vcpus;
    cfg.serial = SerialOutput::Buffer(buf.clone());
    let vm = Vm::new(&cfg).expect("creating the VM");
    probe::load(&vm, probe_image::PROBE_ELF, info).expect("loading the probe");
    (vm, buf)
}

/// Generous bound for a probe run; PVM emulates every CPL0 instruction.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);

/// Runs a VM to completion (stopping it after [`RUN_TIMEOUT`]) and returns
/// its exit and the boot-info page as the guest left it.
pub fn run_to_exit(vm: Vm, console: &SerialBuffer) -> (VmExit, BootInfo) {
    let running = vm.start().expect("starting vCPUs");
    finish(running, console, RUN_TIMEOUT)
}

/// Waits for a started VM to exit (panicking with its console after
/// `timeout`) and returns its exit and boot-info page.
pub fn finish(running: RunningVm, console: &SerialBuffer, timeout: Duration) -> (VmExit, BootInfo) {
    let exit = running.wait_timeout(timeout);
    let info = probe::read_info(running.vm().memory()).expect("reading boot info");
    let exit = exit.unwrap_or_else(|| {
        panic!(
            "guest {} did not exit within {timeout:?}; console:\n{}",
            running.vm().name(),
            console.contents()
        )
    });
    drop(running);
    if let VmExit::Guest(code) = exit {
        if code & 0x100 != 0 && code < 0x200 {
            eprintln!(
                "probe exception: vector {} error {:#x} rip {:#x}",
                info.results[results::FAULT_VECTOR],
                info.results[results::FAULT_ERROR],
                info.results[results::FAULT_RIP]
            );
        }
    }
    (exit, info)
}
