//! Doorbells: ping-pong latency and doorbell-paced transfers per notification mode.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::Duration;

use interrupt_doorbell::device::new_eventfds;
use interrupt_doorbell::{group, IvshmemDoorbell};
use intervm_protocol::notify::SPIN_US_PVM;
use intervm_protocol::probe::{doorbell_args as a, results, BootInfo, Workload};
pub use probe_image::shmem::Notify;
use probe_image::shmem::{peer_record, Role, ShmemResult, ShmemTask};
use shmem_device::{Backing, SharedRegion, Transport};
use vmm_core::{boot::probe, devices::serial::SerialOutput, RunningVm, Vm, VmConfig};

pub fn vm(
    name: &str,
    info: &BootInfo,
    region: &Arc<SharedRegion>,
    id: u16,
    fast: bool,
) -> (Vm, Arc<std::sync::Mutex<IvshmemDoorbell>>) {
    vm_with_vectors(name, info, region, id, fast, 1)
}

/// [`vm`] with a doorbell device of `vectors` MSI-X vectors.
pub fn vm_with_vectors(
    name: &str,
    info: &BootInfo,
    region: &Arc<SharedRegion>,
    id: u16,
    fast: bool,
    vectors: usize,
) -> (Vm, Arc<std::sync::Mutex<IvshmemDoorbell>>) {
    let mut cfg = VmConfig::new(name, 64 << 20);
    cfg.serial = SerialOutput::Sink;
    let vm = Vm::new(&cfg).expect("VM");
    probe::load(&vm, probe_image::PROBE_ELF, info).expect("probe");
    let dev = IvshmemDoorbell::new(
        &vm,
        region.clone(),
        id,
        new_eventfds(vectors).expect("eventfd"),
        fast,
    )
    .expect("device");
    vm.add_pci_device(dev.clone()).expect("device");
    (vm, dev)
}

pub fn wait(r: &RunningVm) -> BootInfo {
    r.wait_timeout(Duration::from_secs(600)).expect("finished");
    probe::read_info(r.vm().memory()).expect("info")
}

/// `rounds` doorbell round trips; returns the initiator's total time.
pub fn ping_pong(rounds: u64, fast: bool) -> Duration {
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

/// Doorbell latency as a region's members grow: `members` probe VMs (an
/// even number) on one doorbell region ping-pong in pairs (0 with 1, 2
/// with 3, ...), all at once, `rounds` round trips each, over the in-kernel
/// path. Returns each pair's mean round trip, as its initiator timed it;
/// every doorbell must arrive.
pub fn pairs_ping_pong(members: u32, rounds: u64) -> Vec<Duration> {
    let region = Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).expect("region"));
    let mut devices = Vec::new();
    let mut vms = Vec::new();
    for me in 0..members {
        let mut i = BootInfo::new(Workload::DoorbellPingPong, 0, 0);
        i.args[a::PEER] = (me ^ 1) as u64;
        i.args[a::ROUNDS] = rounds;
        i.args[a::INITIATOR] = (me % 2 == 0) as u64;
        let (v, d) = vm(&format!("m{me}"), &i, &region, me as u16, true);
        vms.push(v);
        devices.push(d);
    }
    group::wire(&devices).expect("wire");
    // Answering sides first, so no initiator rings a VM not yet running.
    let (odd, even): (Vec<_>, Vec<_>) =
        vms.into_iter().enumerate().partition(|(me, _)| me % 2 == 1);
    let running: Vec<(u32, RunningVm)> = odd
        .into_iter()
        .chain(even)
        .map(|(me, v)| (me as u32, v.start().expect("start")))
        .collect();
    let mut out = Vec::new();
    for (me, r) in &running {
        let i = wait(r);
        assert_eq!(i.results[results::DB_IRQS], rounds, "m{me} lost doorbells");
        if me % 2 == 0 {
            let total = i.results[results::DB_TOTAL_CYCLES] as f64 / i.tsc_khz.max(1) as f64 / 1e3;
            out.push(Duration::from_secs_f64(total / rounds.max(1) as f64));
        }
    }
    out
}

/// [`super::shmem::ping_pong`] over doorbell devices (in-kernel path):
/// `rounds` of the floor (polled), then `rounds` ring messages of `bytes`
/// whose sides wait as `mode` says (`Always`: sleep at once, rung after
/// every message; `Adaptive`: poll for the PVM budget, then sleep).
pub fn ring_ping_pong(bytes: u64, rounds: u64, mode: Notify) -> super::shmem::PingPong {
    use probe_image::shmem::PingPongTask;
    let shared =
        Arc::new(SharedRegion::open(&Backing::Memfd, super::shmem::region()).expect("region"));
    let t = Transport::attach(shared.clone(), 2).expect("attach");
    let mk = |name: &str, me: u32| {
        let mut task = PingPongTask::new(me, 1 - me, me == 0, bytes, rounds);
        task.floor_first = true;
        task.notify = mode;
        task.spin_us = SPIN_US_PVM;
        let (vm, dev) = vm(name, &task.boot_info(), &shared, me as u16, true);
        (vm, dev, t.join(me).expect("join"))
    };
    let (vb, db, _mb) = mk("pong", 1);
    let (va, da, _ma) = mk("ping", 0);
    group::wire(&[da, db]).expect("wire");
    let (rb, ra) = (vb.start().expect("start"), va.start().expect("start"));
    super::shmem::PingPong::read(&ra, &rb, rounds)
}

/// A notification mode's name in bench output.
pub fn label(mode: Notify) -> &'static str {
    match mode {
        Notify::Never => "never (polling)",
        m => m.name(),
    }
}

/// Sets `k` up to notify as `mode`, with the launcher's PVM polling budget.
fn apply(mode: Notify, k: &mut ShmemTask) {
    k.notify = mode;
    k.spin_us = SPIN_US_PVM;
}

pub struct Moved {
    pub time: Duration,
    /// The receiver's time of each round.
    pub rounds: super::Rounds,
    pub doorbells: u64,
    pub irqs: u64,
}

/// Moves `bytes` with a doorbell per 64 KiB frame; returns the receiver's time.
pub fn transfer(bytes: u64, rounds: u64) -> Duration {
    transfer_with(bytes, rounds, Notify::Always).time
}

/// Moves `bytes` `rounds` times with notification `mode`.
pub fn transfer_with(bytes: u64, rounds: u64, mode: Notify) -> Moved {
    let region = Arc::new(SharedRegion::open(&Backing::Memfd, 4 << 20).expect("region"));
    let t = Transport::attach(region.clone(), 2).expect("attach");
    let task = |me, role| {
        let mut k = ShmemTask::new(me, role, bytes);
        apply(mode, &mut k);
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
    let time = Duration::from_secs_f64(res.seconds().unwrap_or(0.0));
    Moved {
        time,
        rounds: super::Rounds::read(&rr, rounds, ir.tsc_khz, time),
        doorbells: ir.results[results::SHM_DOORBELLS] + it.results[results::SHM_DOORBELLS],
        irqs: ir.results[results::SHM_IRQS] + it.results[results::SHM_IRQS],
    }
}

pub fn cpu_seconds() -> f64 {
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
pub fn idle_cpu(mode: Notify) -> f64 {
    let region = Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).expect("region"));
    let t = Transport::attach(region.clone(), 2).expect("attach");
    let mut k = ShmemTask::new(1, Role::Recv { from: 1 }, 1 << 20);
    apply(mode, &mut k);
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
