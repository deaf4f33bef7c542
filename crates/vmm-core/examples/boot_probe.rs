//! Boots the probe guest, times port-I/O exits from CPL3 and CPL0, and
//! prints what KVM flavour ran it.
//!
//! ```text
//! cargo run -p vmm-core --example boot_probe
//! ```

use intervm_protocol::probe::{results, BootInfo, Workload};
use vmm_core::{boot::probe, host::KvmFlavor, Vm, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(why) = vmm_core::host::kvm_unavailable_reason() {
        eprintln!("cannot run: {why}");
        std::process::exit(1);
    }
    let iterations = 1000;
    let mut info = BootInfo::new(Workload::PioRoundTrip, 0, 0);
    info.args[0] = iterations;
    let vm = Vm::new(&VmConfig::new("example", 16 << 20))?;
    probe::load(&vm, probe_image::PROBE_ELF, &info)?;
    let started = std::time::Instant::now();
    let running = vm.start()?;
    let exit = running
        .wait_timeout(std::time::Duration::from_secs(60))
        .ok_or("probe did not finish in 60 s")?;
    let info = probe::read_info(running.vm().memory())?;
    let exits = running
        .vm()
        .control()
        .stats
        .pio
        .load(std::sync::atomic::Ordering::Relaxed);
    drop(running);
    println!(
        "KVM flavour: {:?}; probe exit: {exit:?} after {:?}",
        KvmFlavor::detect(),
        started.elapsed()
    );
    let per_exit =
        |cycles: u64| cycles as f64 * 1000.0 / info.tsc_khz.max(1) as f64 / iterations as f64;
    println!(
        "{exits} PIO exits; one `out` round trip: CPL3 {:.2} us, CPL0 {:.2} us",
        per_exit(info.results[results::PIO_CPL3_CYCLES]),
        per_exit(info.results[results::PIO_CPL0_CYCLES])
    );
    Ok(())
}
