//! Probe guests on real /dev/kvm ringing each other through ivshmem-doorbell
//! devices wired in one process: ping-pong without loss on the in-kernel and
//! the VMM path, INTx, a 1 GiB transfer paced by doorbells, and a sender
//! that leaves while the receiver sleeps.

use std::sync::{Arc, Mutex};

use interrupt_doorbell::device::new_eventfds;
use interrupt_doorbell::{group, IvshmemDoorbell};
use intervm_protocol::probe::{
    doorbell_args as a, results, BootInfo, Workload, DB_EDGE, DB_INTX, EXIT_OK,
};
use intervm_protocol::ring::RingError;
use intervm_testkit::{
    finish, probe_vm_with, release_after_receiver_sleeps, require_kvm, wait_until, PEER_TIMEOUT_MS,
    RUN_TIMEOUT,
};
use probe_image::shmem::{expected_stream, peer_record, Notify, Role, ShmemResult, ShmemTask};
use shared_region::{Backing, Membership, SharedRegion, Transport};
use vmm_core::devices::serial::SerialBuffer;
use vmm_core::host::KvmFlavor;
use vmm_core::{RunningVm, VmExit};

struct Member<V = RunningVm> {
    vm: V,
    console: SerialBuffer,
    dev: Arc<Mutex<IvshmemDoorbell>>,
    _m: Option<Membership>,
}

impl Member<vmm_core::Vm> {
    fn start(self) -> Member {
        Member {
            vm: self.vm.start().unwrap(),
            console: self.console,
            dev: self.dev,
            _m: self._m,
        }
    }
}

fn boot(
    name: &str,
    info: &BootInfo,
    region: &Arc<SharedRegion>,
    id: u16,
    fast: bool,
) -> (vmm_core::Vm, SerialBuffer, Arc<Mutex<IvshmemDoorbell>>) {
    let (vm, console) = probe_vm_with(name, info, 1, 64 << 20);
    let dev =
        IvshmemDoorbell::new(&vm, region.clone(), id, new_eventfds(2).unwrap(), fast).unwrap();
    vm.add_pci_device(dev.clone()).unwrap();
    (vm, console, dev)
}

fn ping_pong_info(initiator: bool, peer: u16, rounds: u64, flags: u64) -> BootInfo {
    let mut i = BootInfo::new(Workload::DoorbellPingPong, 0, 0);
    i.args[a::PEER] = peer as u64;
    i.args[a::ROUNDS] = rounds;
    i.args[a::INITIATOR] = initiator as u64;
    i.args[a::FLAGS] = flags;
    i
}

fn region() -> Arc<SharedRegion> {
    Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).unwrap())
}

/// Runs a ping-pong of `rounds` between two VMs; returns both boot-info
/// pages and device stats.
fn ping_pong(
    rounds: u64,
    flags: u64,
    fast: bool,
) -> Vec<(BootInfo, interrupt_doorbell::DoorbellStats)> {
    let r = region();
    let (va, ca, da) = boot("a", &ping_pong_info(true, 1, rounds, flags), &r, 0, fast);
    let (vb, cb, db) = boot("b", &ping_pong_info(false, 0, rounds, flags), &r, 1, fast);
    group::wire(&[da.clone(), db.clone()]).unwrap();
    let (ra, rb) = (vb.start().unwrap(), va.start().unwrap());
    let mut out = Vec::new();
    for (vm, c, d) in [(rb, ca, da), (ra, cb, db)] {
        let (exit, info) = finish(vm, &c, RUN_TIMEOUT * 3);
        assert_eq!(exit, VmExit::Guest(EXIT_OK), "{}", c.contents());
        let stats = d.lock().unwrap().stats();
        out.push((info, stats));
    }
    out
}

fn report(label: &str, info: &BootInfo) {
    let khz = info.tsc_khz.max(1) as f64;
    let us = |c: u64| c as f64 / khz * 1e3;
    let n = info.results[results::DB_ROUNDS].max(1);
    eprintln!(
        "{label}: {} round trips, mean {:.1} us, min {:.1} us, max {:.1} us",
        n,
        us(info.results[results::DB_TOTAL_CYCLES]) / n as f64,
        us(info.results[results::DB_MIN_CYCLES]),
        us(info.results[results::DB_MAX_CYCLES]),
    );
}

