//! VM boot time on real /dev/kvm.
//!
//! - `create_to_cpl3`: `Vm::new` (KVM VM, irqchip, RAM, vCPU, devices) +
//!   loading the probe + starting the vCPU thread, until the probe's first
//!   CPL3 code marks the boot-info page `Running` (after its CPL0 setup,
//!   which PVM emulates instruction by instruction).
//! - `create_to_exit`: the same through the `Hello` workload to power-off.

use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion};
use intervm_protocol::probe::{BootInfo, State, Workload};
use vmm_core::{boot::probe, devices::serial::SerialOutput, Vm, VmConfig};

fn boot(until_exit: bool) -> Duration {
    let t = Instant::now();
    let mut cfg = VmConfig::new("bench", 32 << 20);
    cfg.serial = SerialOutput::Sink;
    let vm = Vm::new(&cfg).expect("VM");
    probe::load(
        &vm,
        probe_image::PROBE_ELF,
        &BootInfo::new(Workload::Hello, 0, 0),
    )
    .expect("probe");
    let running = vm.start().expect("start");
    if until_exit {
        running.wait_timeout(Duration::from_secs(60)).expect("exit");
    } else {
        assert!(probe::wait_state(
            running.vm().memory(),
            State::Running,
            Duration::from_secs(60)
        ));
    }
    let d = t.elapsed();
    drop(running);
    d
}

fn bench(c: &mut Criterion) {
    if let Some(why) = vmm_core::host::kvm_unavailable_reason() {
        eprintln!("SKIPPED vm_boot: {why}");
        return;
    }
    let mut g = c.benchmark_group("vm_boot");
    g.sample_size(20);
    g.bench_function("create_to_cpl3", |b| {
        b.iter_custom(|n| (0..n).map(|_| boot(false)).sum())
    });
    g.bench_function("create_to_exit", |b| {
        b.iter_custom(|n| (0..n).map(|_| boot(true)).sum())
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
