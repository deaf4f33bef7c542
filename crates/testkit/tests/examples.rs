//! Every crate's example runs and succeeds: they are how an embedder
//! starts, so they must not rot. `cargo test --workspace` builds them
//! (into `target/<profile>/examples/`) before it runs any test; this runs
//! the binaries it built, each to its exit status, and checks what they
//! print.

use std::path::PathBuf;
use std::process::Command;
use std::sync::Mutex;

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
/// every line of `expect` on stdout.
fn runs(name: &str, args: &[&str], expect: &[&str]) {
    let Some(bin) = example(name) else { return };
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let out = Command::new(&bin).args(args).output().unwrap();
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
    runs(
        "doorbell_pair",
        &[],
        &["doorbells through this process: 0", "round trip: mean"],
    );
    runs(
        "doorbell_pair",
        &["--vmm-path"],
        &["doorbells through this process: 1000"],
    );
}

#[test]
fn vmm_core_boot_probe() {
    require_kvm!();
    runs("boot_probe", &[], &["probe exit: Guest(0)", "PIO exits"]);
}
