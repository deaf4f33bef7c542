//! Shared memory without interrupts: time to move 4 KiB, 2 MiB and 1 GiB.
//!
//! Measured in the same run so they can be compared:
//!
//! - `shmem/host_memcpy`: one `copy_from_slice` of the size between two
//!   pre-faulted host buffers: the floor for moving bytes in this machine.
//! - `shmem/ring_host_threads`: the intervm ring (`intervm_protocol::ring`)
//!   between two host threads over a memfd region, with the probe's payload
//!   policy (64 KiB frames from a source of at most 16 MiB, checksummed).
//! - `shmem/vm_to_vm`: two probe guests on real /dev/kvm, each with an
//!   ivshmem-plain device on one 4 MiB memfd region; the receiver's TSC
//!   times each transfer from its start signal to the last byte (boot is
//!   not included). Small sizes repeat the transfer `iters` times in one
//!   boot. `shmem/vm_to_vm_zero_copy`: the same with frames filled and
//!   read in place (the sender generates its pattern in the ring, the
//!   receiver sums each frame where it lies).
//!
//! After criterion, a summary table prints the medians side by side with
//! the ratio to `memcpy`.

use std::time::Duration;

use criterion::{criterion_group, BenchmarkId, Criterion};

use intervm_benches::runs::shmem::*;

const SIZES: [(u64, &str); 3] = [(4 << 10, "4KiB"), (2 << 20, "2MiB"), (1 << 30, "1GiB")];

fn bench(c: &mut Criterion) {
    let kvm = vmm_core::host::kvm_unavailable_reason();
    if let Some(why) = &kvm {
        eprintln!("SKIPPED shmem/vm_to_vm: {why}");
    }
    for (bytes, label) in SIZES {
        let mut g = c.benchmark_group("shmem");
        if bytes >= 1 << 30 {
            g.sample_size(10).measurement_time(Duration::from_secs(20));
        } else {
            g.measurement_time(Duration::from_secs(3));
        }
        g.throughput(criterion::Throughput::Bytes(bytes));
        g.bench_function(BenchmarkId::new("host_memcpy", label), |b| {
            b.iter_custom(|i| host_memcpy(bytes, i))
        });
        g.bench_function(BenchmarkId::new("ring_host_threads", label), |b| {
            b.iter_custom(|i| host_ring(bytes, i))
        });
        if kvm.is_none() {
            g.bench_function(BenchmarkId::new("vm_to_vm", label), |b| {
                b.iter_custom(|i| vm_to_vm(bytes, i).total)
            });
            g.bench_function(BenchmarkId::new("vm_to_vm_zero_copy", label), |b| {
                b.iter_custom(|i| vm_to_vm_with(bytes, i, true).total)
            });
        }
        g.finish();
    }
    if kvm.is_none() {
        // One ring message in flight, polled, and the cache-line floor of
        // the same boots; one way = round trip / 2.
        let mut g = c.benchmark_group("shmem_one_way");
        g.sample_size(10).measurement_time(Duration::from_secs(5));
        for (bytes, size) in [(64u64, "64B"), (4096, "4KiB")] {
            for (what, floor) in [("ring", false), ("cache_line_floor", true)] {
                g.bench_function(BenchmarkId::new(what, size), |b| {
                    b.iter_custom(|iters| {
                        let n = iters.clamp(10, intervm_benches::runs::PING_PONG_MAX);
                        let pp = ping_pong(bytes, n, false);
                        let v = if floor { &pp.floor } else { &pp.ring };
                        Duration::from_secs_f64(intervm_benches::runs::one_way(v) * iters as f64)
                    })
                });
            }
        }
        g.finish();
    }
}

fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

fn summary() {
    let kvm = vmm_core::host::kvm_unavailable_reason().is_none();
    println!("\nshmem summary (median of repeated runs; ratio = time / host memcpy)");
    println!(
        "{:>6} | {:>12} | {:>12} {:>6} | {:>12} {:>6} | {:>9}",
        "size", "memcpy", "ring threads", "ratio", "VM to VM", "ratio", "VM GiB/s"
    );
    for (bytes, label) in SIZES {
        let reps = if bytes >= 1 << 30 { 5 } else { 21 };
        let per = if bytes >= 1 << 30 {
            1
        } else {
            (64 << 20) / bytes
        };
        let m = median(
            (0..reps)
                .map(|_| host_memcpy(bytes, per) / per as u32)
                .collect(),
        );
        let h = median(
            (0..reps)
                .map(|_| host_ring(bytes, per) / per as u32)
                .collect(),
        );
        let (vcell, vratio, rate) = if kvm {
            let v = median(
                (0..reps.min(5))
                    .map(|_| vm_to_vm(bytes, per).total / per as u32)
                    .collect(),
            );
            (
                format!("{v:>12.2?}"),
                format!("{:>5.2}x", v.as_secs_f64() / m.as_secs_f64()),
                format!(
                    "{:>9.2}",
                    bytes as f64 / v.as_secs_f64() / (1u64 << 30) as f64
                ),
            )
        } else {
            (format!("{:>12}", "skipped"), String::new(), String::new())
        };
        println!(
            "{label:>6} | {m:>12.2?} | {h:>12.2?} {:>5.2}x | {vcell} {vratio} | {rate}",
            h.as_secs_f64() / m.as_secs_f64()
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    intervm_benches::main_with_summary(benches, summary);
}
