//! The probe guest on real /dev/kvm: boot, console, exit codes, faults, PIO.

mod common;

use intervm_protocol::probe::{results, BootInfo, Workload, EXIT_EXCEPTION_BASE, EXIT_OK};
use vmm_core::VmExit;

#[test]
fn probe_boots_prints_and_exits_with_its_code() {
    require_kvm!();
    let mut info = BootInfo::new(Workload::Hello, 0, 0);
    info.args[0] = 4242;
    let (vm, console) = common::probe_vm("hello", &info);
    let (exit, after) = common::run_to_exit(vm, &console);
    assert_eq!(
        exit,
        VmExit::Guest(EXIT_OK),
        "console:\n{}",
        console.contents()
    );
    assert!(
        console.contents().contains("hello from CPL3, tag 4242"),
        "console: {}",
        console.contents()
    );
    assert_eq!(after.state, intervm_protocol::probe::State::Done as u32);
}
