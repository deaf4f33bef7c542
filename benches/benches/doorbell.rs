//! Shared memory with doorbells: doorbell latency on the in-kernel path
//! (ioeventfd -> irqfd) and through the VMM, and the time to move 4 KiB,
//! 2 MiB and 1 GiB through the ring with a doorbell per frame (the receiver
//! sleeps until rung). Times come from the guests' TSC.

use std::sync::Arc;
use std::time::Duration;

use criterion::{criterion_group, BenchmarkId, Criterion};
use interrupt_doorbell::device::new_eventfds;
use interrupt_doorbell::{group, IvshmemDoorbell};
use intervm_protocol::probe::{doorbell_args as a, results, BootInfo, Workload};
use probe_image::shmem::{peer_record, Role, ShmemResult, ShmemTask};
use shmem_device::{Backing, SharedRegion, Transport};
use vmm_core::{boot::probe, devices::serial::SerialOutput, RunningVm, Vm, VmConfig};

fn vm(
    name: &str,
    info: &BootInfo,
    region: &Arc<SharedRegion>,
    id: u16,
    fast: bool,
) -> (Vm, Arc<std::sync::Mutex<IvshmemDoorbell>>) {
    let mut cfg = VmConfig::new(name, 64 << 20);
    cfg.serial = SerialOutput::Sink;
    let vm = Vm::new(&cfg).expect("VM");
    probe::load(&vm, probe_image::PROBE_ELF, info).expect("probe");
    let dev = IvshmemDoorbell::new(
        &vm,
        region.clone(),
        id,
        new_eventfds(1).expect("eventfd"),
        fast,
    )
    .expect("device");
    vm.add_pci_device(dev.clone()).expect("device");
    (vm, dev)
}

fn wait(r: &RunningVm) -> BootInfo {
    r.wait_timeout(Duration::from_secs(600)).expect("finished");
    probe::read_info(r.vm().memory()).expect("info")
}

/// `rounds` doorbell round trips; returns the initiator's total time.
fn ping_pong(rounds: u64, fast: bool) -> Duration {
    let region = Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).expect("region"));
    let info = |init: bool, peer: u64| {
        let mut i = BootInfo::new(Workload::DoorbellPingPong, 0, 0);
        i.args[a::PEER] = peer;
        i.args[a::ROUNDS] = rounds;
        i.args[a::INITIATOR] = init as u64;
        i
    };
    let (va, da) = vm("a", &info(true, 1), &region, 0, fast);
    let (vb, db) = vm("b", &info(false, 0), &region, 1, fast);
    group::wire(&[da, db]).expect("wire");
    let (rb, ra) = (vb.start().expect("start"), va.start().expect("start"));
    let ia = wait(&ra);
    wait(&rb);
    assert_eq!(ia.results[results::DB_IRQS], rounds, "lost doorbells");
    Duration::from_secs_f64(
        ia.results[results::DB_TOTAL_CYCLES] as f64 / ia.tsc_khz.max(1) as f64 / 1e3,
    )
}

/// How a transfer notifies.
#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Always,
    Adaptive,
    Never,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Mode::Always => "always",
            Mode::Adaptive => "adaptive",
            Mode::Never => "never (polling)",
        }
    }
    fn apply(self, k: &mut ShmemTask) {
        k.notify = self == Mode::Always;
        k.adaptive = self == Mode::Adaptive;
        // Two one-way doorbells on PVM (75 µs each), as the launcher's default.
        k.spin_us = 150;
    }
}

struct Moved {
    time: Duration,
    doorbells: u64,
    irqs: u64,
}

/// Moves `bytes` with a doorbell per 64 KiB frame; returns the receiver's time.
fn transfer(bytes: u64, rounds: u64) -> Duration {
    transfer_with(bytes, rounds, Mode::Always).time
}

