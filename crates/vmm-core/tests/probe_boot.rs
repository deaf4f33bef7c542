//! The probe guest on real /dev/kvm: boot, console, exit codes, faults, PIO.

mod common;
use common::require_kvm;

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

#[test]
fn pio_exits_round_trip_from_cpl3_and_cpl0() {
    require_kvm!();
    const N: u64 = 2000;
    let mut info = BootInfo::new(Workload::PioRoundTrip, 0, 0);
    info.args[0] = N;
    let (vm, console) = common::probe_vm("pio", &info);
    let ctl = vm.control().clone();
    let (exit, after) = common::run_to_exit(vm, &console);
    assert_eq!(
        exit,
        VmExit::Guest(EXIT_OK),
        "console:\n{}",
        console.contents()
    );
    let r = &after.results;
    assert_eq!(r[results::PIO_ITERATIONS], N);
    assert!(r[results::PIO_CPL3_CYCLES] > 0 && r[results::PIO_CPL0_CYCLES] > 0);
    let pio = ctl.stats.pio.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        pio >= 2 * N,
        "every out exits to the VMM: {pio} PIO exits for {} outs",
        2 * N
    );
    if after.tsc_khz > 0 {
        let us = |c: u64| c as f64 / after.tsc_khz as f64 * 1000.0 / N as f64;
        eprintln!(
            "PIO exit round trip: CPL3 {:.2} us, CPL0 {:.2} us ({} kHz TSC)",
            us(r[results::PIO_CPL3_CYCLES]),
            us(r[results::PIO_CPL0_CYCLES]),
            after.tsc_khz
        );
    }
}

#[test]
fn cpu_exceptions_at_cpl3_are_reported_with_vector_and_rip() {
    require_kvm!();
    for vector in [0u64, 13, 14] {
        let mut info = BootInfo::new(Workload::Fault, 0, 0);
        info.args[0] = vector;
        let (vm, console) = common::probe_vm("fault", &info);
        let (exit, after) = common::run_to_exit(vm, &console);
        assert_eq!(
            exit,
            VmExit::Guest(EXIT_EXCEPTION_BASE + vector as u32),
            "console:\n{}",
            console.contents()
        );
        assert_eq!(after.results[results::FAULT_VECTOR], vector);
        assert!(
            (0x10_0000..0x20_0000).contains(&after.results[results::FAULT_RIP]),
            "RIP inside the probe image"
        );
    }
}

#[test]
fn triple_fault_stops_the_vm_as_shutdown() {
    require_kvm!();
    let mut info = BootInfo::new(Workload::Fault, 0, 0);
    info.args[0] = 255;
    let (vm, console) = common::probe_vm("triple", &info);
    let (exit, _) = common::run_to_exit(vm, &console);
    assert_eq!(exit, VmExit::Shutdown, "console:\n{}", console.contents());
    assert_eq!(exit.status(), 129);
}

#[test]
fn host_stop_ends_a_halted_guest_and_an_idle_second_vcpu() {
    require_kvm!();
    // The probe enables MSI-X on the test device and halts at CPL0 waiting
    // for an interrupt that never comes, while vCPU 1 sits in wait-for-SIPI:
    // a host stop must kick both out of KVM_RUN.
    let mut info = BootInfo::new(Workload::MsixWait, 0, 0);
    let id = ((common::testdev::VENDOR as u64) << 16) | common::testdev::DEVICE as u64;
    info.args[..3].copy_from_slice(&[id, 1, 1]);
    let (vm, console) = common::probe_vm_with("stop", &info, 2);
    vm.add_pci_device(common::testdev::TestDevice::new(&vm, 1))
        .unwrap();
    let running = vm.start().unwrap();
    let mem = running.vm().memory().clone();
    assert!(
        vmm_core::boot::probe::wait_state(
            &mem,
            intervm_protocol::probe::State::Ready,
            common::RUN_TIMEOUT
        ),
        "console:\n{}",
        console.contents()
    );
    assert_eq!(
        running.wait_timeout(std::time::Duration::from_millis(100)),
        None,
        "still running"
    );
    running.stop();
    // Without the kick both vCPU threads would stay in KVM_RUN for ever;
    // the deadline only catches that (a loaded host may run them late).
    let (done, ended) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(running.join());
    });
    assert_eq!(
        ended.recv_timeout(common::RUN_TIMEOUT),
        Ok(VmExit::Stopped),
        "the vCPUs did not end after the stop"
    );
}

#[test]
fn unclaimed_ports_read_all_ones_and_are_counted() {
    require_kvm!();
    // PciScan reads config space of 31 absent slots through 0xCFC (all-ones),
    // a claimed range; the serial port is claimed too. Nothing here may crash.
    let (vm, console) = common::probe_vm("scan", &BootInfo::new(Workload::PciScan, 0, 0));
    let ctl = vm.control().clone();
    let (exit, after) = common::run_to_exit(vm, &console);
    assert_eq!(exit, VmExit::Guest(EXIT_OK));
    assert_eq!(after.results[results::PCI_COUNT], 1, "only the host bridge");
    assert_eq!(
        ctl.stats
            .unclaimed
            .load(std::sync::atomic::Ordering::Relaxed),
        0
    );
}

#[test]
fn bad_boot_info_is_refused_by_the_probe() {
    require_kvm!();
    let mut info = BootInfo::new(Workload::Hello, 0, 0);
    info.version = 99;
    let (vm, console) = common::probe_vm("badinfo", &info);
    let (exit, _) = common::run_to_exit(vm, &console);
    assert_eq!(
        exit,
        VmExit::Guest(intervm_protocol::probe::EXIT_BAD_BOOT_INFO)
    );
    assert!(console.contents().contains("bad boot info"));
}
