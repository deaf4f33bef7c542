//! Probe guests on real /dev/kvm exchanging messages through the port-I/O
//! channel: both modes, every access width and `rep` form, three members
//! with peer selection, and a member stopped mid-transfer.

use std::sync::{Arc, Mutex};

use intervm_protocol::portio::{
    C_RECV_DESC, C_SEND, C_SEND_DESC, DEFAULT_BASE, PORT_COUNT, R_PEER_GONE,
};
use intervm_protocol::probe::{
    portio_args as a, BootInfo, State, Workload, EXIT_OK, PORTIO_MODE_DESCRIPTOR, PORTIO_MODE_PORT,
};
use intervm_testkit::{
    finish, probe_vm_with, require_kvm, wait_until, PEER_TIMEOUT_MS, RUN_TIMEOUT,
};
use portio_channel::{PortioDevice, PortioStats, RingLink};
use probe_image::shmem::{expected_stream, peer_record, ShmemResult};
use shared_region::{Backing, SharedRegion, Transport};
use vmm_core::boot::probe;
use vmm_core::devices::serial::SerialBuffer;
use vmm_core::memory::GuestMemoryMmap;
use vmm_core::{RunningVm, VmExit};

type Dev = Arc<Mutex<PortioDevice<RingLink, GuestMemoryMmap>>>;

struct Member {
    vm: RunningVm,
    console: SerialBuffer,
    dev: Option<Dev>,
}

#[derive(Clone, Copy)]
struct Plan {
    bytes: u64,
    message: u64,
    mode: u64,
    width: u64,
    rep: bool,
}

const SEED: u64 = 0xabc;

fn info(w: Workload, peers: u64, p: Plan, seed: u64) -> BootInfo {
    let mut i = BootInfo::new(w, 0, 0);
    i.args[a::BASE] = DEFAULT_BASE as u64;
    i.args[a::PEERS] = peers;
    i.args[a::BYTES] = p.bytes;
    i.args[a::MESSAGE] = p.message;
    i.args[a::MODE] = p.mode;
    i.args[a::WIDTH] = p.width;
    i.args[a::REP] = p.rep as u64;
    i.args[a::SEED] = seed;
    i.args[a::TIMEOUT_MS] = 1000;
    i.args[a::JOIN_TIMEOUT_MS] = 60_000;
    i
}

fn start(name: &str, info: &BootInfo, t: &Transport, me: u32, keep_dev: bool) -> Member {
    let (vm, console) = probe_vm_with(name, info, 1, 64 << 20);
    let mut link = RingLink::join(t, me).expect("join");
    // A live peer counts as gone only after a hang, not after a moment
    // without CPU on a loaded host.
    link.set_stale_after_ms(PEER_TIMEOUT_MS);
    let dev = Arc::new(Mutex::new(PortioDevice::new(link, vm.memory().clone())));
    vm.add_pio_device(DEFAULT_BASE, PORT_COUNT, dev.clone())
        .expect("ports");
    Member {
        vm: vm.start().expect("start"),
        console,
        dev: keep_dev.then_some(dev),
    }
}

fn end(m: Member) -> (VmExit, BootInfo, String, PortioStats) {
    // 1 MiB in port mode is 262,144 exits (about a minute here, more while
    // other tests share the CPUs): the bound only catches a hang.
    let (exit, info) = finish(m.vm, &m.console, RUN_TIMEOUT * 10);
    let stats = m.dev.map(|d| d.lock().unwrap().stats()).unwrap_or_default();
    (exit, info, m.console.contents(), stats)
}

fn transport(members: u32) -> Transport {
    let r = SharedRegion::open(&Backing::Memfd, 1 << 20).expect("region");
    Transport::attach(Arc::new(r), members).expect("attach")
}

