//! Embeds the doorbell channel in a VMM: two probe VMs, one
//! ivshmem-doorbell device each on the same region, wired in this process
//! (no server), ringing each other 1000 times: each ring is an MSI-X
//! interrupt in the peer, through `ioeventfd -> irqfd` in the kernel.
//!
//! ```text
//! cargo run --release -p interrupt-doorbell --example doorbell_pair [-- --vmm-path]
//! ```
//!
//! `--vmm-path` sends every doorbell through this process instead (the
//! fallback for a KVM without ioeventfds). Needs `/dev/kvm` (it says so and
//! exits 1 without it) and this repository: the probe guest comes from the
//! `probe-image` crate, which builds `guests/probe`.

use std::sync::Arc;
use std::time::Duration;

use interrupt_doorbell::device::new_eventfds;
use interrupt_doorbell::{group, IvshmemDoorbell};
use intervm_protocol::probe::{doorbell_args, results, BootInfo, Workload, EXIT_OK};
use shared_region::{Backing, SharedRegion};
use vmm_core::{boot::probe, Vm, VmConfig, VmExit};

const ROUNDS: u64 = 1000;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(why) = vmm_core::host::kvm_unavailable_reason() {
        eprintln!("cannot run: {why}");
        std::process::exit(1);
    }
    let in_kernel = !std::env::args().any(|a| a == "--vmm-path");
    // The shared memory (BAR2); the doorbells need no ring in it.
    let region = Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20)?);

    let mut vms = Vec::new();
    let mut devices = Vec::new();
    for (id, name) in [(0u16, "initiator"), (1, "responder")] {
        let vm = Vm::new(&VmConfig::new(name, 64 << 20))?;
        // Two MSI-X vectors, each with the eventfd a peer's doorbell
        // signals; `in_kernel` registers the doorbell register as an
        // ioeventfd so a ring never reaches this process.
        let dev = IvshmemDoorbell::new(&vm, region.clone(), id, new_eventfds(2)?, in_kernel)?;
        vm.add_pci_device(dev.clone())?;
        let mut info = BootInfo::new(Workload::DoorbellPingPong, 0, 0);
        info.args[doorbell_args::PEER] = u64::from(1 - id);
        info.args[doorbell_args::ROUNDS] = ROUNDS;
        info.args[doorbell_args::INITIATOR] = u64::from(id == 0);
        probe::load(&vm, probe_image::PROBE_ELF, &info)?;
        vms.push(vm);
        devices.push(dev);
    }
    // Each device learns the other's eventfds (a server does this across
    // processes: see the server_and_clients example).
    group::wire(&devices)?;
    let running: Vec<_> = vms
        .into_iter()
        .map(|vm| vm.start())
        .collect::<Result<_, _>>()?;

    for (vm, dev) in running.iter().zip(&devices) {
        let exit = vm
            .wait_timeout(Duration::from_secs(120))
            .ok_or("a VM did not finish in 120 s")?;
        let info = probe::read_info(vm.vm().memory())?;
        let stats = dev.lock().map_err(|_| "device lock poisoned")?.stats();
        println!(
            "{}: {:?}, {} round trips, {} interrupts taken; doorbells through this process: {}",
            vm.vm().name(),
            exit,
            info.results[results::DB_ROUNDS],
            info.results[results::DB_IRQS],
            stats.rung
        );
        if exit != VmExit::Guest(EXIT_OK) || info.results[results::DB_ROUNDS] != ROUNDS {
            return Err(format!("{} failed", vm.vm().name()).into());
        }
        if vm.vm().name() == "initiator" {
            let khz = info.tsc_khz.max(1) as f64;
            let us = |c: u64| c as f64 / khz * 1e3;
            println!(
                "round trip: mean {:.1} us, min {:.1} us",
                us(info.results[results::DB_TOTAL_CYCLES]) / ROUNDS as f64,
                us(info.results[results::DB_MIN_CYCLES])
            );
        }
    }
    Ok(())
}
