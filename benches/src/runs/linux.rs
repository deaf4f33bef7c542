//! Linux boot time under intervm: the kernel and initramfs that
//! `scripts/guest-linux` builds, booted on /dev/kvm with nothing else, timed
//! until the kernel starts `/init`.

use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use vmm_core::boot::linux;
use vmm_core::devices::serial::{SerialBuffer, SerialOutput};
use vmm_core::{Vm, VmConfig};

/// One boot.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinuxBoot {
    /// Wall-clock seconds from starting the vCPU to "Run /init" on the console.
    pub wall_to_init_s: f64,
    /// The kernel's own timestamp of "Run /init" (guest clock, seconds).
    pub guest_to_init_s: f64,
    /// The kernel's timestamp of "Unpacking initramfs...".
    pub guest_unpack_start_s: f64,
    /// The kernel's timestamp of "Freeing initrd memory" (unpacking done).
    pub guest_unpack_end_s: f64,
    /// Port-I/O exits until then (mostly the console).
    pub pio_exits: u64,
    /// Instructions the VMM completed for KVM's emulator (PVM).
    pub emulated: u64,
    /// Console bytes printed until then.
    pub console_bytes: usize,
}

/// The artifacts of `scripts/guest-linux`, if built.
pub fn artifacts() -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/guest-linux");
    let k = dir.join("vmlinux");
    let i = dir.join("initramfs.cpio");
    (k.is_file() && i.is_file()).then_some((k, i))
}

fn stamp(console: &str, what: &str) -> f64 {
    console
        .lines()
        .find(|l| l.contains(what))
        .and_then(|l| l.split('[').nth(1)?.split(']').next()?.trim().parse().ok())
        .unwrap_or(f64::NAN)
}

/// Boots `kernel` + `initrd` once (128 MiB, 1 vCPU) and times it to /init.
pub fn boot(kernel: &Path, initrd: &Path) -> Result<LinuxBoot, String> {
    let k = std::fs::read(kernel).map_err(|e| format!("{}: {e}", kernel.display()))?;
    let i = std::fs::read(initrd).map_err(|e| format!("{}: {e}", initrd.display()))?;
    let console = SerialBuffer::new();
    let mut cfg = VmConfig::new("linux", 128 << 20);
    cfg.serial = SerialOutput::Buffer(console.clone());
    let vm = Vm::new(&cfg).map_err(|e| e.to_string())?;
    let cmdline = linux::cmdline_for(vm.flavor(), "");
    linux::load(&vm, &k, Some(&i), &cmdline).map_err(|e| e.to_string())?;
    let t0 = Instant::now();
    let running = vm.start().map_err(|e| e.to_string())?;
    let deadline = t0 + Duration::from_secs(600);
    let wall = loop {
        if console.contents().contains("Run /init") {
            break t0.elapsed().as_secs_f64();
        }
        if let Some(exit) = running.wait_timeout(Duration::from_millis(20)) {
            return Err(format!(
                "Linux stopped before /init ({exit:?}):\n{}",
                console.contents()
            ));
        }
        if Instant::now() > deadline {
            return Err("Linux did not reach /init in 600 s".into());
        }
    };
    let stats = &running.vm().control().stats;
    let (pio, emulated) = (
        stats.pio.load(Ordering::Relaxed),
        stats.emulated.load(Ordering::Relaxed),
    );
    running.stop();
    let text = console.contents();
    Ok(LinuxBoot {
        wall_to_init_s: wall,
        guest_to_init_s: stamp(&text, "Run /init"),
        guest_unpack_start_s: stamp(&text, "Unpacking initramfs"),
        guest_unpack_end_s: stamp(&text, "Freeing initrd memory"),
        pio_exits: pio,
        emulated,
        console_bytes: text.len(),
    })
}