/// Member 0 sends `p` to member 1; checks the stream end to end and returns
/// the receiver's time and both sides' device counters.
fn pair(p: Plan) -> (f64, PortioStats, PortioStats) {
    let t = transport(2);
    let rx = start("rx", &info(Workload::PortioRecv, 0b01, p, 0), &t, 1, true);
    let tx = start("tx", &info(Workload::PortioSend, 1, p, SEED), &t, 0, true);
    let (tx_exit, tx_info, tx_console, tx_stats) = end(tx);
    let (rx_exit, rx_info, rx_console, rx_stats) = end(rx);
    assert_eq!(tx_exit, VmExit::Guest(EXIT_OK), "sender:\n{tx_console}");
    assert_eq!(rx_exit, VmExit::Guest(EXIT_OK), "receiver:\n{rx_console}");
    let got = peer_record(&rx_info, 0);
    assert_eq!(got.bytes, p.bytes);
    assert_eq!(got.stream, peer_record(&tx_info, 1).stream);
    assert_eq!(
        got.stream,
        expected_stream(SEED, p.bytes, p.message),
        "payload differs"
    );
    let secs = ShmemResult::from_info(&rx_info).seconds().unwrap_or(0.0);
    (secs, tx_stats, rx_stats)
}

#[test]
fn one_mib_in_port_mode_with_dword_access() {
    require_kvm!();
    let p = Plan {
        bytes: 1 << 20,
        message: 4096,
        mode: PORTIO_MODE_PORT,
        width: 4,
        rep: false,
    };
    let (secs, tx, rx) = pair(p);
    eprintln!(
        "port mode, 32-bit out: 1 MiB in {secs:.2} s, sender {} accesses, receiver {}",
        tx.accesses, rx.accesses
    );
    // One access per dword, plus a few per message.
    assert!(tx.data_accesses >= (1 << 18) && tx.sent == 256, "{tx:?}");
    assert_eq!(rx.received_bytes, 1 << 20);
}

#[test]
fn one_mib_in_descriptor_mode() {
    require_kvm!();
    let p = Plan {
        bytes: 1 << 20,
        message: 64 << 10,
        mode: PORTIO_MODE_DESCRIPTOR,
        width: 4,
        rep: false,
    };
    let (secs, tx, rx) = pair(p);
    eprintln!(
        "descriptor mode: 1 MiB in {secs:.4} s, sender {} accesses, receiver {}",
        tx.accesses, rx.accesses
    );
    // One SEND_DESC moves each message (plus one per "would block"
    // refusal, whose number depends on scheduling), no byte goes through
    // the data register, and the receiver takes each with one RECV_DESC.
    assert_eq!((tx.sent, tx.data_accesses, tx.errors), (16, 0, 0), "{tx:?}");
    assert_eq!(
        tx.commands[C_SEND_DESC as usize],
        tx.sent + tx.would_block,
        "{tx:?}"
    );
    assert_eq!(tx.commands[C_SEND as usize], 0, "{tx:?}");
    assert_eq!(rx.received, 16);
    assert_eq!(rx.commands[C_RECV_DESC as usize], 16, "{rx:?}");
    // Its only data-register access is the one-byte "go".
    assert_eq!(rx.data_accesses, 1, "{rx:?}");
}

#[test]
fn every_width_with_and_without_rep() {
    require_kvm!();
    for width in [1, 2, 4] {
        for rep in [false, true] {
            // An odd message size exercises the tail bytes.
            let p = Plan {
                bytes: 6000,
                message: 1000 + width * 3 + 1,
                mode: PORTIO_MODE_PORT,
                width,
                rep,
            };
            let (_, tx, _) = pair(p);
            assert!(
                tx.data_accesses >= 6000 / width,
                "width {width} rep {rep}: {tx:?}"
            );
        }
    }
}

#[test]
fn three_members_with_peer_selection() {
    require_kvm!();
    let p = Plan {
        bytes: 64 << 10,
        message: 8 << 10,
        mode: PORTIO_MODE_DESCRIPTOR,
        width: 4,
        rep: false,
    };
    let t = transport(3);
    let rx = start("rx", &info(Workload::PortioRecv, 0b011, p, 0), &t, 2, false);
    let txs: Vec<Member> = (0..2)
        .map(|m| {
            let i = info(Workload::PortioSend, 2, p, SEED + m as u64);
            start(&format!("tx{m}"), &i, &t, m, false)
        })
        .collect();
    let (rx_exit, rx_info, rx_console, _) = end(rx);
    assert_eq!(rx_exit, VmExit::Guest(EXIT_OK), "{rx_console}");
    for (m, tx) in txs.into_iter().enumerate() {
        let (exit, _, console, _) = end(tx);
        assert_eq!(exit, VmExit::Guest(EXIT_OK), "{console}");
        let got = peer_record(&rx_info, m as u32);
        assert_eq!(got.bytes, p.bytes, "from {m}");
        assert_eq!(
            got.stream,
            expected_stream(SEED + m as u64, p.bytes, p.message)
        );
    }
}

