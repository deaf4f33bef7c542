//! Builds `guests/probe` (a freestanding x86-64 ELF) with a nested cargo
//! invocation in its own target directory and leaves it in `OUT_DIR`.
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn watch(dir: &Path) {
    println!("cargo:rerun-if-changed={}", dir.display());
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                if p.file_name().is_some_and(|n| n == "target") {
                    continue;
                }
                watch(&p);
            } else {
                println!("cargo:rerun-if-changed={}", p.display());
            }
        }
    }
}

fn main() {
    let manifest = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("CARGO_MANIFEST_DIR"));
    let root = manifest.join("../..");
    let probe = root.join("guests/probe");
    let out = PathBuf::from(env::var("OUT_DIR").expect("OUT_DIR"));
    watch(&probe);
    watch(&root.join("crates/protocol/src"));
    println!(
        "cargo:rerun-if-changed={}",
        root.join("crates/protocol/Cargo.toml").display()
    );

    let cargo = env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(&probe)
        .args(["build", "--release", "--offline", "--target-dir"])
        .arg(out.join("probe-target"));
    // Do not leak the outer build's settings (clippy wrappers, flags, target
    // dir) into the guest build; the guest has its own .cargo/config.toml.
    for (k, _) in env::vars() {
        if (k.starts_with("CARGO_") && k != "CARGO_HOME")
            || k.starts_with("RUSTC")
            || k == "RUSTFLAGS"
            || k == "RUSTDOCFLAGS"
        {
            cmd.env_remove(&k);
        }
    }
    let status = cmd.status().expect("running cargo for guests/probe");
    assert!(status.success(), "building guests/probe failed: {status}");
    let elf = out.join("probe-target/release/intervm-probe");
    std::fs::copy(&elf, out.join("intervm-probe.elf")).expect("copying the probe ELF");
}
