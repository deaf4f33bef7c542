//! Probe guests on real /dev/kvm exchanging data through an ivshmem-plain
//! device: checksummed bulk transfer, the per-round log, four members, a member that stops
//! mid-transfer, a hostile member that corrupts a ring index, and one that
//! tries to forge frames on another pair's ring.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use intervm_protocol::probe::{
    results, shmem_args, BootInfo, State, Workload, EXIT_FAILED, EXIT_OK,
};
use intervm_protocol::ring::{frame_bytes, is_go, RingError};
use intervm_testkit::{
    finish, probe_vm_with, require_kvm, wait_until, PEER_TIMEOUT_MS, RUN_TIMEOUT,
};
use probe_image::shmem::{self, peer_record, Role, ShmemTask};
use shmem_device::{Backing, IvshmemPlain, Membership, SharedRegion, Transport};
use vmm_core::boot::probe;
use vmm_core::devices::serial::SerialBuffer;
use vmm_core::{RunningVm, VmExit};

const MEM: u64 = 64 << 20;
const CHUNK: u64 = 64 << 10;
const SEED: u64 = 0x5eed;

struct Member {
    vm: RunningVm,
    console: SerialBuffer,
    membership: Membership,
}

fn args(workload: Workload, me: u32, peers: u64, bytes: u64) -> BootInfo {
    task(workload, me, peers, bytes).boot_info()
}

fn task(workload: Workload, me: u32, peers: u64, bytes: u64) -> ShmemTask {
    let role = match workload {
        Workload::ShmemSend => Role::Send { to: peers as u32 },
        _ => Role::Recv { from: peers as u32 },
    };
    let mut task = ShmemTask::new(me, role, bytes);
    task.chunk = CHUNK;
    task.seed = SEED + me as u64;
    task.timeout_ms = PEER_TIMEOUT_MS;
    task
}

fn start(name: &str, info: &BootInfo, transport: &Transport) -> Member {
    let (vm, console) = probe_vm_with(name, info, 1, MEM);
    let me = info.args[shmem_args::ME] as u32;
    let mut dev = IvshmemPlain::new(transport.region().clone());
    // As intervm does: the guest writes only its own section.
    dev.set_guest_read_only(transport.guest_read_only(me));
    vm.add_pci_device(Arc::new(Mutex::new(dev)))
        .expect("adding the ivshmem device");
    let membership = transport.join(me).expect("joining");
    let vm = vm.start().expect("starting");
    Member {
        vm,
        console,
        membership,
    }
}

fn end(m: Member) -> (VmExit, BootInfo, String) {
    let Member {
        vm,
        console,
        membership,
    } = m;
    let (exit, info) = finish(vm, &console, RUN_TIMEOUT);
    drop(membership);
    (exit, info, console.contents())
}

fn record(info: &BootInfo, peer: u32) -> [u64; 4] {
    let r = peer_record(info, peer);
    [r.bytes, r.frames, r.stream, r.last_tsc]
}

fn expected_stream(seed: u64, bytes: u64) -> u64 {
    shmem::expected_stream(seed, bytes, CHUNK)
}

fn transport(members: u32, size: u64) -> Transport {
    let region = SharedRegion::open(&Backing::Memfd, size).expect("region");
    Transport::attach(Arc::new(region), members).expect("attach")
}

#[test]
fn one_gib_moves_between_two_probes_checksummed() {
    require_kvm!();
    const BYTES: u64 = 1 << 30;
    let t = transport(2, 4 << 20);
    let rx = start("rx", &args(Workload::ShmemRecv, 1, 0b01, BYTES), &t);
    let tx = start("tx", &args(Workload::ShmemSend, 0, 1, BYTES), &t);
    let (rx_exit, rx_info, rx_console) = end(rx);
    let (tx_exit, tx_info, tx_console) = end(tx);
    assert_eq!(rx_exit, VmExit::Guest(EXIT_OK), "receiver:\n{rx_console}");
    assert_eq!(tx_exit, VmExit::Guest(EXIT_OK), "sender:\n{tx_console}");
    let sent = record(&tx_info, 1);
    let got = record(&rx_info, 0);
    assert_eq!(sent[0], BYTES);
    assert_eq!(got[0], BYTES);
    assert_eq!(got[1], BYTES / CHUNK, "frames");
    assert_eq!(got[2], sent[2], "stream checksums differ");
    assert_eq!(
        got[2],
        expected_stream(SEED, BYTES),
        "not the sender's pattern"
    );
    let cycles = rx_info.results[results::SHM_END_TSC] - rx_info.results[results::SHM_START_TSC];
    if rx_info.tsc_khz > 0 {
        let secs = cycles as f64 / (rx_info.tsc_khz as f64 * 1000.0);
        eprintln!(
            "1 GiB in {:.3} s ({:.2} GiB/s), receiver idle polls {}, sender full polls {}",
            secs,
            1.0 / secs,
            rx_info.results[results::SHM_WAITS],
            tx_info.results[results::SHM_WAITS]
        );
    }
}

