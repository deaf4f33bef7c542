//! The `intervm` binary as a user runs it.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::{intervm, repo_root, spawn_vm, temp_config, text, watch_shm};
use intervm_protocol::ring::MemberState;
use intervm_testkit::{kvm_available, wait_until};

/// Writes `body` as config `name`, runs `intervm check` on it, and asserts
/// that it is refused (exit 2) with an error naming the file and saying
/// `want`.
fn check_rejects(name: &str, body: &str, want: &str) {
    let p = temp_config(name, body);
    let o = intervm(&["check", p.to_str().unwrap()]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{name}: {err}");
    assert!(
        err.contains(name) && err.contains(want),
        "{name}: expected {want:?} in {err:?}"
    );
}

#[test]
fn check_into_a_closed_pipe_ends_quietly() {
    // As `intervm check FILE | head -0` would: the reader is gone before
    // intervm writes a byte.
    let (reader, writer) = std::io::pipe().unwrap();
    drop(reader);
    let o = common::intervm_cmd(&["check", "configs/demo.toml"])
        .stdout(writer)
        .stderr(std::process::Stdio::piped())
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!err.contains("panicked"), "{err}");
    assert_ne!(o.status.code(), Some(101), "{err}");
}

#[test]
fn every_shipped_config_checks() {
    for entry in std::fs::read_dir(repo_root().join("configs")).unwrap() {
        let p = entry.unwrap().path();
        if p.extension().is_some_and(|e| e == "toml") {
            // Linux configs name the kernel scripts/guest-linux builds.
            let linux = p
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("linux-"));
            if linux && intervm_testkit::guest_linux().is_none() {
                continue;
            }
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
        ("linux-mem.toml", "[[vm]]\nname = \"l\"\nmemory = \"16M\"\nkernel = \"no-such-vmlinux\"\n", "vm[l].memory: a Linux guest needs at least 32M"),
        ("kind.toml", "[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"x\"\nkind = \"telepathy\"\nmembers = [\"a\", \"b\"]\n", "channel[x].kind: unknown channel kind \"telepathy\""),
        ("consoles.toml", "[[vm]]\nname = \"a\"\nserial = \"console\"\n[[vm]]\nname = \"b\"\nserial = \"console\"\n", "vm[b].serial: \"console\" is already taken by vm[a]: stdin can feed only one VM's console"),
    ];
    for (file, body, want) in cases {
        check_rejects(file, body, want);
    }
    let o = intervm(&["check", "/nonexistent/x.toml"]);
    assert!(
        text(&o).1.contains("/nonexistent/x.toml: cannot read"),
        "{:?}",
        text(&o)
    );
}