#[test]
fn a_member_stopped_mid_transfer_is_reported_gone() {
    require_kvm!();
    let p = Plan {
        bytes: 1 << 40,
        message: 16 << 10,
        mode: PORTIO_MODE_DESCRIPTOR,
        width: 4,
        rep: false,
    };
    let t = transport(2);
    let rx = start("rx", &info(Workload::PortioRecv, 0b01, p, 0), &t, 1, true);
    let tx = start("tx", &info(Workload::PortioSend, 1, p, SEED), &t, 0, false);
    assert!(probe::wait_state(
        rx.vm.vm().memory(),
        State::Ready,
        RUN_TIMEOUT
    ));
    // Stop the sender once a message reached the receiver's device (which
    // hands it to the guest whatever happens to the sender).
    let rx_dev = rx.dev.clone().unwrap();
    wait_until("a message to reach the receiver", || {
        rx_dev.lock().unwrap().stats().received > 0
    });
    drop(rx_dev);
    tx.vm.stop();
    let (tx_exit, ..) = end(tx);
    assert_eq!(tx_exit, VmExit::Stopped);
    let (rx_exit, rx_info, rx_console, _) = end(rx);
    assert_ne!(rx_exit, VmExit::Guest(EXIT_OK), "{rx_console}");
    let res = ShmemResult::from_info(&rx_info);
    assert_eq!(res.error, Some((R_PEER_GONE as u64, 0)), "{rx_console}");
    let got = peer_record(&rx_info, 0);
    assert!(
        got.bytes > 0 && got.bytes.is_multiple_of(p.message),
        "{got:?}"
    );
    assert_eq!(got.stream, expected_stream(SEED, got.bytes, p.message));
}

#[test]
fn a_descriptor_ping_pong_echoes_every_message_and_logs_every_round_trip() {
    require_kvm!();
    const ROUNDS: u64 = 100;
    for bytes in [64u64, 4096] {
        let t = transport(2);
        let side = |me: u32| {
            let mut k = probe_image::portio::PingPongTask::new(1 - me, me == 0, bytes, ROUNDS);
            k.seed = SEED;
            k.timeout_ms = PEER_TIMEOUT_MS;
            k.boot_info()
        };
        let b = start("pong", &side(1), &t, 1, true);
        let a = start("ping", &side(0), &t, 0, true);
        let log = {
            let exit = a.vm.wait_timeout(RUN_TIMEOUT);
            assert!(exit.is_some(), "{bytes} B: the initiator hung");
            probe::round_log(a.vm.vm().memory(), ROUNDS + 1).expect("round log")
        };
        let (a_exit, a_info, a_console, a_stats) = end(a);
        let (b_exit, _, b_console, b_stats) = end(b);
        assert_eq!(a_exit, VmExit::Guest(EXIT_OK), "{bytes} B:\n{a_console}");
        assert_eq!(b_exit, VmExit::Guest(EXIT_OK), "{bytes} B:\n{b_console}");
        // Every echo was compared byte for byte by the initiator; each
        // side sent and received one descriptor message per round.
        assert_eq!(
            a_info.results[intervm_protocol::probe::results::SHM_ROUNDS],
            ROUNDS
        );
        assert!(log[..ROUNDS as usize].iter().all(|&c| c > 0), "{bytes} B");
        assert_eq!(log[ROUNDS as usize], 0, "{bytes} B: a round past the last");
        for s in [a_stats, b_stats] {
            assert_eq!((s.sent, s.received), (ROUNDS, ROUNDS), "{bytes} B: {s:?}");
            assert_eq!(s.sent_bytes, ROUNDS * bytes);
        }
    }
}
