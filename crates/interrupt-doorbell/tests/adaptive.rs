//! Adaptive notification between probe guests on real /dev/kvm: poll while
//! busy, ring only a side that declared it sleeps.

use std::sync::Arc;
use std::time::Duration;

use interrupt_doorbell::device::new_eventfds;
use interrupt_doorbell::{group, IvshmemDoorbell};
use intervm_protocol::probe::{results, BootInfo, EXIT_OK};
use intervm_testkit::{
    finish, probe_vm_with, release_after_receiver_sleeps, require_kvm, PEER_TIMEOUT_MS,
};
use probe_image::shmem::{expected_stream, peer_record, Notify, Role, ShmemResult, ShmemTask};
use shared_region::{Backing, SharedRegion, Transport};
use vmm_core::VmExit;

struct Outcome {
    rx: BootInfo,
    tx: BootInfo,
}

fn run(rx: ShmemTask, tx: ShmemTask, region: u64, limit: Duration) -> Outcome {
    let t = Transport::attach(
        Arc::new(SharedRegion::open(&Backing::Memfd, region).unwrap()),
        2,
    )
    .unwrap();
    let boot = |name: &str, task: &ShmemTask| {
        let (vm, console) = probe_vm_with(name, &task.boot_info(), 1, 64 << 20);
        let dev = IvshmemDoorbell::new(
            &vm,
            t.region().clone(),
            task.me as u16,
            new_eventfds(1).unwrap(),
            true,
        )
        .unwrap();
        vm.add_pci_device(dev.clone()).unwrap();
        (vm, console, dev, t.join(task.me).unwrap())
    };
    let (vr, cr, dr, mr) = boot("rx", &rx);
    let (vt, ct, dt, mt) = boot("tx", &tx);
    group::wire(&[dr, dt]).unwrap();
    let (rr, rt) = (vr.start().unwrap(), vt.start().unwrap());
    // The sender holds its first frame until the receiver slept once.
    release_after_receiver_sleeps(&rr, &rt);
    // A hang is a failure that shows both sides' state.
    let t0 = std::time::Instant::now();
    let done =
        |r: &vmm_core::RunningVm| r.wait_timeout(limit.saturating_sub(t0.elapsed())).is_some();
    if !(done(&rt) && done(&rr)) {
        let side = |name: &str, r: &vmm_core::RunningVm, peer: u32| {
            let i = vmm_core::boot::probe::read_info(r.vm().memory()).unwrap();
            let rec = peer_record(&i, peer);
            format!(
                "{name}: state {} bytes {} frames {} sleeps {} doorbells {} irqs {} error {}",
                i.state,
                rec.bytes,
                rec.frames,
                i.results[results::SHM_SLEEPS],
                i.results[results::SHM_DOORBELLS],
                i.results[results::SHM_IRQS],
                i.results[results::SHM_ERROR]
            )
        };
        panic!(
            "hang after {limit:?}:\n{}\n{}",
            side("receiver", &rr, 0),
            side("sender", &rt, 1)
        );
    }
    let (tx_exit, tx_info) = finish(rt, &ct, limit);
    let (rx_exit, rx_info) = finish(rr, &cr, limit);
    drop((mr, mt));
    assert_eq!(
        tx_exit,
        VmExit::Guest(EXIT_OK),
        "sender:\n{}",
        ct.contents()
    );
    assert_eq!(
        rx_exit,
        VmExit::Guest(EXIT_OK),
        "receiver:\n{}",
        cr.contents()
    );
    Outcome {
        rx: rx_info,
        tx: tx_info,
    }
}

fn pair(bytes: u64, chunk: u64) -> (ShmemTask, ShmemTask) {
    let mut rx = ShmemTask::new(1, Role::Recv { from: 1 }, bytes);
    let mut tx = ShmemTask::new(0, Role::Send { to: 1 }, bytes);
    for t in [&mut rx, &mut tx] {
        t.notify = Notify::Adaptive;
        t.chunk = chunk;
        t.seed = 77;
        t.timeout_ms = PEER_TIMEOUT_MS;
    }
    // The receiver sleeps (and is rung) at least once, whatever the
    // scheduling: see `run`.
    tx.hold = true;
    (rx, tx)
}

#[test]
fn a_bulk_transfer_rings_only_when_the_receiver_sleeps() {
    require_kvm!();
    const BYTES: u64 = 1 << 30;
    let (rx, tx) = pair(BYTES, 64 << 10);
    let o = run(rx, tx, 4 << 20, Duration::from_secs(120));
    let got = peer_record(&o.rx, 0);
    assert_eq!(got.bytes, BYTES);
    assert_eq!(got.stream, expected_stream(77, BYTES, 64 << 10));
    let rung = o.tx.results[results::SHM_DOORBELLS];
    let declared = o.rx.results[results::SHM_DECLARED];
    let secs = ShmemResult::from_info(&o.rx).seconds().unwrap_or(0.0);
    eprintln!(
        "adaptive 1 GiB in {secs:.3} s; sender rang {rung} doorbells ({:.2} per MiB) for 16384 frames, receiver declared {declared} sleeps, slept {}, took {} interrupts",
        rung as f64 / 1024.0,
        o.rx.results[results::SHM_SLEEPS],
        o.rx.results[results::SHM_IRQS]
    );
    // How often the receiver runs dry depends on scheduling; that the
    // sender rings only a receiver that declared it sleeps does not: each
    // doorbell takes one declaration.
    assert!(rung >= 1, "the sleeping receiver was never rung");
    assert!(
        rung <= declared,
        "{rung} doorbells for {declared} sleep declarations"
    );
}