#[test]
fn a_file_that_is_no_kernel_is_a_clear_error() {
    if !kvm_available() {
        return;
    }
    // The config file itself stands in for a kernel image.
    let p = temp_config(
        "not-a-kernel.toml",
        "[[vm]]\nname = \"l\"\nkernel = \"not-a-kernel.toml\"\n",
    );
    let o = intervm(&["run", p.to_str().unwrap(), "--timeout", "10"]);
    let (_, err) = text(&o);
    assert!(!o.status.success());
    assert!(
        err.contains("vm[l]") && err.contains("neither an ELF vmlinux nor a bzImage"),
        "{err}"
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
fn a_console_vm_ends_while_stdin_stays_open() {
    if !kvm_available() {
        return;
    }
    let p = temp_config(
        "console-hello.toml",
        "[[vm]]\nname = \"alpha\"\nserial = \"console\"\n",
    );
    let mut child = Command::new(env!("CARGO_BIN_EXE_intervm"))
        .args(["run", p.to_str().unwrap(), "--timeout", "60"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawning intervm");
    // Held open (no end of input) until intervm has exited by itself.
    let stdin = child.stdin.take();
    // Only catches a hang (intervm stuck on its stdin): kills intervm.
    let pid = child.id() as libc::pid_t;
    let (done, watch) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let patience = std::time::Duration::from_secs(120);
        if watch.recv_timeout(patience) == Err(std::sync::mpsc::RecvTimeoutError::Timeout) {
            // SAFETY: signals the child we started, not yet reaped.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    });
    let o = child.wait_with_output().expect("waiting for intervm");
    let _ = done.send(());
    drop(stdin);
    let (out, err) = text(&o);
    assert!(
        o.status.success(),
        "{}\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
    assert!(
        out.contains("[alpha] intervm probe: hello from CPL3, tag 0"),
        "{out}"
    );
    assert!(err.contains("Guest(0)"), "{err}");
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

#[test]
fn shmem_config_errors_name_the_key() {
    let two = "[[vm]]\nname = \"a\"\nmemory = \"64M\"\n[[vm]]\nname = \"b\"\nmemory = \"64M\"\n";
    let cases = [
        (
            "size.toml",
            "[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nsize = \"3M\"\n",
            "channel[c].size: 3145728 is not a power of two",
        ),
        (
            "small.toml",
            "[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nsize = \"8K\"\n",
            "channel[c].size: 8192 bytes cannot hold rings for 2 members",
        ),
        (
            "backing.toml",
            "[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nbacking = { shm = \"x\", file = \"y\" }\n",
            "channel[c].backing: give exactly one of",
        ),
        (
            "samebacking.toml",
            "[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nbacking = { shm = \"x\" }\n\
             [[channel]]\nname = \"d\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\nbacking = { shm = \"x\" }\n",
            "channel[d].backing: channel[c] uses the same backing",
        ),
        (
            // The same file spelled three ways: as a shm name, as its
            // /dev/shm path, and through `..`.
            "samebacking2.toml",
            "[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nbacking = { shm = \"x\" }\n\
             [[channel]]\nname = \"d\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\nbacking = { file = \"/dev/shm/x\" }\n",
            "channel[d].backing: channel[c] uses the same backing (",
        ),
        (
            "samebacking3.toml",
            "[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nbacking = { file = \"/dev/shm/no-such-dir/../y\" }\n\
             [[channel]]\nname = \"d\"\nkind = \"doorbell\"\nmembers = [\"a\", \"b\"]\nbacking = { hugetlbfs = \"/dev/shm/y\" }\n",
            "channel[d].backing: channel[c] uses the same backing (",
        ),
    ];
    for (file, body, want) in cases {
        check_rejects(file, &format!("{two}{body}"), want);
    }
    let chan = "[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\n";
    let vm_cases = [
        (
            "probe = { task = \"send\", channel = \"c\", to = \"a\", size = \"1M\" }",
            "vm[a].probe.to: a VM cannot be its own peer",
        ),
        (
            "probe = { task = \"send\", channel = \"nope\", to = \"b\", size = \"1M\" }",
            "vm[a].probe.channel: no [[channel]] is named \"nope\"",
        ),
        (
            "probe = { task = \"send\", channel = \"c\", to = \"b\", size = \"1M\", ops = 5 }",
            "vm[a].probe.ops: only meaningful for task \"chaos\"",
        ),
        (
            "probe = { task = \"send\", channel = \"c\", to = \"b\", size = \"1G\", chunk = \"32M\" }",
            "vm[a].probe.chunk: 33554432 bytes is more than the probe's 16 MiB frame buffer",
        ),
        (
            "probe = { task = \"chaos\", channel = \"c\" }",
            "vm[a].probe.channel: not used by task \"chaos\"",
        ),
        (
            "probe = { task = \"send\", channel = \"c\", to = \"b\" }",
            "vm[a].probe.size: missing",
        ),
        (
            "probe = { task = \"dance\" }",
            "vm[a].probe.task: \"dance\" is not",
        ),
        (
            "probe = { task = \"recv\", channel = \"c\", size = \"1G\" }\nmemory = \"32M\"",
            "vm[a].probe.size: moving 1073741824 bytes needs memory of at least 48M",
        ),
    ];
    for (i, (probe, want)) in vm_cases.iter().enumerate() {
        let mem = if probe.contains("memory") {
            ""
        } else {
            "memory = \"64M\"\n"
        };
        let body = format!("[[vm]]\nname = \"a\"\n{mem}{probe}\n[[vm]]\nname = \"b\"\n{chan}");
        check_rejects(&format!("task{i}.toml"), &body, want);
    }
}

#[test]
fn two_channels_on_one_file_under_two_names_are_refused_at_run() {
    // A hard link: `check` sees two paths and cannot tell; `run` opens
    // both and finds one file, before any VM boots.
    let dir = std::env::temp_dir().join(format!("intervm-cli-link-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (a, b) = (dir.join("a.region"), dir.join("b.region"));
    let _ = std::fs::remove_file(&b);
    std::fs::write(&a, vec![0u8; 1 << 20]).unwrap();
    std::fs::hard_link(&a, &b).unwrap();
    let body = format!(
        "[[vm]]\nname = \"a\"\n[[vm]]\nname = \"b\"\n\
         [[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nsize = \"1M\"\n\
         backing = {{ file = \"{}\" }}\n\
         [[channel]]\nname = \"d\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\nsize = \"1M\"\n\
         backing = {{ file = \"{}\" }}\n",
        a.display(),
        b.display()
    );
    let cfg = temp_config("hardlink.toml", &body);
    let o = intervm(&["check", cfg.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    let o = intervm(&["run", cfg.to_str().unwrap(), "--timeout", "60"]);
    let (_, err) = text(&o);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("channel[d]: backing:")
            && err.contains("is the file channel[c] uses (another name for it)"),
        "{err}"
    );
}

#[test]
fn shmem_demo_moves_a_checksummed_payload() {
    if !kvm_available() {
        return;
    }
    let o = intervm(&["run", "configs/shmem.toml", "--timeout", "120"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("beta: received 256 MiB of 256 MiB from alpha over link")
            && out.contains("checksum ok"),
        "{out}"
    );
}

fn shm_config(tag: &str, size: &str) -> (PathBuf, String) {
    let shm = format!("intervm-cli-{tag}-{}", std::process::id());
    let body = format!(
        "[[vm]]\nname = \"a\"\nmemory = \"64M\"\nserial = \"none\"\n\
         probe = {{ task = \"send\", channel = \"c\", to = \"b\", size = \"{size}\" }}\n\
         [[vm]]\nname = \"b\"\nmemory = \"64M\"\n\
         probe = {{ task = \"recv\", channel = \"c\", size = \"{size}\" }}\n\
         [[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nsize = \"1M\"\n\
         backing = {{ shm = \"{shm}\" }}\n"
    );
    (temp_config(&format!("{tag}.toml"), &body), shm)
}

#[test]
fn shmem_members_in_separate_processes() {
    if !kvm_available() {
        return;
    }
    let (cfg, shm) = shm_config("xproc", "64M");
    let cfg = cfg.to_str().unwrap().to_string();
    let spawn = |vm: &str| spawn_vm(&cfg, vm);
    let rx = spawn("b");
    let tx = spawn("a");
    let tx = tx.wait_with_output().unwrap();
    let rx = rx.wait_with_output().unwrap();
    let _ = std::fs::remove_file(format!("/dev/shm/{shm}"));
    assert!(tx.status.success(), "{:?}", text(&tx));
    assert!(rx.status.success(), "{:?}", text(&rx));
    let (out, _) = text(&rx);
    assert!(
        out.contains("received 64 MiB of 64 MiB from a over c") && out.contains("checksum ok"),
        "{out}"
    );
}

#[test]
fn killing_a_member_process_is_reported_as_peer_gone() {
    if !kvm_available() {
        return;
    }
    // A transfer far too large to finish: the sender is killed mid-way.
    let (cfg, shm) = shm_config("kill", "1024G");
    let cfg = cfg.to_str().unwrap().to_string();
    let (_map, region) = watch_shm(&shm, 1 << 20);
    let spawn = |vm: &str| spawn_vm(&cfg, vm);
    let rx = spawn("b");
    let mut tx = spawn("a");
    // Kill the sender once the receiver has taken a frame from it.
    wait_until("the transfer to start", || {
        region
            .geometry()
            .is_ok_and(|g| region.ring_state(&g, 0, 1).is_ok_and(|s| s.tail > 0))
    });
    // SIGKILL: the sender's VMM gets no chance to say goodbye; the receiver
    // must notice the heartbeat stop.
    tx.kill().unwrap();
    let _ = tx.wait();
    let t0 = std::time::Instant::now();
    let rx = rx.wait_with_output().unwrap();
    let _ = std::fs::remove_file(format!("/dev/shm/{shm}"));
    let (out, err) = text(&rx);
    assert!(!rx.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("b: receive over c stopped: peer gone"),
        "{out}"
    );
    // Noticed through the heartbeat (the default peer_timeout, 10 s), not
    // by the receiver's own --timeout (600 s) stopping it; the bound, far
    // from both, only tells the two apart.
    assert!(
        t0.elapsed() < std::time::Duration::from_secs(300),
        "took {:?}",
        t0.elapsed()
    );
}

#[test]
fn portio_config_errors_name_the_key() {
    let vms = "[[vm]]\nname = \"a\"\nmemory = \"64M\"\n[[vm]]\nname = \"b\"\nmemory = \"64M\"\n[[vm]]\nname = \"c\"\nmemory = \"64M\"\n";
    let cases = [
        (
            "[[channel]]\nname = \"p\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\n[[channel]]\nname = \"q\"\nkind = \"portio\"\nmembers = [\"b\", \"c\"]\nport = 0x5020\n",
            "channel[q].port: ports 0x5020..0x5060 overlap channel[p] (0x5000..0x5040) on vm \"b\"",
        ),
        (
            "[[channel]]\nname = \"p\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\nport = 0x3f8\n",
            "channel[p].port: 0x3f8..0x438 must lie within 0x1000..0xc000",
        ),
        (
            "[[channel]]\nname = \"p\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\nport = 0x5000\n",
            "channel[p].port: only meaningful for kind = \"portio\"",
        ),
    ];
    for (i, (chan, want)) in cases.iter().enumerate() {
        check_rejects(&format!("pio{i}.toml"), &format!("{vms}{chan}"), want);
    }
    // Separate VMs may reuse the same ports.
    let ok = "[[channel]]\nname = \"p\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\n[[channel]]\nname = \"q\"\nkind = \"shmem\"\nmembers = [\"b\", \"c\"]\n";
    let p = temp_config("pio-ok.toml", &format!("{vms}{ok}"));
    assert!(intervm(&["check", p.to_str().unwrap()]).status.success());
    let tasks = [
        ("probe = { task = \"send\", channel = \"p\", to = \"b\", size = \"4K\", width = 3 }", "vm[a].probe.width: 3 is not 1, 2 or 4"),
        ("probe = { task = \"send\", channel = \"p\", to = \"b\", size = \"4K\", mode = \"dma\" }", "vm[a].probe.mode: \"dma\" is not"),
        ("probe = { task = \"send\", channel = \"q\", to = \"c\", size = \"4K\", mode = \"port\" }", "vm[a].probe.channel: \"a\" is not a member of \"q\""),
    ];
    for (i, (probe, want)) in tasks.iter().enumerate() {
        let body = format!(
            "[[vm]]\nname = \"a\"\nmemory = \"64M\"\n{probe}\n[[vm]]\nname = \"b\"\n[[vm]]\nname = \"c\"\n{ok}"
        );
        check_rejects(&format!("piot{i}.toml"), &body, want);
    }
}

#[test]
fn portio_demo_moves_checksummed_payloads_in_both_modes() {
    if !kvm_available() {
        return;
    }
    let o = intervm(&["run", "configs/portio.toml", "--timeout", "300"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    for want in [
        "beta: received 256 KiB of 256 KiB from alpha over pio",
        "delta: received 64 MiB of 64 MiB from gamma over pio-desc",
    ] {
        assert!(out.contains(want), "{want:?} in {out}");
    }
    assert_eq!(out.matches("checksum ok").count(), 2, "{out}");
}

#[test]
fn portio_members_in_separate_processes() {
    if !kvm_available() {
        return;
    }
    let shm = format!("intervm-cli-pio-{}", std::process::id());
    let body = format!(
        "[[vm]]\nname = \"a\"\nmemory = \"64M\"\nserial = \"none\"\n\
         probe = {{ task = \"send\", channel = \"c\", to = \"b\", size = \"8M\", mode = \"descriptor\" }}\n\
         [[vm]]\nname = \"b\"\nmemory = \"64M\"\n\
         probe = {{ task = \"recv\", channel = \"c\", size = \"8M\", mode = \"descriptor\" }}\n\
         [[channel]]\nname = \"c\"\nkind = \"portio\"\nmembers = [\"a\", \"b\"]\n\
         backing = {{ shm = \"{shm}\" }}\n"
    );
    let cfg = temp_config("pio-xproc.toml", &body);
    let cfg = cfg.to_str().unwrap().to_string();
    let spawn = |vm: &str| spawn_vm(&cfg, vm);
    let rx = spawn("b");
    let tx = spawn("a").wait_with_output().unwrap();
    let rx = rx.wait_with_output().unwrap();
    let _ = std::fs::remove_file(format!("/dev/shm/{shm}"));
    assert!(tx.status.success(), "{:?}", text(&tx));
    let (out, _) = text(&rx);
    assert!(
        rx.status.success() && out.contains("received 8 MiB of 8 MiB from a over c"),
        "{:?}",
        text(&rx)
    );
    assert!(out.contains("checksum ok"), "{out}");
}

#[test]
fn doorbell_demo_rings_and_transfers() {
    if !kvm_available() {
        return;
    }
    let o = intervm(&["run", "configs/doorbell.toml", "--timeout", "300"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    assert!(
        out.contains("alpha: 10000 of 10000 round trips with beta over bell, 10000 interrupts"),
        "{out}"
    );
    assert!(
        out.contains("delta: received 256 MiB of 256 MiB from gamma over bulk")
            && out.contains("checksum ok"),
        "{out}"
    );
}

#[test]
fn doorbell_members_in_separate_processes_through_our_server() {
    if !kvm_available() {
        return;
    }
    let tag = std::process::id();
    let sock = std::env::temp_dir().join(format!("intervm-cli-srv-{tag}.sock"));
    let shm = format!("intervm-cli-srv-{tag}");
    let log_path = std::env::temp_dir().join(format!("intervm-cli-srv-{tag}.log"));
    let mut server = Command::new(env!("CARGO_BIN_EXE_intervm"))
        .args([
            "ivshmem-server",
            "--socket",
            sock.to_str().unwrap(),
            "--shm",
            &shm,
            "--size",
            "4M",
        ])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let t0 = std::time::Instant::now();
    while !sock.exists() {
        assert!(t0.elapsed().as_secs() < 60, "the server did not start");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let body = format!(
        "[[vm]]\nname = \"a\"\nmemory = \"64M\"\nserial = \"none\"\n\
         probe = {{ task = \"send\", channel = \"c\", to = \"b\", size = \"64M\" }}\n\
         [[vm]]\nname = \"b\"\nmemory = \"64M\"\n\
         probe = {{ task = \"recv\", channel = \"c\", size = \"64M\" }}\n\
         [[channel]]\nname = \"c\"\nkind = \"doorbell\"\nmembers = [\"a\", \"b\"]\nsize = \"4M\"\n\
         backing = {{ server = \"{}\" }}\n",
        sock.display()
    );
    // A size that differs from the server's is an error, not overridden.
    let wrong = temp_config(
        "db-server-size.toml",
        &body.replace("size = \"4M\"", "size = \"8M\""),
    );
    let o = intervm(&["run", wrong.to_str().unwrap(), "--timeout", "60"]);
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(
        err.contains("channel[c]: size: the server at")
            && err.contains("shares 4194304 bytes, not the 8388608 asked for; fix size"),
        "{err}"
    );
    let cfg = temp_config("db-server.toml", &body);
    let cfg = cfg.to_str().unwrap().to_string();
    let spawn = |vm: &str| spawn_vm(&cfg, vm);
    // The receiver joins first, so the server gives it ID 0 and the sender
    // ID 1: the doorbell IDs differ from the member indices. It joins the
    // channel (member 1) only after the server gave it its ID.
    let (_map, region) = watch_shm(&shm, 4 << 20);
    let rx = spawn("b");
    wait_until("the receiver to join", || {
        region
            .geometry()
            .is_ok_and(|g| region.member_state(&g, 1) == Ok(MemberState::Alive))
    });
    let tx = spawn("a").wait_with_output().unwrap();
    let rx = rx.wait_with_output().unwrap();
    // The server reports its peers by default, one line per join and
    // leave: the member refused for its size, then b and a (the leaves
    // once it has seen their connections close).
    wait_until("the server to log three joins and three leaves", || {
        let l = std::fs::read_to_string(&log_path).unwrap_or_default();
        l.matches(" joined").count() >= 3 && l.matches(" left (").count() >= 3
    });
    // SAFETY: signals the child process we started.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let _ = server.wait();
    let _ = std::fs::remove_file(format!("/dev/shm/{shm}"));
    let _ = std::fs::remove_file(&log_path);
    assert!(tx.status.success(), "{:?}", text(&tx));
    let (out, _) = text(&rx);
    assert!(rx.status.success(), "{:?}", text(&rx));
    assert!(
        out.contains("received 64 MiB of 64 MiB from a over c") && out.contains("checksum ok"),
        "{out}"
    );
    assert!(!sock.exists(), "the server removes its socket");
}

#[test]
fn the_main_demo_exchanges_data_over_all_three_channels() {
    if !kvm_available() {
        return;
    }
    let o = intervm(&["run", "configs/demo.toml", "--timeout", "300"]);
    let (out, err) = text(&o);
    assert!(o.status.success(), "stdout:\n{out}\nstderr:\n{err}");
    for want in [
        "beta: received 1 GiB of 1 GiB from alpha over shm",
        "alpha: received 64 KiB of 64 KiB from beta over pio",
        "alpha: received 16 MiB of 16 MiB from beta over pio-desc",
        "alpha: 2000 of 2000 round trips with beta over bell, 2000 interrupts",
        "beta: received 256 MiB of 256 MiB from alpha over bell",
    ] {
        assert!(out.contains(want), "{want:?} in\n{out}");
    }
    assert_eq!(out.matches("checksum ok").count(), 4, "{out}");
    assert!(!out.contains("MISMATCH"), "{out}");
}

#[test]
fn task_lists_report_the_failing_index() {
    let body = "[[vm]]\nname = \"a\"\nmemory = \"64M\"\nprobe = [\n  { task = \"hello\" },\n  { task = \"send\", channel = \"c\", to = \"b\" },\n]\n[[vm]]\nname = \"b\"\n[[channel]]\nname = \"c\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\n";
    check_rejects("tasks.toml", body, "vm[a].probe[1].size: missing");
}

#[test]
fn a_region_shrunk_by_another_process_loses_only_that_channel() {
    if !kvm_available() {
        return;
    }
    // Both members in one process, moving far more than they will finish.
    let (cfg, shm) = shm_config("shrink", "1024G");
    let (map, region) = watch_shm(&shm, 1 << 20);
    let run = common::intervm_cmd(&["run", cfg.to_str().unwrap(), "--timeout", "300"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until("the transfer to start", || {
        region
            .geometry()
            .is_ok_and(|g| region.ring_state(&g, 0, 1).is_ok_and(|s| s.tail > 0))
    });
    // Another process with access to the object cuts it to nothing. Every
    // access past the end used to be SIGBUS, which killed intervm (135).
    map.file().set_len(0).unwrap();
    let o = run.wait_with_output().unwrap();
    let _ = std::fs::remove_file(format!("/dev/shm/{shm}"));
    let (out, err) = text(&o);
    // An exit status, not a signal; a failure (the guests' own error, or 3).
    assert!(
        o.status.code().is_some_and(|c| c != 0),
        "{:?}\nstdout:\n{out}\nstderr:\n{err}",
        o.status
    );
    assert!(
        out.contains("channel c lost: /dev/shm/") && out.contains("can no longer be read"),
        "stdout:\n{out}\nstderr:\n{err}"
    );
}

#[test]
fn a_chaos_guest_crashes_nothing_and_corrupts_no_other_transfer() {
    if !kvm_available() {
        return;
    }
    // c writes random values at random widths to every device it has
    // (config space, BARs, MSI-X tables, doorbells to a, the port-I/O
    // block it shares with b, its region with a) while a sends checked
    // data to b over a channel c is not in.
    for seed in [1u64, 2, 3] {
        let body = format!(
            "[[vm]]\nname = \"a\"\nmemory = \"64M\"\nserial = \"none\"\n\
             probe = {{ task = \"send\", channel = \"good\", to = \"b\", size = \"2G\" }}\n\
             [[vm]]\nname = \"b\"\nmemory = \"64M\"\nserial = \"none\"\n\
             probe = {{ task = \"recv\", channel = \"good\", size = \"2G\" }}\n\
             [[vm]]\nname = \"c\"\nmemory = \"64M\"\nserial = \"none\"\n\
             probe = {{ task = \"chaos\", ops = 4000, seed = {seed} }}\n\
             [[channel]]\nname = \"good\"\nkind = \"shmem\"\nmembers = [\"a\", \"b\"]\n\
             [[channel]]\nname = \"s\"\nkind = \"shmem\"\nmembers = [\"c\", \"a\"]\n\
             [[channel]]\nname = \"bell\"\nkind = \"doorbell\"\nmembers = [\"c\", \"a\"]\nvectors = 4\n\
             [[channel]]\nname = \"pio\"\nkind = \"portio\"\nmembers = [\"c\", \"b\"]\n"
        );
        let cfg = temp_config(&format!("chaos-{seed}.toml"), &body);
        let o = intervm(&["run", cfg.to_str().unwrap(), "--timeout", "600"]);
        let (out, err) = text(&o);
        assert!(
            o.status.success(),
            "seed {seed}: {:?}\nstdout:\n{out}\nstderr:\n{err}",
            o.status
        );
        assert!(
            out.contains("received 2 GiB of 2 GiB from a over good") && out.contains("checksum ok"),
            "seed {seed}: {out}"
        );
        assert!(
            out.contains("c: chaos: 4000 of 4000 random accesses"),
            "seed {seed}: {out}"
        );
        assert!(!err.contains("panicked"), "seed {seed}: {err}");
    }
}

/// `intervm ivshmem-server` out of file descriptors: started with a low
/// `RLIMIT_NOFILE`, it either cannot `accept` (EMFILE: it pauses accepting
/// for a while instead of polling a listener that stays readable) or cannot
/// make a newcomer's eventfds (it turns that one client away). Either way it
/// serves on: once a client leaves, a waiting or a new client joins. Each
/// client costs the server two descriptors (socket and one eventfd), so two
/// limits one apart reach both cases, whatever the server's own count.
#[test]
fn a_server_out_of_descriptors_pauses_and_serves_on() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::os::unix::process::CommandExt;
    use std::time::{Duration, Instant};

    const DEADLINE: Duration = Duration::from_secs(60);
    let mut paused_once = false;
    for limit in [24u64, 25] {
        let tag = format!("{}-{limit}", std::process::id());
        let dir = std::env::temp_dir();
        let sock = dir.join(format!("intervm-emfile-{tag}.sock"));
        let log_path = dir.join(format!("intervm-emfile-{tag}.log"));
        let shm = format!("intervm-emfile-{tag}");
        let log_file = std::fs::File::create(&log_path).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_intervm"));
        cmd.args(["ivshmem-server", "--socket", sock.to_str().unwrap()])
            .args(["--shm", &shm, "--size", "1M"])
            .env("RUST_LOG", "info")
            .stdout(std::process::Stdio::null())
            .stderr(log_file);
        // SAFETY: setrlimit is async-signal-safe and touches only the
        // child between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                let r = libc::rlimit {
                    rlim_cur: limit,
                    rlim_max: limit,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &r) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut server = cmd.spawn().unwrap();
        let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
        wait_until("the server's socket", || sock.exists());
        // Clients join one by one until the server runs out.
        let mut joined = Vec::new();
        let (last, pausing, t0) = loop {
            assert!(joined.len() < 64, "no descriptor limit was hit: {}", log());
            // No pause can come before the connection that meets the limit.
            let t0 = Instant::now();
            let s = UnixStream::connect(&sock).unwrap();
            let id = joined.len();
            let mut outcome = None;
            wait_until("the server to take or refuse a client", || {
                let l = log();
                outcome = if l.contains(&format!("peer {id} joined")) {
                    Some(None)
                } else if l.contains("accept:") {
                    Some(Some(true))
                } else if l.contains("failed to join") {
                    Some(Some(false))
                } else {
                    None
                };
                outcome.is_some()
            });
            match outcome.unwrap() {
                None => joined.push(s),
                Some(pausing) => break (s, pausing, t0),
            }
        };
        assert!(!joined.is_empty(), "{}", log());
        eprintln!(
            "limit {limit}: {} clients joined, then {}",
            joined.len(),
            if pausing {
                "accept failed"
            } else {
                "a client was turned away"
            }
        );
        if pausing {
            // One failed accept (and one log line) per 200 ms back-off, not
            // a busy loop: three take at least 400 ms after the connection
            // (a server without back-off logs them at once).
            wait_until("three pauses", || log().matches("accept:").count() >= 3);
            let pauses = log().matches("accept:").count() as u128;
            let most = t0.elapsed().as_millis() / 200 + 2;
            assert!(pauses <= most, "{pauses} pauses, at most {most} expected");
            paused_once = true;
        }
        // A client leaves: two descriptors are free again.
        drop(joined.remove(0));
        let mut waiting = if pausing {
            last
        } else {
            // Turned away: the server closed it (end of stream).
            let mut s = last;
            s.set_read_timeout(Some(DEADLINE)).unwrap();
            assert_eq!(s.read(&mut [0u8; 8]).unwrap(), 0, "{}", log());
            UnixStream::connect(&sock).unwrap()
        };
        // The waiting (or a new) client gets the protocol version and the
        // ID the one that left freed.
        waiting.set_read_timeout(Some(DEADLINE)).unwrap();
        let mut msg = [0u8; 16];
        waiting
            .read_exact(&mut msg)
            .unwrap_or_else(|e| panic!("{e}: {}", log()));
        assert_eq!(i64::from_le_bytes(msg[..8].try_into().unwrap()), 0);
        assert_eq!(
            i64::from_le_bytes(msg[8..].try_into().unwrap()),
            0,
            "{}",
            log()
        );
        assert!(
            server.try_wait().unwrap().is_none(),
            "the server exited: {}",
            log()
        );
        // SAFETY: signals the child process we started.
        unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
        let _ = server.wait();
        let _ = std::fs::remove_file(format!("/dev/shm/{shm}"));
        let _ = std::fs::remove_file(&log_path);
    }
    assert!(paused_once, "neither limit made accept itself fail");
}
