//! The `intervm` binary as a user runs it.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn intervm(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_intervm"))
        .args(args)
        .current_dir(repo_root())
        .output()
        .expect("running intervm")
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn kvm_available() -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) if std::env::var("CI").is_ok_and(|v| v == "true") => {
            panic!("CI=true but /dev/kvm is unusable: {e}")
        }
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm is unusable here ({e})");
            false
        }
    }
}

fn temp_config(name: &str, body: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("intervm-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

#[test]
fn every_shipped_config_checks() {
    for entry in std::fs::read_dir(repo_root().join("configs")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            let o = intervm(&["check", p.to_str().unwrap()]);
            assert!(o.status.success(), "{}: {:?}", p.display(), text(&o));
        }
    }
}

#[test]
fn check_reports_file_key_and_problem() {
    let cases = [
        ("unknown.toml", "[[vm]]\nname = \"a\"\nmemroy = \"1M\"\n", "unknown field `memroy`"),
        ("dup.toml", "[[vm]]\nname = \"a\"\n[[vm]]\nname = \"a\"\n", "vm[a].name: duplicate VM name"),
        ("mem.toml", "[[vm]]\nname = \"a\"\nmemory = 5000\n", "vm[a].memory: 5000 is not a non-zero multiple of 4 KiB"),
        ("kernel.toml", "[[vm]]\nname = \"a\"\nkernel = \"no-such-bzImage\"\n", "vm[a].kernel: kernel file"),
        ("kind.toml", "[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"x\"\nkind = \"telepathy\"\nmembers = [\"a\", \"b\"]\n", "channel[x].kind: unknown channel kind \"telepathy\""),
    ];
    for (file, body, want) in cases {
        let p = temp_config(file, body);
        let o = intervm(&["check", p.to_str().unwrap()]);
        let (_, err) = text(&o);
        assert_eq!(o.status.code(), Some(2), "{file}: {err}");
        assert!(
            err.contains(file) && err.contains(want),
            "{file}: expected {want:?} in {err:?}"
        );
    }
    let o = intervm(&["check", "/nonexistent/x.toml"]);
    assert!(
        text(&o).1.contains("/nonexistent/x.toml: cannot read"),
        "{:?}",
        text(&o)
    );
}

#[test]
fn run_hello_boots_both_probe_guests() {
    if !kvm_available() {
        return;
    }
    let o = intervm(&["run", "configs/hello.toml", "--timeout", "60"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("[alpha] intervm probe: hello from CPL3, tag 0"),
        "{out}"
    );
    assert!(
        out.contains("[beta] intervm probe: hello from CPL3, tag 1"),
        "{out}"
    );
    assert!(
        err.contains("alpha stopped") && err.contains("Guest(0)"),
        "{err}"
    );
}

#[test]
fn run_one_vm_by_name_and_reject_unknown_names() {
    if !kvm_available() {
        return;
    }
    let o = intervm(&[
        "run",
        "configs/hello.toml",
        "--vm",
        "beta",
        "--timeout",
        "60",
    ]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.contains("[beta]") && !out.contains("[alpha]"), "{out}");
    let o = intervm(&["run", "configs/hello.toml", "--vm", "gamma"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(text(&o)
        .1
        .contains("--vm gamma: no [[vm]] has that name (defined: alpha, beta)"));
}

#[test]
fn bad_timeout_is_a_clear_error() {
    let o = intervm(&["run", "configs/hello.toml", "--timeout", "-3"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        text(&o)
            .1
            .contains("--timeout -3: must be a positive number"),
        "{:?}",
        text(&o)
    );
}