#[test]
fn a_receiver_logs_each_round_and_the_rounds_fit_in_the_transfer() {
    require_kvm!();
    const BYTES: u64 = 256 << 10;
    const ROUNDS: u64 = 12;
    let t = transport(2, 4 << 20);
    let mut rinfo = args(Workload::ShmemRecv, 1, 0b01, BYTES);
    let mut tinfo = args(Workload::ShmemSend, 0, 1, BYTES);
    rinfo.args[shmem_args::ROUNDS] = ROUNDS;
    tinfo.args[shmem_args::ROUNDS] = ROUNDS;
    let rx = start("rx", &rinfo, &t);
    let tx = start("tx", &tinfo, &t);
    let exit = rx.vm.wait_timeout(RUN_TIMEOUT);
    let info = probe::read_info(rx.vm.vm().memory()).expect("boot info");
    // One slot more than the rounds: nothing is logged past the last.
    let log = probe::round_log(rx.vm.vm().memory(), ROUNDS + 1).expect("round log");
    let (rx_exit, _, rx_console) = end(rx);
    let (tx_exit, tx_info, tx_console) = end(tx);
    assert_eq!(
        exit,
        Some(VmExit::Guest(EXIT_OK)),
        "receiver:\n{rx_console}"
    );
    assert_eq!(rx_exit, VmExit::Guest(EXIT_OK));
    assert_eq!(tx_exit, VmExit::Guest(EXIT_OK), "sender:\n{tx_console}");
    assert_eq!(info.results[results::SHM_ROUNDS], ROUNDS);
    assert_eq!(record(&info, 0)[0], BYTES * ROUNDS);
    assert_eq!(
        record(&info, 0)[2],
        record(&tx_info, 1)[2],
        "stream checksums"
    );
    assert_eq!(log.len() as u64, ROUNDS + 1);
    assert!(log[..ROUNDS as usize].iter().all(|&c| c > 0), "{log:?}");
    assert_eq!(log[ROUNDS as usize], 0, "a round past the last: {log:?}");
    // Rounds are disjoint parts of the whole transfer.
    let whole = info.results[results::SHM_END_TSC] - info.results[results::SHM_START_TSC];
    let sum: u64 = log.iter().sum();
    assert!(sum <= whole, "rounds {sum} cycles, transfer {whole}");
    assert_eq!(
        *log[..ROUNDS as usize].iter().min().unwrap_or(&0),
        info.results[results::SHM_ROUND_MIN]
    );
    assert_eq!(
        *log.iter().max().unwrap_or(&0),
        info.results[results::SHM_ROUND_MAX]
    );
}

/// `kind`: 0 ring messages, 1 the floor (one word each way), 2 the floor
/// then ring messages, 3 the copy floor (the message beside the word) then
/// ring messages.
fn ping_pong_info(me: u32, initiator: bool, bytes: u64, rounds: u64, kind: u8) -> BootInfo {
    let mut t = shmem::PingPongTask::new(me, 1 - me, initiator, bytes, rounds);
    t.line = kind == 1;
    t.floor_first = kind >= 2;
    t.copy_floor = kind == 3;
    t.seed = SEED;
    t.timeout_ms = PEER_TIMEOUT_MS;
    t.boot_info()
}