/// Moves `bytes` `rounds` times with notification `mode`.
fn transfer_with(bytes: u64, rounds: u64, mode: Mode) -> Moved {
    let region = Arc::new(SharedRegion::open(&Backing::Memfd, 4 << 20).expect("region"));
    let t = Transport::attach(region.clone(), 2).expect("attach");
    let task = |me, role| {
        let mut k = ShmemTask::new(me, role, bytes);
        mode.apply(&mut k);
        k.rounds = rounds;
        k.boot_info()
    };
    let (vr, dr) = vm("rx", &task(1, Role::Recv { from: 1 }), &region, 1, true);
    let (vt, dt) = vm("tx", &task(0, Role::Send { to: 1 }), &region, 0, true);
    group::wire(&[dr, dt]).expect("wire");
    let (mr, mt) = (t.join(1).expect("join"), t.join(0).expect("join"));
    let (rr, rt) = (vr.start().expect("start"), vt.start().expect("start"));
    let ir = wait(&rr);
    let it = wait(&rt);
    drop((mr, mt));
    let res = ShmemResult::from_info(&ir);
    assert!(res.error.is_none(), "{:?}", res.error);
    assert_eq!(peer_record(&ir, 0).stream, peer_record(&it, 1).stream);
    Moved {
        time: Duration::from_secs_f64(res.seconds().unwrap_or(0.0)),
        doorbells: ir.results[results::SHM_DOORBELLS] + it.results[results::SHM_DOORBELLS],
        irqs: ir.results[results::SHM_IRQS] + it.results[results::SHM_IRQS],
    }
}

fn cpu_seconds() -> f64 {
    let mut u = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: getrusage fills the struct we pass.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, u.as_mut_ptr()) };
    // SAFETY: initialised by getrusage (zeroed before, in any case).
    let u = unsafe { u.assume_init() };
    let t = |tv: libc::timeval| tv.tv_sec as f64 + tv.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}

/// CPU seconds per second that a receiver with nothing to receive uses: the
/// sender's slot is joined (heartbeat) and marked prepared by the host, but
/// nothing is ever sent.
fn idle_cpu(mode: Mode) -> f64 {
    let region = Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).expect("region"));
    let t = Transport::attach(region.clone(), 2).expect("attach");
    let mut k = ShmemTask::new(1, Role::Recv { from: 1 }, 1 << 20);
    mode.apply(&mut k);
    let (vr, dr) = vm("rx", &k.boot_info(), &region, 1, true);
    let (_vt, dt) = vm(
        "tx",
        &BootInfo::new(Workload::Hello, 0, 0),
        &region,
        0,
        true,
    );
    group::wire(&[dr, dt]).expect("wire");
    let _m = (t.join(1).expect("join"), t.join(0).expect("join"));
    t.ring_region()
        .set_ready(&t.geometry(), 0, intervm_protocol::ring::READY_PREPARED)
        .expect("ready");
    let r = vr.start().expect("start");
    assert!(probe::wait_state(
        r.vm().memory(),
        intervm_protocol::probe::State::Ready,
        Duration::from_secs(30)
    ));
    std::thread::sleep(Duration::from_millis(300));
    let (c0, t0) = (cpu_seconds(), std::time::Instant::now());
    std::thread::sleep(Duration::from_secs(1));
    let used = (cpu_seconds() - c0) / t0.elapsed().as_secs_f64();
    r.stop();
    used
}

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
    for (bytes, label, rounds) in [
        (4u64 << 10, "4KiB", 200u64),
        (2 << 20, "2MiB", 20),
        (1 << 30, "1GiB", 1),
    ] {
        let mib = (bytes * rounds) as f64 / (1 << 20) as f64;
        let poll = transfer_with(bytes, rounds, Mode::Never).time / rounds as u32;
        for mode in [Mode::Never, Mode::Always, Mode::Adaptive] {
            let m = if mode == Mode::Never {
                Moved {
                    time: poll * rounds as u32,
                    doorbells: 0,
                    irqs: 0,
                }
            } else {
                transfer_with(bytes, rounds, mode)
            };
            let d = m.time / rounds as u32;
            println!(
                "{:>16} {label:>6} | {:>10.4} ms {:>10.2} {:>8.0}% | {:>13.2} {:>13.2}",
                mode.label(),
                d.as_secs_f64() * 1e3,
                bytes as f64 / d.as_secs_f64() / (1 << 20) as f64,
                100.0 * poll.as_secs_f64() / d.as_secs_f64(),
                m.doorbells as f64 / mib,
                m.irqs as f64 / mib,
            );
        }
    }
    println!();
    for mode in [Mode::Never, Mode::Always, Mode::Adaptive] {
        println!(
            "{:>16}: idle receiver uses {:.1}% of a CPU",
            mode.label(),
            100.0 * idle_cpu(mode)
        );
    }
}

criterion_group!(benches, bench);

fn main() {
    intervm_benches::main_with_summary(benches, summary);
}
