//! Test support shared by every intervm crate that boots guests on
//! `/dev/kvm` in its tests.
//!
//! The policy: a test that needs KVM calls [`require_kvm!`]. Under
//! `CI=true` a missing or unusable `/dev/kvm` fails the test loudly;
//! elsewhere the test prints why and returns (skips).
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use intervm_protocol::probe::{results, shmem_args, BootInfo};
use vmm_core::devices::serial::{SerialBuffer, SerialOutput};
use vmm_core::{boot::probe, RunningVm, Vm, VmConfig, VmExit};

/// The skip/fail policy for something a test needs: under `CI=true`
/// panics with `why`; elsewhere prints it as the reason for skipping.
pub fn missing(why: &str) {
    if std::env::var("CI").is_ok_and(|v| v == "true") {
        panic!("CI=true but {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// Returns false (after printing why) when KVM is unusable and the test
/// should be skipped; panics instead under `CI=true`, where a missing
/// `/dev/kvm` must fail the run.
pub fn kvm_available() -> bool {
    match vmm_core::host::kvm_unavailable_reason() {
        None => true,
        Some(why) => {
            missing(&format!("KVM is unavailable here ({why})"));
            false
        }
    }
}

/// The Linux guest `scripts/guest-linux` builds under `target/guest-linux/`.
#[derive(Clone, Debug)]
pub struct GuestLinux {
    /// Uncompressed kernel (what intervm boots).
    pub vmlinux: PathBuf,
    /// Compressed kernel (what QEMU boots).
    pub bzimage: PathBuf,
    /// Uncompressed initramfs.
    pub initramfs: PathBuf,
    /// Compressed initramfs.
    pub initramfs_gz: PathBuf,
}

/// The built Linux guest, or `None` (skip; a failure under `CI=true`) if
/// `scripts/guest-linux` has not been run.
///
/// `INTERVM_TEST_LINUX=0` skips the Linux tier on purpose, also under
/// `CI=true`: `scripts/test` sets it for its repeat passes, which rerun
/// the fast tiers to catch flaky tests.
pub fn guest_linux() -> Option<GuestLinux> {
    if std::env::var("INTERVM_TEST_LINUX").is_ok_and(|v| v == "0") {
        eprintln!("SKIPPED: INTERVM_TEST_LINUX=0 (a repeat pass without the Linux tier)");
        return None;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/guest-linux");
    let g = GuestLinux {
        vmlinux: dir.join("vmlinux"),
        bzimage: dir.join("bzImage"),
        initramfs: dir.join("initramfs.cpio"),
        initramfs_gz: dir.join("initramfs.cpio.gz"),
    };
    for p in [&g.vmlinux, &g.bzimage, &g.initramfs, &g.initramfs_gz] {
        if !p.is_file() {
            missing(&format!(
                "{} is missing (run scripts/guest-linux)",
                p.display()
            ));
            return None;
        }
    }
    Some(g)
}

/// QEMU's own `ivshmem-server` and `ivshmem-client`, as
/// `scripts/qemu-ivshmem-tools` builds them under `target/qemu-ivshmem/`,
/// or `None` (skip; a failure under `CI=true`).
pub fn qemu_ivshmem_tools() -> Option<(PathBuf, PathBuf)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/qemu-ivshmem");
    let (server, client) = (dir.join("ivshmem-server"), dir.join("ivshmem-client"));
    if !server.is_file() || !client.is_file() {
        missing(&format!(
            "QEMU's ivshmem-server/-client are missing under {} (run scripts/qemu-ivshmem-tools)",
            dir.display()
        ));
        return None;
    }
    Some((server, client))
}

/// The path of host program `name` on `PATH`, or `None` (skip; a failure
/// under `CI=true`).
pub fn host_program(name: &str) -> Option<PathBuf> {
    let found = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    });
    if found.is_none() {
        missing(&format!("{name} is not installed"));
    }
    found
}

/// Skips the calling test when KVM is unavailable (see [`kvm_available`]).
#[macro_export]
macro_rules! require_kvm {
    () => {
        if !$crate::kvm_available() {
            return;
        }
    };
}

/// Default guest RAM of a probe VM.
pub const PROBE_MEM: u64 = 32 << 20;

/// A probe VM with one vCPU, [`PROBE_MEM`] of RAM and its console captured.
pub fn probe_vm(name: &str, info: &BootInfo) -> (Vm, SerialBuffer) {
    probe_vm_with(name, info, 1, PROBE_MEM)
}

/// A probe VM with `vcpus` vCPUs (the probe runs on vCPU 0) and `mem` bytes.
pub fn probe_vm_with(name: &str, info: &BootInfo, vcpus: u8, mem: u64) -> (Vm, SerialBuffer) {
    let buf = SerialBuffer::new();
    let mut cfg = VmConfig::new(name, mem);
    cfg.vcpus = vcpus;
    cfg.serial = SerialOutput::Buffer(buf.clone());
    let vm = Vm::new(&cfg).expect("creating the VM");
    probe::load(&vm, probe_image::PROBE_ELF, info).expect("loading the probe");
    (vm, buf)
}

/// Bound for a probe run that only a hang reaches: PVM emulates every
/// CPL0 instruction, and on a busy 2-core host two spinning guests may
/// share one core and hand over once per scheduler slice.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(300);

/// Peer liveness timeout for probe tasks in tests, in milliseconds. A live
/// peer's heartbeat thread is never starved this long, even on a loaded
/// host, so only a hang trips it; tests that stop a peer rely on its VMM
/// marking it gone, which peers see at once.
pub const PEER_TIMEOUT_MS: u64 = 30_000;

/// Waits until `cond` holds, polling every millisecond; panics naming
/// `what` after [`RUN_TIMEOUT`], which only a hang reaches. For tests that
/// must wait for a state (a transfer under way, a member joined) instead of
/// sleeping and hoping it was reached.
pub fn wait_until(what: &str, cond: impl FnMut() -> bool) {
    wait_until_within(what, RUN_TIMEOUT, cond)
}

/// [`wait_until`] with a deadline of `patience` (for a state that comes
/// after something slow, such as a Linux guest's boot on a busy host).
pub fn wait_until_within(what: &str, patience: Duration, mut cond: impl FnMut() -> bool) {
    let t0 = std::time::Instant::now();
    while !cond() {
        assert!(
            t0.elapsed() < patience,
            "timed out after {patience:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Waits for `child` to end and returns its output, like
/// `Child::wait_with_output`; but kills it and panics, naming `what` and
/// showing what it printed, once it has run for `patience`, a deadline
/// only a hang reaches (a tool waiting for ever for a peer that is alive
/// but never sends). A regression then fails its test instead of hanging
/// the whole suite.
pub fn wait_within(
    mut child: std::process::Child,
    what: &str,
    patience: Duration,
) -> std::process::Output {
    use std::io::Read;
    fn drain(pipe: Option<impl Read + Send + 'static>) -> std::thread::JoinHandle<Vec<u8>> {
        std::thread::spawn(move || {
            let mut v = Vec::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_end(&mut v);
            }
            v
        })
    }
    let (out, err) = (drain(child.stdout.take()), drain(child.stderr.take()));
    let t0 = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("waiting for a child") {
            break s;
        }
        if t0.elapsed() > patience {
            let _ = child.kill();
            let _ = child.wait();
            let text = |h: std::thread::JoinHandle<Vec<u8>>| {
                String::from_utf8_lossy(&h.join().unwrap_or_default()).into_owned()
            };
            panic!(
                "{what}: still running after {patience:?} (killed)\nstdout:\n{}\nstderr:\n{}",
                text(out),
                text(err)
            );
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    std::process::Output {
        status,
        stdout: out.join().unwrap_or_default(),
        stderr: err.join().unwrap_or_default(),
    }
}

/// For a sender probe started with `ShmemTask::hold`: waits until the
/// receiving probe `rx` has gone to sleep on a doorbell (or ended), then
/// lets the sender `tx` send. The receiver's first sleep, and the doorbell
/// that ends it, then happen whatever the scheduling.
pub fn release_after_receiver_sleeps(rx: &RunningVm, tx: &RunningVm) {
    let mem = rx.vm().memory();
    wait_until("the receiving probe to sleep on a doorbell", || {
        probe::result(mem, results::SHM_SLEEPS).is_ok_and(|n| n > 0)
            || rx.wait_timeout(Duration::ZERO).is_some()
    });
    probe::set_arg(tx.vm().memory(), shmem_args::RELEASE, 1).expect("releasing the sender");
}

/// Runs a VM to completion (stopping it after [`RUN_TIMEOUT`]) and returns
/// its exit and the boot-info page as the guest left it.
pub fn run_to_exit(vm: Vm, console: &SerialBuffer) -> (VmExit, BootInfo) {
    let running = vm.start().expect("starting vCPUs");
    finish(running, console, RUN_TIMEOUT)
}

/// Waits for a started VM to exit (panicking with its console after
/// `timeout`) and returns its exit and boot-info page.
pub fn finish(running: RunningVm, console: &SerialBuffer, timeout: Duration) -> (VmExit, BootInfo) {
    let exit = running.wait_timeout(timeout);
    let info = probe::read_info(running.vm().memory()).expect("reading boot info");
    let exit = exit.unwrap_or_else(|| {
        panic!(
            "guest {} did not exit within {timeout:?}; console:\n{}",
            running.vm().name(),
            console.contents()
        )
    });
    drop(running);
    if let VmExit::Guest(code) = exit {
        if code & 0x100 != 0 && code < 0x200 {
            eprintln!(
                "probe exception: vector {} error {:#x} rip {:#x}",
                info.results[results::FAULT_VECTOR],
                info.results[results::FAULT_ERROR],
                info.results[results::FAULT_RIP]
            );
        }
    }
    (exit, info)
}

/// Sends `sig` to `child`.
pub fn signal(child: &std::process::Child, sig: i32) {
    // SAFETY: signals a child the caller started and has not reaped.
    assert_eq!(unsafe { libc::kill(child.id() as libc::pid_t, sig) }, 0);
}

/// How [`kill_mid_transfer`] restarts a sender.
#[derive(Clone, Copy, Debug)]
pub struct KillPlan {
    /// Transfers to cut.
    pub kills: u64,
    /// Complete transfers the receiver waits for in all: the loop stops
    /// early once all but one finished on their own (the caller runs the
    /// rest), so the receiver still waits for a last one.
    pub complete: u64,
    /// Ring bytes a whole transfer publishes (frames with their headers).
    pub whole: u64,
    /// How long a (re)started sender may take to send its first frame; a
    /// deadline that only catches a hang.
    pub patience: Duration,
}

/// What the ring protocol shows of members `from` and `to` of `region`
/// and of the ring between them: each member's state, incarnation, ready
/// word and heartbeat, and the ring's indices and sleep declarations (for
/// a test that hangs to say where).
pub fn pair_state(region: &intervm_protocol::ring::Region, from: u32, to: u32) -> String {
    let Ok(geo) = region.geometry() else {
        return "region not formatted".into();
    };
    let member = |m: u32| {
        format!(
            "member {m}: {:?}, incarnation {:?}, ready {:#x?}, heartbeat {:?}",
            region.member_state(&geo, m),
            region.incarnation(&geo, m),
            region.ready(&geo, m),
            region.heartbeat(&geo, m)
        )
    };
    format!(
        "{}; {}; ring {from} -> {to}: {:?}",
        member(from),
        member(to),
        region.ring_state(&geo, from, to)
    )
}

/// Starts senders with `spawn` one after another, each killed (SIGKILL)
/// mid-transfer, until `plan.kills` transfers were cut. Each sends on the
/// ring `from -> to` of `region`, whose head only a running sender moves:
/// a sender is killed once it moved, and after it was frozen (SIGSTOP), so
/// one that finished between the look and the kill is never counted as
/// cut; that one is resumed and handed to `finish`. Returns (cut,
/// completed).
pub fn kill_mid_transfer(
    plan: KillPlan,
    (region, from, to): (&intervm_protocol::ring::Region, u32, u32),
    mut spawn: impl FnMut() -> std::process::Child,
    mut finish: impl FnMut(std::process::Child),
) -> (u64, u64) {
    let head = || {
        region
            .geometry()
            .and_then(|g| region.ring_state(&g, from, to))
            .map_or(0, |s| s.head)
    };
    let (mut cut, mut completed) = (0, 0);
    while cut < plan.kills && completed + 1 < plan.complete {
        let h0 = head();
        let mut a = spawn();
        // Until it sends; a sender that ends, or waits past the deadline,
        // without sending fails the test with what it printed.
        let t0 = std::time::Instant::now();
        let mut ended = false;
        while head() == h0 {
            ended = a.try_wait().is_ok_and(|s| s.is_some());
            if ended && head() != h0 {
                // It sent (all of it, or until it failed) and left between
                // the two looks: whatever it did, `finish` judges it.
                break;
            }
            if ended || t0.elapsed() > plan.patience {
                let _ = a.kill();
                let o = a.wait_with_output().expect("the sender's output");
                panic!(
                    "a (re)started sender {} without sending ({}; {cut} cut and {completed} \
                     complete transfers before it; ring head {h0}; now {})\nstdout:\n{}\n\
                     stderr:\n{}",
                    if ended { "ended" } else { "waited too long" },
                    o.status,
                    pair_state(region, from, to),
                    String::from_utf8_lossy(&o.stdout),
                    String::from_utf8_lossy(&o.stderr)
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        if ended {
            finish(a);
            completed += 1;
            continue;
        }
        signal(&a, libc::SIGSTOP);
        if head().wrapping_sub(h0) < plan.whole {
            let _ = a.kill();
            let _ = a.wait();
            cut += 1;
        } else {
            signal(&a, libc::SIGCONT);
            finish(a);
            completed += 1;
        }
    }
    (cut, completed)
}