#[test]
fn ping_pong_echoes_every_message_and_logs_every_round_trip() {
    require_kvm!();
    const ROUNDS: u64 = 3000;
    for (bytes, kind) in [(64, 0), (4096, 0), (8, 1), (64, 2), (4096, 3)] {
        let t = transport(2, 1 << 20);
        let a = start("a", &ping_pong_info(0, true, bytes, ROUNDS, kind), &t);
        let b = start("b", &ping_pong_info(1, false, bytes, ROUNDS, kind), &t);
        let exit = a.vm.wait_timeout(RUN_TIMEOUT);
        let rounds = if kind >= 2 { 2 * ROUNDS } else { ROUNDS };
        let log = probe::round_log(a.vm.vm().memory(), rounds + 1).expect("round log");
        let (a_exit, a_info, a_console) = end(a);
        let (b_exit, _, b_console) = end(b);
        assert_eq!(
            exit,
            Some(VmExit::Guest(EXIT_OK)),
            "{bytes} B:\n{a_console}"
        );
        assert_eq!(a_exit, VmExit::Guest(EXIT_OK));
        assert_eq!(b_exit, VmExit::Guest(EXIT_OK), "{bytes} B:\n{b_console}");
        assert_eq!(a_info.results[results::SHM_ROUNDS], rounds);
        assert!(log[..rounds as usize].iter().all(|&c| c > 0), "{bytes} B");
        assert_eq!(log[rounds as usize], 0, "{bytes} B: a round past the last");
    }
}

#[test]
fn a_ping_pong_whose_peer_stops_answering_ends_with_peer_gone() {
    require_kvm!();
    let t = transport(2, 1 << 20);
    let a = start("a", &ping_pong_info(0, true, 64, 1000, 0), &t);
    // The other side answers 10 times, then powers off and leaves.
    let b = start("b", &ping_pong_info(1, false, 64, 10, 0), &t);
    let (b_exit, _, b_console) = end(b);
    assert_eq!(b_exit, VmExit::Guest(EXIT_OK), "{b_console}");
    let (a_exit, a_info, a_console) = end(a);
    assert_eq!(a_exit, VmExit::Guest(EXIT_FAILED), "{a_console}");
    assert_eq!(
        a_info.results[results::SHM_ERROR],
        RingError::PeerGone(1).code(),
        "{a_console}"
    );
}

/// Members 0, 1 and 2 send `bytes` each to member 3 at once over a region
/// of `region` bytes; those `in_place` names (and member 3 when it names
/// it) fill or read their frames in place. Checks every stream against
/// its sender's pattern.
fn three_senders_to_one(bytes: u64, region: u64, in_place: impl Fn(u32) -> bool) {
    let t = transport(4, region);
    let mut rx = task(Workload::ShmemRecv, 3, 0b0111, bytes);
    rx.zero_copy = in_place(3);
    let rx = start("rx", &rx.boot_info(), &t);
    let txs: Vec<Member> = (0..3)
        .map(|m| {
            let mut tx = task(Workload::ShmemSend, m, 3, bytes);
            tx.zero_copy = in_place(m);
            start(&format!("tx{m}"), &tx.boot_info(), &t)
        })
        .collect();
    let (rx_exit, rx_info, rx_console) = end(rx);
    assert_eq!(rx_exit, VmExit::Guest(EXIT_OK), "receiver:\n{rx_console}");
    for (m, tx) in txs.into_iter().enumerate() {
        let (exit, info, console) = end(tx);
        assert_eq!(exit, VmExit::Guest(EXIT_OK), "sender {m}:\n{console}");
        let got = record(&rx_info, m as u32);
        assert_eq!(got[0], bytes, "bytes from {m}");
        assert_eq!(got[2], record(&info, 3)[2], "stream checksum from {m}");
        assert_eq!(
            got[2],
            expected_stream(SEED + m as u64, bytes),
            "not sender {m}'s pattern"
        );
    }
}

#[test]
fn three_senders_reach_one_receiver() {
    require_kvm!();
    three_senders_to_one(8 << 20, 8 << 20, |_| false);
}

#[test]
fn frames_filled_and_read_in_place_carry_each_senders_pattern() {
    require_kvm!();
    // 64 KiB frames in 512 KiB rings: frames wrap past the rings' ends.
    // Senders 0 and 2 fill frames in place, 1 copies; the receiver sums
    // every frame where it lies.
    three_senders_to_one(64 << 20, 8 << 20, |m| m != 1);
}