#[test]
fn a_million_messages_with_random_delays_lose_nothing_and_never_hang() {
    require_kvm!();
    // 64-byte messages, random delays on both sides, now and then longer
    // than the polling budget so that both sides really sleep and wake.
    const BYTES: u64 = 64 << 20;
    let (mut rx, mut tx) = pair(BYTES, 64);
    for t in [&mut rx, &mut tx] {
        t.spin_us = 20;
        t.jitter_cycles = 200_000;
    }
    let o = run(rx, tx, 1 << 20, Duration::from_secs(240));
    let got = peer_record(&o.rx, 0);
    assert_eq!(got.frames, 1 << 20, "a million messages");
    assert_eq!(got.bytes, BYTES);
    assert_eq!(
        got.stream,
        expected_stream(77, BYTES, 64),
        "no message lost, duplicated or reordered"
    );
    let (rx_sleeps, tx_sleeps) = (
        o.rx.results[results::SHM_SLEEPS],
        o.tx.results[results::SHM_SLEEPS],
    );
    eprintln!(
        "1M messages: receiver slept {rx_sleeps}, rang {}; sender slept {tx_sleeps}, rang {}; {:.2} s",
        o.rx.results[results::SHM_DOORBELLS],
        o.tx.results[results::SHM_DOORBELLS],
        ShmemResult::from_info(&o.rx).seconds().unwrap_or(0.0)
    );
    assert!(
        rx_sleeps > 0,
        "the receiver never slept: the race was not exercised"
    );
    // Each side rang only a peer that declared it sleeps.
    let declared = |i: &BootInfo| i.results[results::SHM_DECLARED];
    assert!(o.tx.results[results::SHM_DOORBELLS] <= declared(&o.rx));
    assert!(o.rx.results[results::SHM_DOORBELLS] <= declared(&o.tx));
}

/// Two probes on doorbell devices ping-pong `rounds` messages of `bytes`
/// with notification `mode`; returns (initiator, responder) boot infos.
fn ping_pong(mode: Notify, bytes: u64, rounds: u64) -> (BootInfo, BootInfo) {
    use probe_image::shmem::PingPongTask;
    let t = Transport::attach(
        Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).unwrap()),
        2,
    )
    .unwrap();
    let boot = |name: &str, me: u32| {
        let mut task = PingPongTask::new(me, 1 - me, me == 0, bytes, rounds);
        task.notify = mode;
        task.timeout_ms = PEER_TIMEOUT_MS;
        let (vm, console) = probe_vm_with(name, &task.boot_info(), 1, 64 << 20);
        let dev = IvshmemDoorbell::new(
            &vm,
            t.region().clone(),
            me as u16,
            new_eventfds(1).unwrap(),
            true,
        )
        .unwrap();
        vm.add_pci_device(dev.clone()).unwrap();
        (vm, console, dev, t.join(me).unwrap())
    };
    let (vb, cb, db, mb) = boot("pong", 1);
    let (va, ca, da, ma) = boot("ping", 0);
    group::wire(&[da, db]).unwrap();
    let (rb, ra) = (vb.start().unwrap(), va.start().unwrap());
    let limit = Duration::from_secs(600);
    let (a_exit, a) = finish(ra, &ca, limit);
    let (b_exit, b) = finish(rb, &cb, limit);
    drop((ma, mb));
    assert_eq!(a_exit, VmExit::Guest(EXIT_OK), "ping:\n{}", ca.contents());
    assert_eq!(b_exit, VmExit::Guest(EXIT_OK), "pong:\n{}", cb.contents());
    assert_eq!(a.results[results::SHM_ROUNDS], rounds);
    (a, b)
}

#[test]
fn a_ping_pong_that_rings_every_message_wakes_every_sleep() {
    require_kvm!();
    const ROUNDS: u64 = 500;
    let (a, b) = ping_pong(Notify::Always, 64, ROUNDS);
    // Every message rang its receiver once, and every sleep was ended by
    // an interrupt of its own (both sides ended, and the initiator
    // compared every echo byte for byte). How many interrupts arrived is
    // not counted against the doorbells: a side that finds the message
    // before its interrupt lands does not sleep, and that interrupt may
    // merge with the next one while still pending.
    for (side, i) in [("ping", &a), ("pong", &b)] {
        assert_eq!(i.results[results::SHM_DOORBELLS], ROUNDS, "{side}");
        let (irqs, sleeps) = (i.results[results::SHM_IRQS], i.results[results::SHM_SLEEPS]);
        assert!(irqs >= sleeps, "{side}: {irqs} interrupts, {sleeps} sleeps");
    }
}

#[test]
fn an_adaptive_ping_pong_rings_only_a_side_that_sleeps() {
    require_kvm!();
    const ROUNDS: u64 = 2000;
    let (a, b) = ping_pong(Notify::Adaptive, 4096, ROUNDS);
    // Each side slept at most once per message it waited for, and was
    // rung at most once per sleep it declared; nothing was lost (both
    // ended, every echo checked).
    for (side, i) in [("ping", &a), ("pong", &b)] {
        let (rang, sleeps) = (
            i.results[results::SHM_DOORBELLS],
            i.results[results::SHM_SLEEPS],
        );
        assert!(
            sleeps <= ROUNDS && rang <= ROUNDS,
            "{side}: {rang} {sleeps}"
        );
    }
    assert!(
        a.results[results::SHM_IRQS] <= b.results[results::SHM_DOORBELLS],
        "ping got more interrupts than pong rang"
    );
}
