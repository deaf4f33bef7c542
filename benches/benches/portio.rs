//! Port-I/O channel: time to move 4 KiB, 2 MiB and 1 GiB VM to VM, per mode
//! and access width, with exits per KiB and the cost per exit beside the raw
//! port-I/O exit round trip measured in the same run.
//!
//! Port mode costs one exit per access, so large sizes are extrapolated
//! linearly from a measured run (the output says from what). By default
//! the measured run is capped to keep the bench short; set
//! `INTERVM_PORTIO_FULL=1` to measure at least 64 MiB before extrapolating
//! (a 1 GiB run in port mode would take hours on PVM).
//!
//! Times are the receiver's TSC from its start line to the last byte.

use std::time::Duration;

use criterion::{criterion_group, BenchmarkId, Criterion};

use intervm_benches::runs::portio::*;

const SIZES: [(u64, &str); 3] = [(4 << 10, "4KiB"), (2 << 20, "2MiB"), (1 << 30, "1GiB")];

fn bench(c: &mut Criterion) {
    if let Some(why) = vmm_core::host::kvm_unavailable_reason() {
        eprintln!("SKIPPED portio: {why}");
        return;
    }
    let mut g = c.benchmark_group("portio_4KiB");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for m in MODES {
        g.bench_function(BenchmarkId::new("vm_to_vm", m.label), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| Duration::from_secs_f64(transfer(m, 4 << 10).secs))
                    .sum()
            })
        });
    }
    g.finish();
    // One descriptor message in flight; one way = round trip / 2.
    let mut g = c.benchmark_group("portio_one_way");
    g.sample_size(10).measurement_time(Duration::from_secs(5));
    for (bytes, size) in [(64u64, "64B"), (4096, "4KiB")] {
        g.bench_function(BenchmarkId::new("descriptor", size), |b| {
            b.iter_custom(|iters| {
                let n = iters.clamp(10, intervm_benches::runs::PING_PONG_MAX);
                Duration::from_secs_f64(
                    intervm_benches::runs::one_way(&ping_pong(bytes, n)) * iters as f64,
                )
            })
        });
    }
    g.finish();
}

fn summary() {
    if vmm_core::host::kvm_unavailable_reason().is_some() {
        return;
    }
    let full = std::env::var("INTERVM_PORTIO_FULL").is_ok_and(|v| v == "1");
    let raw = raw_exit();
    println!(
        "\nportio summary (raw CPL3 PIO exit round trip in this run: {:.1} us)",
        raw * 1e6
    );
    println!(
        "{:>15} {:>6} | {:>12} {:>10} | {:>12} {:>12} {:>11} | measured",
        "mode", "size", "time", "MiB/s", "tx exits/KiB", "rx exits/KiB", "us/tx exit"
    );
    for m in MODES {
        for (bytes, label) in SIZES {
            let cap = if full && !m.descriptor {
                m.cap.max(64 << 20)
            } else {
                m.cap
            };
            let measured = bytes.min(cap);
            let r = transfer(m, measured);
            let scale = bytes as f64 / measured as f64;
            let secs = r.secs * scale;
            let kib = measured as f64 / 1024.0;
            let (tx, rx) = (r.tx.accesses as f64, r.rx.accesses as f64);
            let note = if measured == bytes {
                "full run".to_string()
            } else {
                format!("extrapolated from {} KiB", measured >> 10)
            };
            println!(
                "{:>15} {label:>6} | {:>10.4} s {:>10.2} | {:>12.1} {:>12.1} {:>11.1} | {note}",
                m.label,
                secs,
                bytes as f64 / secs / (1 << 20) as f64,
                tx / kib,
                rx / kib,
                r.secs / tx * 1e6,
            );
        }
    }
}

criterion_group!(benches, bench);

fn main() {
    intervm_benches::main_with_summary(benches, summary);
}
