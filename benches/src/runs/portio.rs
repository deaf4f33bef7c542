//! The port-I/O channel VM to VM, per mode and access width.
#![allow(missing_docs)]

use std::sync::{Arc, Mutex};
use std::time::Duration;

use intervm_protocol::portio::{DEFAULT_BASE, PORT_COUNT};
use intervm_protocol::probe::{results, BootInfo, Workload};
use portio_channel::{PortioDevice, PortioStats, RingLink};
use probe_image::portio::{PortioTask, Role};
use probe_image::shmem::{peer_record, ShmemResult};
use shmem_device::{Backing, SharedRegion, Transport};
use vmm_core::{boot::probe, devices::serial::SerialOutput, Vm, VmConfig};

#[derive(Clone, Copy)]
pub struct Mode {
    pub label: &'static str,
    pub descriptor: bool,
    pub width: u8,
    pub rep: bool,
    /// Largest size measured by default (bytes).
    pub cap: u64,
    /// Bytes per message (descriptor modes).
    pub message: u64,
    /// Bytes of the channel's region: its two rings hold about half each,
    /// which bounds a message.
    pub region: u64,
}

pub const MODES: [Mode; 6] = [
    Mode {
        label: "port-8bit",
        descriptor: false,
        width: 1,
        rep: false,
        cap: 16 << 10,
        message: 4096,
        region: 4 << 20,
    },
    Mode {
        label: "port-16bit",
        descriptor: false,
        width: 2,
        rep: false,
        cap: 32 << 10,
        message: 4096,
        region: 4 << 20,
    },
    Mode {
        label: "port-32bit",
        descriptor: false,
        width: 4,
        rep: false,
        cap: 64 << 10,
        message: 4096,
        region: 4 << 20,
    },
    Mode {
        label: "rep-outsd",
        descriptor: false,
        width: 4,
        rep: true,
        cap: 64 << 10,
        message: 4096,
        region: 4 << 20,
    },
    Mode {
        label: "descriptor",
        descriptor: true,
        width: 4,
        rep: false,
        cap: 1 << 30,
        message: 128 << 10,
        region: 4 << 20,
    },
    // Large descriptors: a handful of exits per 8 MiB instead of per
    // 128 KiB; the rings of a 64 MiB region take them.
    Mode {
        label: "descriptor-8MiB",
        descriptor: true,
        width: 4,
        rep: false,
        cap: 1 << 30,
        message: 8 << 20,
        region: 64 << 20,
    },
];

pub struct Run {
    pub secs: f64,
    pub tx: PortioStats,
    pub rx: PortioStats,
}

pub fn vm(
    name: &str,
    info: &BootInfo,
    t: &Transport,
    me: u32,
) -> (
    vmm_core::RunningVm,
    Arc<Mutex<PortioDevice<RingLink, vmm_core::memory::GuestMemoryMmap>>>,
) {
    let mut cfg = VmConfig::new(name, 64 << 20);
    cfg.serial = SerialOutput::Sink;
    let vm = Vm::new(&cfg).expect("VM");
    probe::load(&vm, probe_image::PROBE_ELF, info).expect("probe");
    let dev = Arc::new(Mutex::new(PortioDevice::new(
        RingLink::join(t, me).expect("join"),
        vm.memory().clone(),
    )));
    vm.add_pio_device(DEFAULT_BASE, PORT_COUNT, dev.clone())
        .expect("ports");
    (vm.start().expect("start"), dev)
}

/// A channel's region, its pages faulted in as `intervm` does for port-I/O
/// channels, unless `INTERVM_BENCH_COLD_RING=1` (to measure what the first
/// transfers through a fresh ring pay).
fn channel(bytes: u64) -> Transport {
    let region = SharedRegion::open(&Backing::Memfd, bytes).expect("region");
    if std::env::var("INTERVM_BENCH_COLD_RING").as_deref() != Ok("1") {
        region.populate().expect("populating the ring");
    }
    Transport::attach(Arc::new(region), 2).expect("attach")
}

pub fn transfer(m: Mode, bytes: u64) -> Run {
    let t = channel(m.region);
    let task = |role| {
        let mut k = PortioTask::new(role, bytes);
        k.descriptor = m.descriptor;
        k.width = m.width;
        k.rep = m.rep;
        k.message = m.message;
        k.seed = 9;
        k.boot_info()
    };
    // The receiver's clock starts when it sends its "go", as soon as the
    // sender's VMM has joined: the sender's guest must be waiting for it by
    // then, or the time includes the sender's boot.
    let limit = Duration::from_secs(3600);
    let (tx, txd) = vm("tx", &task(Role::Send { to: 1 }), &t, 0);
    assert!(
        probe::wait_state(
            tx.vm().memory(),
            intervm_protocol::probe::State::Ready,
            limit
        ),
        "the sender never got ready"
    );
    let (rx, rxd) = vm("rx", &task(Role::Recv { from: 1 }), &t, 1);
    rx.wait_timeout(limit).expect("receiver finished");
    tx.wait_timeout(limit).expect("sender finished");
    let ri = probe::read_info(rx.vm().memory()).expect("info");
    let ti = probe::read_info(tx.vm().memory()).expect("info");
    let res = ShmemResult::from_info(&ri);
    assert!(res.error.is_none(), "{}: {:?}", m.label, res.error);
    assert_eq!(peer_record(&ri, 0).bytes, bytes);
    assert_eq!(peer_record(&ri, 0).stream, peer_record(&ti, 1).stream);
    let (tx_stats, rx_stats) = (txd.lock().unwrap().stats(), rxd.lock().unwrap().stats());
    Run {
        secs: res.seconds().unwrap_or(0.0),
        tx: tx_stats,
        rx: rx_stats,
    }
}

/// Two probe VMs ping-pong `rounds` descriptor messages of `bytes` over a
/// port-I/O channel; returns the initiator's round trips, in seconds.
pub fn ping_pong(bytes: u64, rounds: u64) -> Vec<f64> {
    let t = channel(4 << 20);
    let side = |me: u32| {
        let mut k = probe_image::portio::PingPongTask::new(1 - me, me == 0, bytes, rounds);
        k.seed = 9;
        k.boot_info()
    };
    let (b, _) = vm("pong", &side(1), &t, 1);
    let (a, _) = vm("ping", &side(0), &t, 0);
    super::Rounds::of_ping_pong(&a, &b, rounds).each
}

/// The raw CPL3 port-I/O exit round trip (the foundation bench's number).
pub fn raw_exit() -> f64 {
    let mut info = BootInfo::new(Workload::PioRoundTrip, 0, 0);
    info.args[0] = 2000;
    let mut cfg = VmConfig::new("raw", 16 << 20);
    cfg.serial = SerialOutput::Sink;
    let vm = Vm::new(&cfg).expect("VM");
    probe::load(&vm, probe_image::PROBE_ELF, &info).expect("probe");
    let r = vm.start().expect("start");
    r.wait_timeout(Duration::from_secs(120)).expect("finished");
    let i = probe::read_info(r.vm().memory()).expect("info");
    i.results[results::PIO_CPL3_CYCLES] as f64 / i.tsc_khz.max(1) as f64 / 1e3 / 2000.0
}