#[test]
fn a_member_stopped_mid_transfer_is_reported_gone() {
    require_kvm!();
    // Far more than can move before the sender is stopped.
    const BYTES: u64 = 1 << 40;
    let t = transport(2, 1 << 20);
    let rx = start("rx", &args(Workload::ShmemRecv, 1, 0b01, BYTES), &t);
    let tx = start("tx", &args(Workload::ShmemSend, 0, 1, BYTES), &t);
    assert!(probe::wait_state(
        rx.vm.vm().memory(),
        State::Ready,
        RUN_TIMEOUT
    ));
    // Stop the sender once the receiver has taken a frame.
    let ring = t.ring_region();
    let geo = t.geometry();
    wait_until("the receiver to take a frame", || {
        ring.ring_state(&geo, 0, 1).unwrap().tail > 0
    });
    let (tx_exit, _, _) = {
        tx.vm.stop();
        end(tx)
    };
    assert_eq!(tx_exit, VmExit::Stopped);
    let (rx_exit, rx_info, rx_console) = end(rx);
    assert_eq!(
        rx_exit,
        VmExit::Guest(EXIT_FAILED),
        "receiver:\n{rx_console}"
    );
    assert_eq!(
        rx_info.results[results::SHM_ERROR],
        RingError::PeerGone(0).code(),
        "receiver:\n{rx_console}"
    );
    assert_eq!(rx_info.results[results::SHM_ERROR_DETAIL], 0);
    let got = record(&rx_info, 0);
    assert!(
        got[0] > 0 && got[0].is_multiple_of(CHUNK),
        "received {} bytes",
        got[0]
    );
}

#[test]
fn a_restarted_pair_never_reads_what_an_interrupted_transfer_left() {
    require_kvm!();
    let t = transport(2, 1 << 20);
    let (ring, geo) = (t.ring_region(), t.geometry());
    // A transfer that cannot finish; its receiver's VM is stopped while
    // its membership (and so its heartbeat) stays, so the sender, seeing
    // it alive, fills the ring before the receiver is gone.
    let rx = start("rx1", &args(Workload::ShmemRecv, 1, 0b01, 1 << 40), &t);
    let tx = start("tx1", &args(Workload::ShmemSend, 0, 1, 1 << 40), &t);
    wait_until("the receiver to take a frame", || {
        ring.ring_state(&geo, 0, 1).unwrap().tail > 0
    });
    rx.vm.stop();
    let Member { vm, membership, .. } = rx;
    assert_eq!(vm.join(), VmExit::Stopped);
    wait_until("frames the receiver will never take", || {
        let s = ring.ring_state(&geo, 0, 1).unwrap();
        s.head.wrapping_sub(s.tail) >= frame_bytes(CHUNK)
    });
    drop(membership);
    let (tx_exit, tx_info, tx_console) = end(tx);
    assert_eq!(tx_exit, VmExit::Guest(EXIT_FAILED), "sender:\n{tx_console}");
    assert_eq!(
        tx_info.results[results::SHM_ERROR],
        RingError::PeerGone(1).code()
    );
    // Both restart on the same region (not formatted again): the new
    // transfer starts at sequence 0 and must not read the old frames.
    const BYTES: u64 = 8 << 20;
    let rx = start("rx2", &args(Workload::ShmemRecv, 1, 0b01, BYTES), &t);
    let tx = start("tx2", &args(Workload::ShmemSend, 0, 1, BYTES), &t);
    let (rx_exit, rx_info, rx_console) = end(rx);
    let (tx_exit, _, tx_console) = end(tx);
    assert_eq!(rx_exit, VmExit::Guest(EXIT_OK), "receiver:\n{rx_console}");
    assert_eq!(tx_exit, VmExit::Guest(EXIT_OK), "sender:\n{tx_console}");
    let got = record(&rx_info, 0);
    assert_eq!(got[0], BYTES);
    assert_eq!(got[2], expected_stream(SEED, BYTES));
}

