//! Shared memory without interrupts: time to move 4 KiB, 2 MiB and 1 GiB.
//!
//! Three groups, measured in the same run so they can be compared:
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
//!   boot.
//!
//! After criterion, a summary table prints the medians side by side with
//! the ratio to `memcpy`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::{criterion_group, BenchmarkId, Criterion};
use intervm_protocol::probe::{shmem_frame_bytes, shmem_source_bytes};
use intervm_protocol::ring;
use probe_image::shmem::{peer_record, Role, ShmemResult, ShmemTask};
use shmem_device::{Backing, IvshmemPlain, SharedRegion, Transport};
use std::sync::Mutex;
use vmm_core::{boot::probe, devices::serial::SerialOutput, Vm, VmConfig};

const SIZES: [(u64, &str); 3] = [(4 << 10, "4KiB"), (2 << 20, "2MiB"), (1 << 30, "1GiB")];
/// Frame payload bytes (`INTERVM_SHMEM_CHUNK` overrides).
fn chunk() -> u64 {
    env_size("INTERVM_SHMEM_CHUNK", 64 << 10)
}

/// Shared region bytes (`INTERVM_SHMEM_REGION` overrides).
fn region() -> u64 {
    env_size("INTERVM_SHMEM_REGION", 4 << 20)
}

fn env_size(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn host_memcpy(bytes: u64, iters: u64) -> Duration {
    let src = vec![0x5au8; bytes as usize];
    let mut dst = vec![0u8; bytes as usize];
    dst.copy_from_slice(&src);
    let t = Instant::now();
    for _ in 0..iters {
        dst.copy_from_slice(std::hint::black_box(&src));
    }
    std::hint::black_box(&dst);
    t.elapsed()
}

fn host_ring(bytes: u64, iters: u64) -> Duration {
    let shared = Arc::new(SharedRegion::open(&Backing::Memfd, region()).expect("region"));
    let t = Transport::attach(shared, 2).expect("attach");
    let (r, geo) = (t.ring_region(), t.geometry());
    let frame = shmem_frame_bytes(chunk(), bytes, geo.max_payload());
    let mut src = vec![0u8; shmem_source_bytes(bytes, frame) as usize];
    ring::fill_pattern(1, 0, &mut src);
    let total = bytes * iters;
    let consumer = std::thread::spawn(move || {
        let mut c = r.consumer(geo, 0, 1).expect("consumer");
        let mut dst = vec![0u8; src_len_for(bytes, frame)];
        let (mut got, mut pos) = (0u64, 0usize);
        while got < total {
            let end = (pos + frame as usize).min(dst.len());
            if let Some((n, _)) = c.try_recv(&mut dst[pos..end]).expect("recv") {
                got += n as u64;
                pos = if pos + 2 * frame as usize > dst.len() {
                    0
                } else {
                    pos + n
                };
            } else {
                std::hint::spin_loop();
            }
        }
        Instant::now()
    });
    let mut p = r.producer(geo, 0, 1).expect("producer");
    let start = Instant::now();
    let (mut sent, mut pos) = (0u64, 0usize);
    while sent < total {
        let n = (frame.min(total - sent) as usize).min(src.len() - pos);
        if p.try_send(&src[pos..pos + n]).expect("send").is_some() {
            sent += n as u64;
            pos = (pos + n) % src.len();
        } else {
            std::hint::spin_loop();
        }
    }
    consumer.join().expect("consumer thread") - start
}

fn src_len_for(bytes: u64, frame: u64) -> usize {
    shmem_source_bytes(bytes, frame).max(frame) as usize
}

/// Two probe VMs moving `bytes` `rounds` times; returns the receiver's
/// total and fastest-round times.
fn vm_to_vm(bytes: u64, rounds: u64) -> (Duration, Duration) {
    let shared = Arc::new(SharedRegion::open(&Backing::Memfd, region()).expect("region"));
    let t = Transport::attach(shared, 2).expect("attach");
    let vm = |name: &str, me: u32, role: Role| {
        let mut task = ShmemTask::new(me, role, bytes);
        task.chunk = chunk();
        task.rounds = rounds;
        let mut cfg = VmConfig::new(name, 64 << 20);
        cfg.serial = SerialOutput::Sink;
        let vm = Vm::new(&cfg).expect("VM");
        vm.add_pci_device(Arc::new(Mutex::new(IvshmemPlain::new(t.region().clone()))))
            .expect("device");
        probe::load(&vm, probe_image::PROBE_ELF, &task.boot_info()).expect("probe");
        let m = t.join(me).expect("join");
        (vm.start().expect("start"), m)
    };
    let rx = vm("rx", 1, Role::Recv { from: 1 });
    let tx = vm("tx", 0, Role::Send { to: 1 });
    let limit = Duration::from_secs(600);
    rx.0.wait_timeout(limit).expect("receiver finished");
    tx.0.wait_timeout(limit).expect("sender finished");
    let rinfo = probe::read_info(rx.0.vm().memory()).expect("info");
    let tinfo = probe::read_info(tx.0.vm().memory()).expect("info");
    let res = ShmemResult::from_info(&rinfo);
    assert!(res.error.is_none(), "transfer failed: {:?}", res.error);
    let (got, sent) = (peer_record(&rinfo, 0), peer_record(&tinfo, 1));
    assert_eq!(got.bytes, bytes * rounds);
    assert_eq!(got.stream, sent.stream, "stream checksums differ");
    let secs = |c: u64| Duration::from_secs_f64(res.cycles_to_seconds(c).unwrap_or(0.0));
    (secs(res.end_tsc - res.start_tsc), secs(res.round_cycles.0))
}

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
                b.iter_custom(|i| vm_to_vm(bytes, i).0)
            });
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
                    .map(|_| vm_to_vm(bytes, per).0 / per as u32)
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
