//! Boots a Linux kernel (and an initramfs) with the console on stdout.
//!
//! ```text
//! cargo run -p vmm-core --example boot_linux -- KERNEL [INITRD] [EXTRA CMDLINE...]
//! ```
//!
//! `KERNEL` is a `vmlinux` (best on PVM) or a `bzImage`; `scripts/guest-linux`
//! builds both under `target/guest-linux/`. The PVM switches are added when
//! the host's KVM is PVM. The VM stops when Linux reboots or panics (the
//! command line has `panic=-1 reboot=t`), or after `INTERVM_BOOT_TIMEOUT`
//! seconds (default 900).

use std::time::{Duration, Instant};

use vmm_core::boot::linux;
use vmm_core::{Vm, VmConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if let Some(why) = vmm_core::host::kvm_unavailable_reason() {
        eprintln!("cannot run: {why}");
        std::process::exit(1);
    }
    let mut args = std::env::args().skip(1);
    let kernel_path = args
        .next()
        .ok_or("usage: boot_linux KERNEL [INITRD] [EXTRA CMDLINE...]")?;
    let kernel = std::fs::read(&kernel_path).map_err(|e| format!("{kernel_path}: {e}"))?;
    let initrd = match args.next() {
        Some(p) if !p.is_empty() => Some(std::fs::read(&p).map_err(|e| format!("{p}: {e}"))?),
        _ => None,
    };
    let extra: Vec<String> = args.collect();
    let timeout = std::env::var("INTERVM_BOOT_TIMEOUT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(900);

    let vm = Vm::new(&VmConfig::new("linux", 256 << 20))?;
    let cmdline = linux::cmdline_for(vm.flavor(), &extra.join(" "));
    eprintln!(
        "[boot_linux] {:?} KVM, command line: {cmdline}",
        vm.flavor()
    );
    let loaded = linux::load(&vm, &kernel, initrd.as_deref(), &cmdline)?;
    eprintln!("[boot_linux] {loaded:?}");
    let started = Instant::now();
    let running = vm.start()?;
    let exit = running.wait_timeout(Duration::from_secs(timeout));
    let stats = &running.vm().control().stats;
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    eprintln!(
        "[boot_linux] {exit:?} after {:.1} s; exits: {} PIO, {} MMIO, {} unclaimed, {} emulated by the VMM",
        started.elapsed().as_secs_f64(),
        load(&stats.pio),
        load(&stats.mmio),
        load(&stats.unclaimed),
        load(&stats.emulated)
    );
    Ok(())
}
