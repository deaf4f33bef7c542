//! Helpers shared by the `intervm` binary's test files.
#![allow(dead_code)] // each test file uses a part

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use intervm_protocol::ring::Region;
use shmem_device::{Backing, SharedRegion};

/// `intervm ARGS` in the repository root, without running it.
pub fn intervm_cmd(args: &[&str]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_intervm"));
    c.args(args).current_dir(repo_root());
    c
}

/// Runs `intervm ARGS` to the end.
pub fn intervm(args: &[&str]) -> Output {
    intervm_cmd(args).output().expect("running intervm")
}

/// The repository's root directory.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Standard output and error of `o` as text.
pub fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// Starts `intervm run CFG --vm VM` as its own process, stopped after
/// 600 s (only a hang gets there).
pub fn spawn_vm(cfg: &str, vm: &str) -> std::process::Child {
    spawn_vm_with(cfg, vm, &[])
}

/// Like [`spawn_vm`], with extra environment variables.
pub fn spawn_vm_with(cfg: &str, vm: &str, env: &[(&str, &Path)]) -> std::process::Child {
    spawn_vm_for(cfg, vm, env, 600)
}

/// Like [`spawn_vm_with`], stopped after `secs` seconds (`--timeout`): for
/// a process that must outlive a whole test that takes longer.
pub fn spawn_vm_for(cfg: &str, vm: &str, env: &[(&str, &Path)], secs: u32) -> std::process::Child {
    Command::new(env!("CARGO_BIN_EXE_intervm"))
        .args(["run", cfg, "--vm", vm, "--timeout", &secs.to_string()])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning intervm")
}

/// `/dev/shm/NAME` (created if missing) as the ring protocol sees it, for a
/// test that waits for a state of a channel the `intervm` processes share.
pub fn watch_shm(name: &str, size: u64) -> (SharedRegion, Region) {
    let map = SharedRegion::open(&Backing::Shm(name.to_string()), size).unwrap();
    // SAFETY: the caller keeps `map` (and so the mapping) with the region.
    let region = unsafe { Region::new(map.host_addr(), map.size()) };
    (map, region)
}

/// Writes `body` as config file `name` in this test process's temp dir.
pub fn temp_config(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("intervm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// Writes `body` as config `name`, runs it to the end (a generous
/// `--timeout` that only catches hangs), asserts it succeeded, and returns
/// its standard output.
pub fn run_config_ok(name: &str, body: &str) -> String {
    let cfg = temp_config(name, body);
    let o = intervm(&["run", cfg.to_str().unwrap(), "--timeout", "600"]);
    let (out, err) = text(&o);
    assert!(
        o.status.success(),
        "{name}: {:?}\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
    out
}

/// Asserts that one line of `out` reports `what` (e.g. `b: received 4 MiB
/// of 4 MiB from a over c`) with a matching checksum.
pub fn assert_received_clean(out: &str, what: &str) {
    assert!(
        out.lines()
            .any(|l| l.contains(what) && l.contains("checksum ok")),
        "no clean {what:?} in:\n{out}"
    );
}