#[test]
fn a_member_cannot_forge_frames_on_the_ring_of_another_pair() {
    require_kvm!();
    const BYTES: u64 = 4 << 20;
    let t = transport(3, 4 << 20);
    let rx = start("rx", &args(Workload::ShmemRecv, 1, 0b01, BYTES), &t);
    let mut tx = task(Workload::ShmemSend, 0, 1, BYTES);
    tx.hold = true;
    let tx = start("tx", &tx.boot_info(), &t);
    // Once the receiver says go it reads from the ring's current head, and
    // the sender holds its first frame: a frame published now would be
    // taken as the sender's first.
    let (ring, geo) = (t.ring_region(), t.geometry());
    wait_until("the receiver's go", || {
        ring.ready(&geo, 1).is_ok_and(is_go) || rx.vm.wait_timeout(Duration::ZERO).is_some()
    });
    let mut forger = task(Workload::ShmemSend, 2, 1, 0);
    forger.forge = true;
    let (exit, info, console) = end(start("forger", &forger.boot_info(), &t));
    assert_eq!(exit, VmExit::Guest(EXIT_OK), "forger:\n{console}");
    assert!(console.contains("on 0 of 2 rings"), "forger:\n{console}");
    assert_eq!(info.results[results::SHM_FORGED], 0);
    // Nor can it format the region under them: the header is read-only.
    assert_eq!(
        info.results[results::SHM_ERROR],
        RingError::NotWritable.code(),
        "forger:\n{console}"
    );
    probe::set_arg(tx.vm.vm().memory(), shmem_args::RELEASE, 1).expect("releasing the sender");
    let (tx_exit, tx_info, tx_console) = end(tx);
    let (rx_exit, rx_info, rx_console) = end(rx);
    assert_eq!(tx_exit, VmExit::Guest(EXIT_OK), "sender:\n{tx_console}");
    assert_eq!(rx_exit, VmExit::Guest(EXIT_OK), "receiver:\n{rx_console}");
    let got = record(&rx_info, 0);
    assert_eq!(got[0], BYTES);
    assert_eq!(got[2], record(&tx_info, 1)[2]);
    assert_eq!(got[2], expected_stream(SEED, BYTES));
}

#[test]
fn a_hostile_member_corrupting_the_head_index_is_detected() {
    require_kvm!();
    const BYTES: u64 = 4 << 20;
    let t = transport(2, 1 << 20);
    let rx = start("rx", &args(Workload::ShmemRecv, 1, 0b01, BYTES), &t);
    let mut bad = ShmemTask::new(0, Role::Send { to: 1 }, BYTES);
    bad.chunk = CHUNK;
    bad.corrupt_head = true;
    bad.seed = SEED;
    bad.timeout_ms = PEER_TIMEOUT_MS;
    let bad = bad.boot_info();
    let tx = start("evil", &bad, &t);
    let (tx_exit, _, tx_console) = end(tx);
    assert_eq!(
        tx_exit,
        VmExit::Guest(EXIT_OK),
        "hostile sender:\n{tx_console}"
    );
    let (rx_exit, rx_info, rx_console) = end(rx);
    assert_eq!(
        rx_exit,
        VmExit::Guest(EXIT_FAILED),
        "receiver:\n{rx_console}"
    );
    assert_eq!(
        rx_info.results[results::SHM_ERROR],
        RingError::CorruptIndex(0).code(),
        "receiver:\n{rx_console}"
    );
    assert_eq!(
        rx_info.results[results::SHM_ERROR_DETAIL],
        0x1234_5670_0000_0008
    );
    // What arrived before the corruption (frames still in the ring are
    // lost with the head index) arrived intact.
    let got = record(&rx_info, 0);
    assert!(
        got[0] <= BYTES / 2 && got[0].is_multiple_of(CHUNK),
        "{got:?}"
    );
    if got[0] > 0 {
        assert_eq!(got[2], expected_stream(SEED, got[0]));
    }
    // Nothing else is harmed: once both have left, the same region is
    // formatted again and carries a clean transfer.
    let t = Transport::attach(t.region().clone(), 2).expect("re-attach");
    let rx = start("rx2", &args(Workload::ShmemRecv, 1, 0b01, 1 << 20), &t);
    let tx = start("tx2", &args(Workload::ShmemSend, 0, 1, 1 << 20), &t);
    let (tx_exit, tx_info, _) = end(tx);
    let (rx_exit, rx_info, rx_console) = end(rx);
    assert_eq!(
        (tx_exit, rx_exit),
        (VmExit::Guest(EXIT_OK), VmExit::Guest(EXIT_OK)),
        "{rx_console}"
    );
    assert_eq!(record(&rx_info, 0)[2], record(&tx_info, 1)[2]);
}
