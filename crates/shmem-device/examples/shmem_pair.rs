//! Embeds the shared-memory channel in a VMM: two probe VMs, one ivshmem-plain
//! device each on the same region, 64 MiB moved from one to the other.
//!
//! ```text
//! cargo run --release -p shmem-device --example shmem_pair [-- /dev/shm/NAME]
//! ```
//!
//! With a path, the region is a POSIX shm object another program can open
//! (for example `intervm-guest shmem recv --resource /dev/shm/NAME`);
//! otherwise an anonymous memfd. Needs `/dev/kvm` (it says so and exits 1
//! without it) and this repository: the probe guest comes from the
//! `probe-image` crate, which builds `guests/probe`.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use probe_image::shmem::{expected_stream, peer_record, Role, ShmemResult, ShmemTask};
use shmem_device::{Backing, IvshmemPlain, SharedRegion, Transport};
use vmm_core::{boot::probe, Vm, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(why) = vmm_core::host::kvm_unavailable_reason() {
        eprintln!("cannot run: {why}");
        std::process::exit(1);
    }
    let backing = match std::env::args().nth(1) {
        Some(p) => Backing::Shm(p.trim_start_matches("/dev/shm/").to_string()),
        None => Backing::Memfd,
    };
    // One host memory object; the transport formats it for two members.
    let region = Arc::new(SharedRegion::open(&backing, 4 << 20)?);
    let transport = Transport::attach(region, 2)?;
    const BYTES: u64 = 64 << 20;

    let boot = |name: &str, me: u32, role: Role| -> Result<_, Box<dyn std::error::Error>> {
        let vm = Vm::new(&VmConfig::new(name, 64 << 20))?;
        // The device exposes the region as BAR2; the guest maps it directly,
        // writable only where this member writes (its own section).
        let mut dev = IvshmemPlain::new(transport.region().clone());
        dev.set_guest_read_only(transport.guest_read_only(me));
        vm.add_pci_device(Arc::new(Mutex::new(dev)))?;
        let mut task = ShmemTask::new(me, role, BYTES);
        task.seed = 42;
        // How long the peer's heartbeat may stand still before it counts
        // as gone: generous, for a busy host (only a hang trips it).
        task.timeout_ms = 30_000;
        probe::load(&vm, probe_image::PROBE_ELF, &task.boot_info())?;
        // Joining starts this member's heartbeat; dropping it tells peers
        // the VM left.
        let member = transport.join(me)?;
        Ok((vm.start()?, member))
    };
    let (rx, _rx_member) = boot("receiver", 1, Role::Recv { from: 0b01 })?;
    let (tx, _tx_member) = boot("sender", 0, Role::Send { to: 1 })?;
    for vm in [&rx, &tx] {
        let exit = vm
            .wait_timeout(Duration::from_secs(60))
            .ok_or("a VM did not finish in 60 s")?;
        println!("{}: {:?}", vm.vm().name(), exit);
    }
    let info = probe::read_info(rx.vm().memory())?;
    let res = ShmemResult::from_info(&info);
    let got = peer_record(&info, 0);
    let want = expected_stream(42, BYTES, 64 << 10);
    println!(
        "received {} bytes in {:.3} ms, stream checksum {:#x} ({})",
        got.bytes,
        res.seconds().unwrap_or(0.0) * 1e3,
        got.stream,
        if got.stream == want { "ok" } else { "MISMATCH" }
    );
    if got.stream != want || res.error.is_some() {
        return Err("transfer failed".into());
    }
    Ok(())
}
