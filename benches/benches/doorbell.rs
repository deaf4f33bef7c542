//! Shared memory with doorbells: doorbell latency on the in-kernel path
//! (ioeventfd -> irqfd) and through the VMM, and the time to move 4 KiB,
//! 2 MiB and 1 GiB through the ring with a doorbell per frame (the receiver
//! sleeps until rung). Times come from the guests' TSC.

use std::time::Duration;

use criterion::{criterion_group, BenchmarkId, Criterion};

use intervm_benches::runs::doorbell::*;

fn bench(c: &mut Criterion) {
    if let Some(why) = vmm_core::host::kvm_unavailable_reason() {
        eprintln!("SKIPPED doorbell: {why}");
        return;
    }
    let mut g = c.benchmark_group("doorbell_round_trip");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for (label, fast) in [("ioeventfd_irqfd", true), ("vmm_handler", false)] {
        g.bench_function(label, |b| {
            b.iter_custom(|iters| {
                ping_pong(iters.max(10), fast) * iters as u32 / iters.max(10) as u32
            })
        });
    }
    g.finish();
    // One ring message in flight, each side waiting on its doorbell
    // (always) or polling first (adaptive); one way = round trip / 2.
    let mut g = c.benchmark_group("doorbell_ring_one_way");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for mode in [Notify::Always, Notify::Adaptive] {
        for (bytes, size) in [(64u64, "64B"), (4096, "4KiB")] {
            g.bench_function(BenchmarkId::new(mode.name(), size), |b| {
                b.iter_custom(|iters| {
                    let n = iters.clamp(10, intervm_benches::runs::PING_PONG_MAX);
                    let pp = ring_ping_pong(bytes, n, mode);
                    Duration::from_secs_f64(intervm_benches::runs::one_way(&pp.ring) * iters as f64)
                })
            });
        }
    }
    g.finish();
    let mut g = c.benchmark_group("doorbell_transfer");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for (bytes, label) in [(4u64 << 10, "4KiB"), (2 << 20, "2MiB")] {
        g.throughput(criterion::Throughput::Bytes(bytes));
        g.bench_function(BenchmarkId::new("vm_to_vm", label), |b| {
            b.iter_custom(|iters| transfer(bytes, iters))
        });
    }
    g.finish();
}

fn summary() {
    if vmm_core::host::kvm_unavailable_reason().is_some() {
        return;
    }
    println!("\ndoorbell summary (probe guests, MSI-X; one way = round trip / 2)");
    for (label, fast) in [
        ("ioeventfd -> irqfd (in kernel)", true),
        ("VMM doorbell handler", false),
    ] {
        let n = 2000;
        let d = ping_pong(n, fast) / n as u32;
        println!(
            "{label:>32}: round trip {:>8.1} us, one way {:>8.1} us",
            d.as_secs_f64() * 1e6,
            d.as_secs_f64() * 5e5
        );
    }
    println!(
        "\n{:>16} {:>6} | {:>12} {:>10} {:>9} | {:>13} {:>13}",
        "notify", "size", "time", "MiB/s", "vs poll", "doorbells/MiB", "irqs/MiB"
    );
    for (bytes, size, rounds) in [
        (4u64 << 10, "4KiB", 200u64),
        (2 << 20, "2MiB", 20),
        (1 << 30, "1GiB", 1),
    ] {
        let mib = (bytes * rounds) as f64 / (1 << 20) as f64;
        let polled = transfer_with(bytes, rounds, Notify::Never);
        let poll = polled.time / rounds as u32;
        for mode in [Notify::Never, Notify::Always, Notify::Adaptive] {
            let rung: Moved;
            let m = if mode == Notify::Never {
                &polled
            } else {
                rung = transfer_with(bytes, rounds, mode);
                &rung
            };
            let d = m.time / rounds as u32;
            println!(
                "{:>16} {size:>6} | {:>10.4} ms {:>10.2} {:>8.0}% | {:>13.2} {:>13.2}",
                label(mode),
                d.as_secs_f64() * 1e3,
                bytes as f64 / d.as_secs_f64() / (1 << 20) as f64,
                100.0 * poll.as_secs_f64() / d.as_secs_f64(),
                m.doorbells as f64 / mib,
                m.irqs as f64 / mib,
            );
        }
    }
    println!();
    for mode in [Notify::Never, Notify::Always, Notify::Adaptive] {
        println!(
            "{:>16}: idle receiver uses {:.1}% of a CPU",
            label(mode),
            100.0 * idle_cpu(mode)
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    intervm_benches::main_with_summary(benches, summary);
}