#[test]
fn ten_thousand_msix_round_trips_lose_nothing_in_kernel_path() {
    require_kvm!();
    let r = ping_pong(10_000, 0, true);
    for (info, stats) in &r {
        assert_eq!(info.results[results::DB_ROUNDS], 10_000);
        assert_eq!(
            info.results[results::DB_IRQS],
            10_000,
            "one interrupt per ring"
        );
        assert_eq!(stats.dropped, 0);
        // Every doorbell went through the ioeventfd, not the VMM.
        assert_eq!(stats.rung, 0, "{stats:?}");
    }
    assert_eq!(r[0].0.results[results::DB_IV_POSITION], 0);
    assert_eq!(r[1].0.results[results::DB_IV_POSITION], 1);
    report("MSI-X, ioeventfd -> irqfd", &r[0].0);
}

#[test]
fn the_vmm_path_delivers_too() {
    require_kvm!();
    let r = ping_pong(1000, 0, false);
    for (info, stats) in &r {
        assert_eq!(info.results[results::DB_IRQS], 1000);
        assert_eq!(
            stats.rung, 1000,
            "every doorbell through the VMM: {stats:?}"
        );
    }
    report("MSI-X, VMM doorbell handler", &r[0].0);
}

#[test]
fn intx_mode_delivers_every_doorbell() {
    require_kvm!();
    // PVM does not inject level-triggered IOAPIC interrupts (README, "Platform notes: PVM").
    let edge = if KvmFlavor::detect() == KvmFlavor::Pvm {
        DB_EDGE
    } else {
        0
    };
    let r = ping_pong(300, DB_INTX | edge, true);
    for (info, stats) in &r {
        assert_eq!(info.results[results::DB_ROUNDS], 300);
        assert_eq!(stats.intx, 300, "{stats:?}");
    }
    report("INTx", &r[0].0);
}

/// A member ready to start once the group is wired (a doorbell rung before
/// that would be dropped).
fn shmem_member(name: &str, task: &ShmemTask, t: &Transport, fast: bool) -> Member<vmm_core::Vm> {
    let (vm, console, dev) = boot(name, &task.boot_info(), t.region(), task.me as u16, fast);
    let m = t.join(task.me).unwrap();
    Member {
        vm,
        console,
        dev,
        _m: Some(m),
    }
}

fn notify_task(me: u32, role: Role, bytes: u64) -> ShmemTask {
    let mut t = ShmemTask::new(me, role, bytes);
    t.seed = 21;
    t.timeout_ms = PEER_TIMEOUT_MS;
    t
}

#[test]
fn one_gib_paced_by_doorbells_is_checksummed() {
    require_kvm!();
    const BYTES: u64 = 1 << 30;
    let t = Transport::attach(
        Arc::new(SharedRegion::open(&Backing::Memfd, 4 << 20).unwrap()),
        2,
    )
    .unwrap();
    let mut rx = notify_task(1, Role::Recv { from: 1 }, BYTES);
    let mut tx = notify_task(0, Role::Send { to: 1 }, BYTES);
    for k in [&mut rx, &mut tx] {
        k.notify = Notify::Always;
    }
    // The receiver sleeps at least once whatever the scheduling: the sender
    // holds its first frame until it did.
    tx.hold = true;
    let rxm = shmem_member("rx", &rx, &t, true);
    let txm = shmem_member("tx", &tx, &t, true);
    group::wire(&[rxm.dev.clone(), txm.dev.clone()]).unwrap();
    let (rxm, txm) = (rxm.start(), txm.start());
    release_after_receiver_sleeps(&rxm.vm, &txm.vm);
    let (tx_exit, _) = finish(txm.vm, &txm.console, RUN_TIMEOUT * 3);
    let (rx_exit, rx_info) = finish(rxm.vm, &rxm.console, RUN_TIMEOUT * 3);
    assert_eq!(
        tx_exit,
        VmExit::Guest(EXIT_OK),
        "{}",
        txm.console.contents()
    );
    assert_eq!(
        rx_exit,
        VmExit::Guest(EXIT_OK),
        "{}",
        rxm.console.contents()
    );
    let got = peer_record(&rx_info, 0);
    assert_eq!(got.bytes, BYTES);
    assert_eq!(got.stream, expected_stream(21, BYTES, 64 << 10));
    let res = ShmemResult::from_info(&rx_info);
    eprintln!(
        "1 GiB paced by doorbells in {:.3} s; receiver slept {} times",
        res.seconds().unwrap_or(0.0),
        res.sleeps
    );
    assert!(
        res.sleeps > 0 && res.waits >= res.sleeps,
        "the receiver never slept on a doorbell"
    );
}

