//! Shared memory without interrupts: host memcpy, the ring between host threads, and VM to VM.
#![allow(missing_docs)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use intervm_protocol::probe::{shmem_frame_bytes, shmem_source_bytes, BootInfo};
use intervm_protocol::ring;
use probe_image::shmem::{peer_record, Role, ShmemResult, ShmemTask};
use shmem_device::{Backing, IvshmemPlain, SharedRegion, Transport};
use std::sync::Mutex;
use vmm_core::{boot::probe, devices::serial::SerialOutput, Vm, VmConfig};

/// Frame payload bytes (`INTERVM_SHMEM_CHUNK` overrides).
pub fn chunk() -> u64 {
    env_size("INTERVM_SHMEM_CHUNK", 64 << 10)
}

/// Shared region bytes (`INTERVM_SHMEM_REGION` overrides).
pub fn region() -> u64 {
    env_size("INTERVM_SHMEM_REGION", 4 << 20)
}

pub fn env_size(var: &str, default: u64) -> u64 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn host_memcpy(bytes: u64, iters: u64) -> Duration {
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

pub fn host_ring(bytes: u64, iters: u64) -> Duration {
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

pub fn src_len_for(bytes: u64, frame: u64) -> usize {
    shmem_source_bytes(bytes, frame).max(frame) as usize
}

/// A started VM and its membership in the channel.
pub type Member = (vmm_core::RunningVm, shmem_device::Membership);

/// Starts a quiet probe VM (64 MiB) running `info` with an ivshmem-plain
/// device on `t`'s region, joined as member `me`.
fn plain_member(name: &str, me: u32, info: &BootInfo, t: &Transport) -> Member {
    let vm = plain_vm(name, info, t.region());
    let m = t.join(me).expect("join");
    (vm.start().expect("start"), m)
}

/// A quiet probe VM (64 MiB) loaded with `info` and an ivshmem-plain
/// device on `region`, not started.
fn plain_vm(name: &str, info: &BootInfo, region: &Arc<SharedRegion>) -> Vm {
    let mut cfg = VmConfig::new(name, 64 << 20);
    cfg.serial = SerialOutput::Sink;
    let vm = Vm::new(&cfg).expect("VM");
    vm.add_pci_device(Arc::new(Mutex::new(IvshmemPlain::new(region.clone()))))
        .expect("device");
    probe::load(&vm, probe_image::PROBE_ELF, info).expect("probe");
    vm
}

/// Starts a receiving and a sending probe VM on one memfd region, moving
/// `bytes` `rounds` times (`quiet`: the probes print nothing; `zero_copy`:
/// both fill and read frames in place).
pub fn pair(bytes: u64, rounds: u64, quiet: bool, zero_copy: bool) -> (Member, Member) {
    let shared = Arc::new(SharedRegion::open(&Backing::Memfd, region()).expect("region"));
    let t = Transport::attach(shared, 2).expect("attach");
    let vm = |name: &str, me: u32, role: Role| {
        let mut task = ShmemTask::new(me, role, bytes);
        task.chunk = chunk();
        task.rounds = rounds;
        task.quiet = quiet;
        task.zero_copy = zero_copy;
        plain_member(name, me, &task.boot_info(), &t)
    };
    let rx = vm("rx", 1, Role::Recv { from: 1 });
    let tx = vm("tx", 0, Role::Send { to: 1 });
    (rx, tx)
}

/// Two probe VMs moving `bytes` `rounds` times; returns the receiver's
/// times.
pub fn vm_to_vm(bytes: u64, rounds: u64) -> super::Rounds {
    vm_to_vm_with(bytes, rounds, false)
}

/// [`vm_to_vm`], with frames filled and read in place when `zero_copy`
/// (the sender generates its pattern in the ring; the receiver sums each
/// frame where it lies).
pub fn vm_to_vm_with(bytes: u64, rounds: u64, zero_copy: bool) -> super::Rounds {
    let (rx, tx) = pair(bytes, rounds, false, zero_copy);
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
    let total = Duration::from_secs_f64(res.seconds().unwrap_or(0.0));
    super::Rounds::read(&rx.0, rounds, rinfo.tsc_khz, total)
}

/// Where the time of a polled shared-memory transfer goes, per transfer.
#[derive(Clone, Copy, Debug, Default)]
pub struct Breakdown {
    /// Whole transfer (receiver's clock), seconds.
    pub total: f64,
    /// Sender guest userspace (CPL3) copying and checksumming into the ring.
    pub send_copy: f64,
    /// Sender waiting on a full ring.
    pub send_wait: f64,
    /// Receiver guest userspace copying and checksumming out of the ring.
    pub recv_copy: f64,
    /// Receiver waiting for the peer (data in flight through the caches).
    pub recv_wait: f64,
    /// VM exits of both VMs during the transfer window.
    pub exits: u64,
    /// Interrupts taken by both guests.
    pub interrupts: u64,
}

/// Measures [`Breakdown`] over `rounds` transfers of `bytes`, with frames
/// copied or (`zero_copy`) filled and read in place.
pub fn breakdown(bytes: u64, rounds: u64, zero_copy: bool) -> Breakdown {
    let (rx, tx) = pair(bytes, rounds, true, zero_copy);
    let exits = |r: &vmm_core::RunningVm| {
        use std::sync::atomic::Ordering::Relaxed;
        let s = &r.vm().control().stats;
        s.pio.load(Relaxed) + s.mmio.load(Relaxed)
    };
    // Count exits from the moment both are ready (boot and setup excluded).
    let ready = intervm_protocol::probe::State::Ready;
    let limit = Duration::from_secs(600);
    assert!(probe::wait_state(rx.0.vm().memory(), ready, limit));
    assert!(probe::wait_state(tx.0.vm().memory(), ready, limit));
    let before = exits(&rx.0) + exits(&tx.0);
    rx.0.wait_timeout(limit).expect("receiver finished");
    tx.0.wait_timeout(limit).expect("sender finished");
    // Quiet probes: what is counted is the transfer plus each power-off.
    let after = exits(&rx.0) + exits(&tx.0);
    let ri = probe::read_info(rx.0.vm().memory()).expect("info");
    let ti = probe::read_info(tx.0.vm().memory()).expect("info");
    let res = ShmemResult::from_info(&ri);
    assert!(res.error.is_none(), "{:?}", res.error);
    let s = |c: u64| res.cycles_to_seconds(c).unwrap_or(0.0) / rounds as f64;
    use intervm_protocol::probe::results as r;
    Breakdown {
        total: s(res.end_tsc - res.start_tsc),
        send_copy: s(ti.results[r::SHM_COPY_CYCLES]),
        send_wait: s(ti.results[r::SHM_WAIT_CYCLES]),
        recv_copy: s(ri.results[r::SHM_COPY_CYCLES]),
        recv_wait: s(ri.results[r::SHM_WAIT_CYCLES]),
        exits: after - before,
        interrupts: ri.results[r::SHM_IRQS] + ti.results[r::SHM_IRQS],
    }
}

/// Round trips of one ping-pong boot, seconds each.
pub struct PingPong {
    /// One word each way in the member table: the floor.
    pub floor: Vec<f64>,
    /// Ring messages.
    pub ring: Vec<f64>,
}

/// Two probe VMs on one memfd region: `rounds` round trips of the floor
/// (one word each way, no ring; with `copy_floor`, the `bytes` message
/// copied beside the word), then `rounds` of a `bytes` message over the
/// ring, in the same boot; the initiator's round trips.
pub fn ping_pong(bytes: u64, rounds: u64, copy_floor: bool) -> PingPong {
    use probe_image::shmem::PingPongTask;
    let shared = Arc::new(SharedRegion::open(&Backing::Memfd, region()).expect("region"));
    let t = Transport::attach(shared, 2).expect("attach");
    let vm = |name: &str, me: u32| {
        let mut task = PingPongTask::new(me, 1 - me, me == 0, bytes, rounds);
        task.floor_first = true;
        task.copy_floor = copy_floor;
        plain_member(name, me, &task.boot_info(), &t)
    };
    let b = vm("pong", 1);
    let a = vm("ping", 0);
    PingPong::read(&a.0, &b.0, rounds)
}

impl PingPong {
    /// Waits for a floor-first ping-pong of `rounds` between initiator
    /// `a` and responder `b`, and reads the initiator's round log.
    pub fn read(a: &vmm_core::RunningVm, b: &vmm_core::RunningVm, rounds: u64) -> Self {
        let mut all = super::Rounds::of_ping_pong(a, b, 2 * rounds).each;
        let ring = all.split_off(rounds.min(all.len() as u64) as usize);
        PingPong { floor: all, ring }
    }
}

/// Region bytes for `members` members: about 256 KiB per ring, at least
/// the default region.
pub fn region_for(members: u32) -> u64 {
    ((members as u64 * members as u64) << 18)
        .next_power_of_two()
        .max(region())
}

/// Boots `members` probe VMs on one region of [`region_for`]`(members)`,
/// member `m` running `task(m)`, with notification `mode` (doorbell
/// devices of `vectors` vectors, wired together, when it rings; plain
/// ones otherwise), and returns each one's boot info once all finished.
fn run_members(
    members: u32,
    mode: probe_image::shmem::Notify,
    vectors: usize,
    task: impl Fn(u32) -> ShmemTask,
) -> Vec<BootInfo> {
    use interrupt_doorbell::group;
    use probe_image::shmem::Notify;
    let shared =
        Arc::new(SharedRegion::open(&Backing::Memfd, region_for(members)).expect("region"));
    let t = Transport::attach(shared.clone(), members).expect("attach");
    let mut bells = Vec::new();
    let mut vms = Vec::new();
    for me in 0..members {
        let mut k = task(me);
        k.seed = me as u64;
        k.quiet = true;
        k.notify = mode;
        k.join_timeout_ms = 600_000;
        let (name, info) = (format!("m{me}"), k.boot_info());
        let vm = if mode == Notify::Never {
            plain_vm(&name, &info, &shared)
        } else {
            let (vm, dev) =
                super::doorbell::vm_with_vectors(&name, &info, &shared, me as u16, true, vectors);
            bells.push(dev);
            vm
        };
        vms.push((vm, t.join(me).expect("join")));
    }
    if !bells.is_empty() {
        group::wire(&bells).expect("wire");
    }
    let running: Vec<_> = vms
        .into_iter()
        .map(|(vm, m)| (vm.start().expect("start"), m))
        .collect();
    let limit = Duration::from_secs(600);
    running
        .iter()
        .map(|(r, _)| {
            r.wait_timeout(limit).expect("finished");
            probe::read_info(r.vm().memory()).expect("info")
        })
        .collect()
}

/// All to one: `members - 1` probe VMs each send `bytes` to member 0 at
/// once, over one region, with notification `mode` (doorbell devices when
/// it rings, plain ones otherwise). Returns the receiver's time from its
/// start line to the last byte of the last sender; every sender's stream
/// checksum is checked.
pub fn fan_in(members: u32, bytes: u64, mode: probe_image::shmem::Notify) -> Duration {
    let infos = run_members(members, mode, 1, |me| {
        let role = match me {
            0 => Role::Recv {
                from: ((1u64 << members) - 2) as u32,
            },
            _ => Role::Send { to: 0 },
        };
        ShmemTask::new(me, role, bytes)
    });
    let res = ShmemResult::from_info(&infos[0]);
    assert!(res.error.is_none(), "fan-in failed: {:?}", res.error);
    for (me, sender) in infos.iter().enumerate().skip(1) {
        let sent = peer_record(sender, 0);
        let got = peer_record(&infos[0], me as u32);
        assert_eq!((got.bytes, got.stream), (bytes, sent.stream), "sender {me}");
    }
    Duration::from_secs_f64(res.seconds().unwrap_or(0.0))
}

/// All pairs at once: `members` probe VMs each exchange `bytes` both ways
/// with every other over one region (`Workload::ShmemExchange`), with
/// notification `mode` (doorbell devices of one vector per member when it
/// rings). Returns the slowest member's time from its start line to its
/// last byte; every one of the `members * (members - 1)` streams is
/// checked against what its sender sent.
pub fn all_pairs(members: u32, bytes: u64, mode: probe_image::shmem::Notify) -> Duration {
    use probe_image::shmem::sent_record;
    let everyone = ((1u64 << members) - 1) as u32;
    let infos = run_members(members, mode, members as usize, |me| {
        let with = everyone & !(1 << me);
        let mut k = ShmemTask::new(me, Role::Exchange { with }, bytes);
        k.vectors = members;
        k
    });
    let mut slowest = 0f64;
    for (me, info) in infos.iter().enumerate() {
        let res = ShmemResult::from_info(info);
        assert!(res.error.is_none(), "member {me} failed: {:?}", res.error);
        slowest = slowest.max(res.seconds().unwrap_or(0.0));
        for (from, sender) in infos.iter().enumerate().filter(|(f, _)| *f != me) {
            let sent = sent_record(sender, me as u32);
            let got = peer_record(info, from as u32);
            assert_eq!(
                (got.bytes, got.stream),
                (bytes, sent.stream),
                "{from} -> {me}"
            );
        }
    }
    Duration::from_secs_f64(slowest)
}
