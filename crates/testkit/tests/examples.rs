//! Every crate's example that runs on its own runs and succeeds: they are
//! how an embedder starts, so they must not rot. (`vmm-core`'s
//! `boot_linux` needs a kernel and the Linux tier covers it; the guest
//! tool's `echo` runs inside a Linux guest.) `cargo test --workspace`
//! without a target filter (what `scripts/test` runs) builds every example
//! into `target/<profile>/examples/` before it runs any test; this runs the
//! binaries it built, each to its exit status, and checks what they print.
//! Run any other way (`-p intervm-testkit`, `--test examples`), it runs
//! what the last such build left, or reports them missing.

use std::io::Read;
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// What only a hung example takes.
const HANG: Duration = Duration::from_secs(600);

use intervm_testkit::{missing, require_kvm};

/// The example binary `name`, beside this test's own directory
/// (`target/<profile>/deps/..` -> `target/<profile>/examples/NAME`).
fn example(name: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.parent()?.join("examples").join(name);
    if p.is_file() {
        Some(p)
    } else {
        missing(&format!(
            "example {name} is not built at {} (run cargo test --workspace, which builds every example)",
            p.display()
        ));
        None
    }
}

/// One example at a time: each is written as the only program on the
/// host (the KVM ones keep vCPUs polling and use the probe's default peer
/// timeout), not to share two CPUs with the others.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

/// Runs example `name` with `args` and checks it succeeded and printed
/// every line of `expect` on stdout; returns that stdout (empty when the
/// example is missing and the test skips).
fn runs(name: &str, args: &[&str], expect: &[&str]) -> String {
    let Some(bin) = example(name) else {
        return String::new();
    };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let mut child = Command::new(&bin)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Output is read on threads, so that a chatty example never blocks on
    // a full pipe while this waits for it to exit.
    let pipe = |r: Option<Box<dyn Read + Send>>| {
        let mut r = r.unwrap();
        std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = r.read_to_end(&mut s);
            s
        })
    };
    let (so, se) = (
        pipe(child.stdout.take().map(|p| Box::new(p) as _)),
        pipe(child.stderr.take().map(|p| Box::new(p) as _)),
    );
    // Each example finishes in seconds; only a hang reaches this.
    let deadline = Instant::now() + HANG;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{name} {args:?} hung: still running after {HANG:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        status,
        stdout: so.join().unwrap(),
        stderr: se.join().unwrap(),
    };
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "{name} {args:?}: {}\n--- stdout\n{stdout}\n--- stderr\n{stderr}",
        out.status
    );
    for e in expect {
        assert!(
            stdout.contains(e),
            "{name}: no {e:?} in\n{stdout}\n--- stderr\n{stderr}"
        );
    }
    stdout.into_owned()
}

#[test]
fn portio_channel_two_devices() {
    runs(
        "two_devices",
        &[],
        &["member 1: 19 bytes from member 0: \"hello over port I/O\""],
    );
}

#[test]
fn shared_region_two_members() {
    runs("two_members", &[], &["member 1 got \"member 0\""]);
}

#[test]
fn protocol_ring_threads() {
    runs(
        "ring_threads",
        &[],
        &["copying: moved 64 MiB", "in place: moved 64 MiB"],
    );
}

#[test]
fn interrupt_doorbell_server_and_clients() {
    runs(
        "server_and_clients",
        &[],
        &["b reads \"written by a\"", "vector 0 fired 1 time(s)"],
    );
}

#[test]
fn shrink_guard_shrunk_by_a_peer() {
    runs("shrunk_by_a_peer", &[], &["byte = 0, lost = true"]);
}

#[test]
fn shmem_device_shmem_pair() {
    require_kvm!();
    runs("shmem_pair", &[], &["received 67108864 bytes", "(ok)"]);
}

#[test]
fn interrupt_doorbell_doorbell_pair_in_kernel_and_through_the_vmm() {
    require_kvm!();
    // Both VMs say so.
    for (args, each) in [
        (&[][..], "doorbells through this process: 0"),
        (&["--vmm-path"][..], "doorbells through this process: 1000"),
    ] {
        let out = runs("doorbell_pair", args, &["round trip: mean"]);
        if !out.is_empty() {
            assert_eq!(out.matches(each).count(), 2, "{args:?}:\n{out}");
        }
    }
}

#[test]
fn vmm_core_boot_probe() {
    require_kvm!();
    runs("boot_probe", &[], &["probe exit: Guest(0)", "PIO exits"]);
}