#[test]
fn a_sender_that_leaves_wakes_the_sleeping_receiver() {
    require_kvm!();
    const SENT: u64 = 1 << 20;
    let t = Transport::attach(
        Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).unwrap()),
        2,
    )
    .unwrap();
    // The receiver waits for far more than the sender sends: once it has
    // taken everything it sleeps until rung, and nobody rings.
    let mut rx = notify_task(1, Role::Recv { from: 1 }, 1 << 40);
    let mut tx = notify_task(0, Role::Send { to: 1 }, SENT);
    for k in [&mut rx, &mut tx] {
        k.notify = Notify::Always;
    }
    let rxm = shmem_member("rx", &rx, &t, true);
    let txm = shmem_member("tx", &tx, &t, true);
    let devs = [rxm.dev.clone(), txm.dev.clone()];
    group::wire(&devs).unwrap();
    let (rxm, txm) = (rxm.start(), txm.start());
    let Member {
        vm, console, _m, ..
    } = txm;
    let (tx_exit, _) = finish(vm, &console, RUN_TIMEOUT);
    assert_eq!(tx_exit, VmExit::Guest(EXIT_OK), "{}", console.contents());
    // The sender's guest is done; wait until the receiver took every frame
    // and declared that it sleeps (after which it sleeps: nothing is left
    // to receive).
    let (ring, geo) = (t.ring_region(), t.geometry());
    wait_until("the receiver to sleep on an empty ring", || {
        let s = ring.ring_state(&geo, 0, 1).unwrap();
        s.head > 0 && s.tail == s.head && s.consumer_sleeping
    });
    // Now its VMM leaves, as `intervm run` does: the member is marked gone
    // and the peers are woken.
    drop(_m);
    group::leave(&devs, 0);
    let (exit, info) = finish(rxm.vm, &rxm.console, RUN_TIMEOUT);
    assert_ne!(exit, VmExit::Guest(EXIT_OK));
    let res = ShmemResult::from_info(&info);
    assert_eq!(
        res.error.map(|e| e.0),
        Some(RingError::PeerGone(0).code()),
        "{}",
        rxm.console.contents()
    );
    assert_eq!(peer_record(&info, 0).bytes, SENT, "what was sent arrived");
    assert!(res.sleeps > 0);
}

#[test]
fn hostile_register_accesses_are_dropped_and_counted() {
    use interrupt_doorbell::device::{DOORBELL, INTR_STATUS, IV_POSITION};
    use vmm_core::pci::PciDevice;
    require_kvm!();
    let (vm, _c) = probe_vm_with("h", &BootInfo::new(Workload::Hello, 0, 0), 1, 16 << 20);
    let own = new_eventfds(2).unwrap();
    let mine = own[1].try_clone().unwrap();
    let dev = IvshmemDoorbell::new(&vm, region(), 7, own, false).unwrap();
    let mut d = dev.lock().unwrap();
    let rd = |d: &mut IvshmemDoorbell, off: u64| {
        let mut b = [0u8; 4];
        d.bar_read(0, off, &mut b);
        u32::from_le_bytes(b)
    };
    assert_eq!(rd(&mut d, IV_POSITION), 7);
    for v in [99u32 << 16, (7 << 16) | 2, (7 << 16) | 0xffff, u32::MAX] {
        d.bar_write(0, DOORBELL, &v.to_le_bytes());
    }
    assert_eq!(d.stats().dropped, 4, "absent peers and vectors");
    d.bar_write(0, DOORBELL, &[1, 0]);
    d.bar_write(0, 0x80, &[0; 4]);
    d.bar_write(3, 0, &[0; 4]);
    let mut w = [0u8; 2];
    d.bar_read(0, INTR_STATUS, &mut w);
    assert_eq!(w, [0xff, 0xff]);
    assert_eq!(d.stats().bad_access, 4);
    // Ringing itself on vector 1 works (the fallback path, no BAR yet).
    d.bar_write(0, DOORBELL, &((7u32 << 16) | 1).to_le_bytes());
    assert!(vmm_core::irq::poll_readable(&mine));
    assert_eq!(d.stats().rung, 1);
    assert!(d.peers().is_empty());
}
