//! Port-I/O exit round trip from guest CPL3 and CPL0 on real /dev/kvm.
//!
//! Each sample boots the probe guest with `PioRoundTrip` and `iters`
//! iterations; the time is the guest's own TSC delta around its `out` loop
//! (so VM boot is not included), converted with KVM's TSC frequency.

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use intervm_protocol::probe::{results, BootInfo, Workload};
use vmm_core::{boot::probe, devices::serial::SerialOutput, Vm, VmConfig};

fn run_probe(iters: u64) -> (Duration, Duration) {
    let mut info = BootInfo::new(Workload::PioRoundTrip, 0, 0);
    info.args[0] = iters;
    let mut cfg = VmConfig::new("bench", 16 << 20);
    cfg.serial = SerialOutput::Sink;
    let vm = Vm::new(&cfg).expect("VM");
    probe::load(&vm, probe_image::PROBE_ELF, &info).expect("probe");
    let running = vm.start().expect("start");
    running
        .wait_timeout(Duration::from_secs(600))
        .expect("probe finished");
    let info = probe::read_info(running.vm().memory()).expect("results");
    let khz = info.tsc_khz.max(1) as f64;
    let d = |c: u64| Duration::from_secs_f64(c as f64 / khz / 1000.0);
    (
        d(info.results[results::PIO_CPL3_CYCLES]),
        d(info.results[results::PIO_CPL0_CYCLES]),
    )
}

fn bench(c: &mut Criterion) {
    if let Some(why) = vmm_core::host::kvm_unavailable_reason() {
        eprintln!("SKIPPED vm_exits: {why}");
        return;
    }
    eprintln!("KVM flavour: {:?}", vmm_core::host::KvmFlavor::detect());
    let mut g = c.benchmark_group("pio_exit_round_trip");
    g.sample_size(20).measurement_time(Duration::from_secs(5));
    g.bench_function("cpl3_out", |b| b.iter_custom(|iters| run_probe(iters).0));
    g.bench_function("cpl0_out", |b| b.iter_custom(|iters| run_probe(iters).1));
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
