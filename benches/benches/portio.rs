//! Port-I/O channel: time to move 4 KiB, 2 MiB and 1 GiB VM to VM, per mode
//! and access width, with exits per KiB and the cost per exit beside the raw
//! port-I/O exit round trip measured in the same run.
//!
//! Port mode costs one exit per access, so large sizes are extrapolated
//! linearly from a measured run (the output says from what). By default
//! the measured run is capped to keep the bench short; set
//! `INTERVM_PORTIO_FULL=1` to measure at least 64 MiB before extrapolating
//! (a 1 GiB run in port mode would take hours on PVM).
//!
//! Times are the receiver's TSC from its start line to the last byte.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use criterion::{criterion_group, BenchmarkId, Criterion};
use intervm_protocol::portio::{DEFAULT_BASE, PORT_COUNT};
use intervm_protocol::probe::{results, BootInfo, Workload};
use portio_channel::{PortioDevice, PortioStats, RingLink};
use probe_image::portio::PortioTask;
use probe_image::shmem::{peer_record, Role, ShmemResult};
use shmem_device::{Backing, SharedRegion, Transport};
use vmm_core::{boot::probe, devices::serial::SerialOutput, Vm, VmConfig};

#[derive(Clone, Copy)]
struct Mode {
    label: &'static str,
    descriptor: bool,
    width: u8,
    rep: bool,
    /// Largest size measured by default (bytes).
    cap: u64,
}

const MODES: [Mode; 5] = [
    Mode {
        label: "port-8bit",
        descriptor: false,
        width: 1,
        rep: false,
        cap: 16 << 10,
    },
    Mode {
        label: "port-16bit",
        descriptor: false,
        width: 2,
        rep: false,
        cap: 32 << 10,
    },
    Mode {
        label: "port-32bit",
        descriptor: false,
        width: 4,
        rep: false,
        cap: 64 << 10,
    },
    Mode {
        label: "rep-outsd",
        descriptor: false,
        width: 4,
        rep: true,
        cap: 64 << 10,
    },
    Mode {
        label: "descriptor",
        descriptor: true,
        width: 4,
        rep: false,
        cap: 1 << 30,
    },
];

const SIZES: [(u64, &str); 3] = [(4 << 10, "4KiB"), (2 << 20, "2MiB"), (1 << 30, "1GiB")];

struct Run {
    secs: f64,
    tx: PortioStats,
    rx: PortioStats,
}

fn vm(
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

fn transfer(m: Mode, bytes: u64) -> Run {
    let region = SharedRegion::open(&Backing::Memfd, 4 << 20).expect("region");
    let t = Transport::attach(Arc::new(region), 2).expect("attach");
    let task = |role| {
        let mut k = PortioTask::new(role, bytes);
        k.descriptor = m.descriptor;
        k.width = m.width;
        k.rep = m.rep;
        k.message = if m.descriptor { 128 << 10 } else { 4096 };
        k.seed = 9;
        k.boot_info()
    };
    let (rx, rxd) = vm("rx", &task(Role::Recv { from: 1 }), &t, 1);
    let (tx, txd) = vm("tx", &task(Role::Send { to: 1 }), &t, 0);
    let limit = Duration::from_secs(3600);
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

/// The raw CPL3 port-I/O exit round trip (the foundation bench's number).
fn raw_exit() -> f64 {
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

fn bench(c: &mut Criterion) {
    if let Some(why) = vmm_core::host::kvm_unavailable_reason() {
        eprintln!("SKIPPED portio: {why}");
        return;
    }
    let mut g = c.benchmark_group("portio_4KiB");
    g.sample_size(10).measurement_time(Duration::from_secs(10));
    for m in MODES {
        g.bench_function(BenchmarkId::new("vm_to_vm", m.label), |b| {
            b.iter_custom(|iters| {
                (0..iters)
                    .map(|_| Duration::from_secs_f64(transfer(m, 4 << 10).secs))
                    .sum()
            })
        });
    }
    g.finish();
}

fn summary() {
    if vmm_core::host::kvm_unavailable_reason().is_some() {
        return;
    }
    let full = std::env::var("INTERVM_PORTIO_FULL").is_ok_and(|v| v == "1");
    let raw = raw_exit();
    println!(
        "\nportio summary (raw CPL3 PIO exit round trip in this run: {:.1} us)",
        raw * 1e6
    );
    println!(
        "{:>11} {:>6} | {:>12} {:>10} | {:>12} {:>12} {:>11} | measured",
        "mode", "size", "time", "MiB/s", "tx exits/KiB", "rx exits/KiB", "us/tx exit"
    );
    for m in MODES {
        for (bytes, label) in SIZES {
            let cap = if full && !m.descriptor {
                m.cap.max(64 << 20)
            } else {
                m.cap
            };
            let measured = bytes.min(cap);
            let r = transfer(m, measured);
            let scale = bytes as f64 / measured as f64;
            let secs = r.secs * scale;
            let kib = measured as f64 / 1024.0;
            let (tx, rx) = (r.tx.accesses as f64, r.rx.accesses as f64);
            let note = if measured == bytes {
                "full run".to_string()
            } else {
                format!("extrapolated from {} KiB", measured >> 10)
            };
            println!(
                "{:>11} {label:>6} | {:>10.4} s {:>10.2} | {:>12.1} {:>12.1} {:>11.1} | {note}",
                m.label,
                secs,
                bytes as f64 / secs / (1 << 20) as f64,
                tx / kib,
                rx / kib,
                r.secs / tx * 1e6,
            );
        }
    }
}

criterion_group!(benches, bench);

fn main() {
    intervm_benches::main_with_summary(benches, summary);
}
