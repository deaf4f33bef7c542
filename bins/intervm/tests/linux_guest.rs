//! Tier 3: a Linux guest under intervm on this host's `/dev/kvm`.
//!
//! Linux's own PCI code enumerates intervm's doorbell device, assigns and
//! maps its BARs and enables MSI-X; the ivshmem_uio driver (built into the
//! kernel by `scripts/guest-linux`) then checks registers, BAR2, a doorbell
//! to itself and a doorbell round trip with a probe guest, and prints one
//! line; /init then runs and powers off with status 0 (on PVM thanks to
//! the guest kernel's system-call shim, guests/linux/patches/). Linux
//! userspace then exchanges checksummed data over all three channels with
//! a probe (configs/linux-pair.toml) and with another Linux guest
//! (configs/linux-linux.toml).
//!
//! A shell on the guest's console (`serial = "console"`) runs a command the
//! test types on intervm's stdin once the prompt shows.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

mod common;

use vmm_core::host::KvmFlavor;

/// The guest-clock time of a kernel log line containing `what`.
fn kernel_time(console: &str, what: &str) -> Option<f64> {
    let line = console.lines().find(|l| l.contains(what))?;
    let stamp = line.split('[').nth(2)?.split(']').next()?;
    stamp.trim().parse().ok()
}

/// Held by the tests that run two Linux guests (or Linux and a busy
/// probe) for minutes: run side by side on two cores they slow each other
/// several times over, for no gain.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `intervm run CONFIG`, returning (success, stdout + stderr, stderr,
/// wall seconds).
fn run(config: &Path) -> (bool, String, String, f64) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let t0 = Instant::now();
    let out = Command::new(env!("CARGO_BIN_EXE_intervm"))
        .arg("run")
        .arg(config)
        // A hang catcher only: on a busy two-core host a Linux guest on
        // PVM can take several times its usual 100 s.
        .args(["--timeout", "1800"])
        .current_dir(&root)
        .output()
        .expect("running intervm");
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    let all = format!("{}\n{err}", String::from_utf8_lossy(&out.stdout));
    (out.status.success(), all, err, t0.elapsed().as_secs_f64())
}

/// Boots configs/linux-selftest.toml with `vcpus` vCPUs, `extra`
/// appended to the Linux command line and the probe running `task`
/// ("pong" as in the file, or "ping"). Returns success, the whole output,
/// stderr and wall seconds; `None` when KVM or the guest is missing.
fn boot_selftest(extra: &str, vcpus: u8, task: &str) -> Option<(bool, String, String, f64)> {
    if !intervm_testkit::kvm_available() {
        return None;
    }
    let guest = intervm_testkit::guest_linux()?;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let mut config = root.join("configs/linux-selftest.toml");
    let changed = !extra.is_empty() || vcpus != 1 || task != "pong";
    if changed {
        // The same file with absolute artifact paths and the changes.
        let text = std::fs::read_to_string(&config)
            .unwrap()
            .replace(
                "../target/guest-linux/vmlinux",
                &guest.vmlinux.display().to_string(),
            )
            .replace(
                "../target/guest-linux/initramfs.cpio",
                &guest.initramfs.display().to_string(),
            )
            .replace("selftest_peer=1\"", &format!("selftest_peer=1 {extra}\""))
            .replace(
                "memory = \"128M\"",
                &format!("memory = \"128M\"\nvcpus = {vcpus}"),
            )
            .replace("task = \"pong\"", &format!("task = \"{task}\""));
        config = std::env::temp_dir().join(format!(
            "intervm-linux-{}-{}-{vcpus}-{task}.toml",
            std::process::id(),
            extra.replace([' ', '='], "_")
        ));
        std::fs::write(&config, text).unwrap();
    }
    let result = run(&config);
    if changed {
        let _ = std::fs::remove_file(&config);
    }
    Some(result)
}

/// Boots configs/linux-selftest.toml with `vcpus` vCPUs and `extra`
/// appended to the Linux command line, and checks the driver's selftest
/// line for `irq`.
fn selftest(extra: &str, irq: &str, vcpus: u8) {
    let Some((ok, all, err, wall)) = boot_selftest(extra, vcpus, "pong") else {
        return;
    };

    let line = all
        .lines()
        .find(|l| l.contains("ivshmem_uio") && l.contains("selftest:"))
        .unwrap_or_else(|| panic!("no selftest line from the driver:\n{all}"));
    let want = format!("bar2=ok doorbell=ok irq={irq} peer=1:ok");
    assert!(line.contains(&want), "selftest failed: {line}");
    assert!(
        all.contains("probe: 1 of 1 answers with linux over bell"),
        "the probe did not answer the driver's ring:\n{all}"
    );
    let driver = kernel_time(&all, "selftest:").unwrap_or(f64::NAN);
    let init = kernel_time(&all, "Run /init").unwrap_or(f64::NAN);
    eprintln!(
        "Linux under intervm ({:?}, {irq}): driver selftest at {driver:.1} s, /init at \
         {init:.1} s (guest clock); whole run {wall:.1} s",
        KvmFlavor::detect()
    );
    assert!(init.is_finite(), "the kernel never reached /init:\n{all}");
    // The MP table lists every vCPU.
    assert!(
        all.contains(&format!("Allowing {vcpus} CPUs")),
        "Linux did not find {vcpus} CPUs:\n{all}"
    );
    // Userspace runs everywhere (on PVM through the guest kernel's
    // system-call shim): /init powers the VM off with status 0.
    assert!(
        all.contains("intervm-init: status 0"),
        "/init did not finish:\n{all}"
    );
    assert!(ok, "intervm failed:\n{err}");
}

#[test]
fn linux_driver_selftest_passes_against_a_probe_peer() {
    selftest("", "msix", 1);
}

#[test]
fn linux_driver_selftest_passes_over_intx() {
    // Without MSI Linux falls back to INTx through the IOAPIC, routed by
    // vmm-core's MP table (edge-triggered on PVM).
    selftest("pci=nomsi", "intx", 1);
}

#[test]
fn a_ring_that_arrives_before_the_driver_binds_is_taken_safely() {
    // The probe rings Linux (vector 0) as soon as it starts, seconds before
    // Linux binds ivshmem_uio: the ring waits in the eventfd and arrives
    // the moment the driver unmasks its vector. A driver that took
    // interrupts before registering its UIO device oopsed on it (a NULL
    // uio_dev in uio_event_notify).
    let Some((ok, all, err, _)) = boot_selftest("", 1, "ping") else {
        return;
    };
    let line = all
        .lines()
        .find(|l| l.contains("ivshmem_uio") && l.contains("selftest:"))
        .unwrap_or_else(|| panic!("no selftest line from the driver:\n{all}"));
    // The driver's ring to the probe answers the probe's ping. Whether the
    // driver then sees a ring back (the wake-up of the probe leaving) or
    // times out depends on timing, so only the peer's presence is checked.
    assert!(
        line.contains("bar2=ok doorbell=ok irq=msix peer=1:"),
        "selftest: {line}"
    );
    assert!(
        all.contains("probe: 1 of 1 round trips with linux over bell, 1 interrupts"),
        "the probe's early ring was never answered:\n{all}"
    );
    assert!(!all.contains("Oops"), "the guest kernel oopsed:\n{all}");
    assert!(
        all.contains("intervm-init: status 0"),
        "/init did not finish:\n{all}"
    );
    assert!(ok, "intervm failed:\n{err}");
}

#[test]
fn a_linux_guest_with_two_vcpus_boots() {
    // On PVM Linux is told to use one of them (secondary CPU start-up hangs
    // there); elsewhere it uses both.
    selftest("", "msix", 2);
}

/// The value after `stream_checksum=` or `stream checksum ` on `line`.
fn stream_of(line: &str) -> Option<&str> {
    let rest = line
        .split("stream_checksum=")
        .nth(1)
        .or_else(|| line.split("stream checksum ").nth(1))?;
    rest.split([' ', ',', ':']).next()
}

/// Runs one of the multi-minute Linux configs (`configs/NAME`), taking
/// turns with the others ([`HEAVY`]); `None` when KVM or the Linux guest is
/// missing (skip, or a failure under `CI=true`). Returns success and the
/// whole output.
fn run_linux_config(name: &str) -> Option<(bool, String)> {
    if !intervm_testkit::kvm_available() || intervm_testkit::guest_linux().is_none() {
        return None;
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let (ok, all, _, wall) = run(&root.join("configs").join(name));
    eprintln!("configs/{name}: {wall:.1} s on {:?}", KvmFlavor::detect());
    Some((ok, all))
}

#[test]
fn linux_userspace_exchanges_data_with_a_probe_over_all_three_channels() {
    let Some((ok, all)) = run_linux_config("linux-pair.toml") else {
        return;
    };
    assert!(ok, "intervm failed:\n{all}");
    assert!(
        all.contains("intervm-init: status 0"),
        "a guest command failed:\n{all}"
    );
    // Linux userspace, through sysfs resource2, could write neither
    // region's header or the probe's section, and could write its own.
    let protected = all
        .lines()
        .filter(|l| l.contains("intervm-guest: region protection ok: 0 of "))
        .count();
    assert_eq!(protected, 2, "protection checks (shm, bell):\n{all}");
    // Every transfer the probe received from Linux (2 over shm and bell,
    // 3 over pio: rep outsl, outb, descriptors) matched what intervm
    // computes for Linux's pattern.
    for (ch, n) in [("shm", 1), ("pio", 3), ("bell", 1)] {
        let clean = all
            .lines()
            .filter(|l| l.contains(&format!("from linux over {ch}")) && l.contains("checksum ok"))
            .count();
        assert_eq!(clean, n, "clean streams from Linux over {ch}:\n{all}");
    }
    assert!(!all.contains("MISMATCH"), "{all}");
    // Linux checks shm and bell payloads itself (--verify-seed); for the
    // port channel compare its stream checksum with what the probe sent.
    let sent = all
        .lines()
        .find(|l| l.contains("probe: sent") && l.contains("over pio"))
        .and_then(stream_of);
    let got = all
        .lines()
        .filter(|l| l.contains("intervm-guest: received"))
        .nth(1)
        .and_then(stream_of);
    assert!(
        sent.is_some() && sent == got,
        "port-I/O streams differ:\n{all}"
    );
}

#[test]
fn linux_userspace_uses_an_eight_gib_region_through_its_header_and_rings() {
    // 16 MiB rings at the far end of an 8 GiB BAR (above 4 GiB): Linux's
    // resource2 is mapped in two windows, and 32 MiB go each way.
    let Some((ok, all)) = run_linux_config("linux-big.toml") else {
        return;
    };
    assert!(ok, "intervm failed:\n{all}");
    assert!(
        all.contains("intervm-init: status 0"),
        "a guest command failed:\n{all}"
    );
    assert!(
        all.lines().any(
            |l| l.contains("probe: received 32 MiB of 32 MiB from linux over shm")
                && l.contains("checksum ok")
        ),
        "{all}"
    );
    // Linux checked every byte it received (--verify-seed); its stream is
    // the probe's.
    let sent = all
        .lines()
        .find(|l| l.contains("probe: sent 32 MiB of 32 MiB to linux over shm"))
        .and_then(stream_of);
    assert!(sent.is_some(), "{all}");
    assert_eq!(
        tool_streams(&all, "linux", "received"),
        [sent.unwrap_or("")]
    );
}

/// The `stream_checksum=` values of `vm`'s intervm-guest lines that start
/// with `what` ("sent" or "received"), in order.
fn tool_streams<'a>(all: &'a str, vm: &str, what: &str) -> Vec<&'a str> {
    let prefix = format!("[{vm}] intervm-guest: {what} ");
    all.lines()
        .filter(|l| l.starts_with(&prefix))
        .filter_map(stream_of)
        .collect()
}

#[test]
fn two_linux_guests_exchange_data_over_all_three_channels() {
    let Some((ok, all)) = run_linux_config("linux-linux.toml") else {
        return;
    };
    assert!(ok, "intervm failed:\n{all}");
    for vm in ["left", "right"] {
        assert!(
            all.contains(&format!("[{vm}] intervm-init: status 0")),
            "a command in {vm} failed:\n{all}"
        );
    }
    // Shared-memory receivers checked every byte (--verify-seed, a failure
    // is a non-zero status above). Port I/O: each receiver's stream equals
    // its sender's (left sends first, right second).
    let (l_sent, l_got) = (
        tool_streams(&all, "left", "sent"),
        tool_streams(&all, "left", "received"),
    );
    let (r_sent, r_got) = (
        tool_streams(&all, "right", "sent"),
        tool_streams(&all, "right", "received"),
    );
    // Order of each side's commands: shm, pio, bell.
    assert_eq!(
        (l_sent.len(), l_got.len(), r_sent.len(), r_got.len()),
        (3, 3, 3, 3),
        "{all}"
    );
    for i in 0..3 {
        assert_eq!(l_sent[i], r_got[i], "left -> right, transfer {i}:\n{all}");
        assert_eq!(r_sent[i], l_got[i], "right -> left, transfer {i}:\n{all}");
    }
}

/// `intervm run` as a child process whose console (stdin and stdout) the
/// test drives. Dropping it kills intervm if it is still running.
struct Console {
    child: Child,
    stdin: Option<ChildStdin>,
    chunks: mpsc::Receiver<Vec<u8>>,
    out: Vec<u8>,
    err: Arc<Mutex<Vec<u8>>>,
    /// The thread collecting `err`; joined once intervm has exited, so
    /// everything intervm wrote to stderr is in `err` before it is read.
    err_reader: Option<JoinHandle<()>>,
}

impl Console {
    fn spawn(config: &Path) -> Self {
        let mut child = Command::new(env!("CARGO_BIN_EXE_intervm"))
            .arg("run")
            .arg(config)
            .args(["--timeout", "900"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawning intervm");
        let (tx, chunks) = mpsc::channel();
        let mut stdout = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stdout.read(&mut buf) {
                if tx.send(buf[..n].to_vec()).is_err() {
                    break;
                }
            }
        });
        let err = Arc::new(Mutex::new(Vec::new()));
        let (mut stderr, e) = (child.stderr.take().unwrap(), err.clone());
        let err_reader = std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n @ 1..) = stderr.read(&mut buf) {
                e.lock().unwrap().extend_from_slice(&buf[..n]);
            }
        });
        Self {
            stdin: child.stdin.take(),
            child,
            chunks,
            out: Vec::new(),
            err,
            err_reader: Some(err_reader),
        }
    }

    fn output(&self) -> String {
        String::from_utf8_lossy(&self.out).into_owned()
    }

    fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.err.lock().unwrap()).into_owned()
    }

    /// Reads the console as it comes until `done` holds for everything
    /// read so far; panics with what was read if intervm exits first or
    /// `patience` (which only catches hangs) runs out.
    fn wait_for(&mut self, what: &str, patience: Duration, done: impl Fn(&str) -> bool) {
        let deadline = Instant::now() + patience;
        while !done(&self.output()) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.out.extend_from_slice(&chunk),
                Err(e) => panic!(
                    "{what}: {} within {patience:?}\nconsole:\n{}\nstderr:\n{}",
                    match e {
                        RecvTimeoutError::Timeout => "not seen",
                        RecvTimeoutError::Disconnected => "intervm exited first",
                    },
                    self.output(),
                    self.stderr()
                ),
            }
        }
    }

    /// Types `line` and Enter.
    fn type_line(&mut self, line: &str) {
        let stdin = self.stdin.as_mut().expect("stdin is open");
        stdin
            .write_all(format!("{line}\n").as_bytes())
            .and_then(|_| stdin.flush())
            .expect("writing to intervm's stdin");
    }

    /// Ends intervm's input, reads the console until intervm closes it,
    /// and returns its exit status once all of its stderr has been read.
    fn finish(&mut self, patience: Duration) -> ExitStatus {
        self.stdin = None;
        let deadline = Instant::now() + patience;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.chunks.recv_timeout(left) {
                Ok(chunk) => self.out.extend_from_slice(&chunk),
                Err(RecvTimeoutError::Disconnected) => break,
                Err(RecvTimeoutError::Timeout) => panic!(
                    "intervm still running {patience:?} after the end of its input\nconsole:\n{}\nstderr:\n{}",
                    self.output(),
                    self.stderr()
                ),
            }
        }
        let status = self.child.wait().expect("waiting for intervm");
        // The reader sees end of file once intervm (and anything it
        // started that kept stderr) has exited; without this join the
        // last lines, such as "linux stopped after", may not be in `err`.
        if let Some(reader) = self.err_reader.take() {
            reader.join().expect("the stderr reader panicked");
        }
        status
    }
}

impl Drop for Console {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Writes a temporary config with one 128 MiB Linux VM named `linux` (the
/// built guest) plus the `extra` lines, named after `tag`; returns its path.
fn one_linux_vm(guest: &intervm_testkit::GuestLinux, tag: &str, extra: &str) -> PathBuf {
    let config = std::env::temp_dir().join(format!("intervm-{tag}-{}.toml", std::process::id()));
    std::fs::write(
        &config,
        format!(
            "[[vm]]\nname = \"linux\"\nmemory = \"128M\"\nkernel = {:?}\ninitrd = {:?}\n{extra}",
            guest.vmlinux.display().to_string(),
            guest.initramfs.display().to_string()
        ),
    )
    .unwrap();
    config
}

/// `text` without terminal control sequences (`ESC [ ... letter`).
fn without_escapes(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// True when the console's last non-empty line, without its `[linux] `
/// prefix and terminal control sequences, is a shell prompt (`/ # `)
/// waiting for input after init started the shell. (Busybox's ash asks
/// for the cursor position, `ESC [6n`, right after its prompt, and the
/// console may end that line before or after the query arrives.)
fn shell_prompt(console: &str) -> bool {
    let Some((_, after)) = console.split_once("intervm-init: shell") else {
        return false;
    };
    let after = without_escapes(after);
    let last = after
        .rsplit('\n')
        .map(|l| l.strip_prefix("[linux] ").unwrap_or(l))
        .find(|l| !l.trim().is_empty())
        .unwrap_or("");
    last.ends_with("# ") || last.ends_with("$ ")
}

/// True when a console line is exactly `want` (with or without the
/// `[linux] ` prefix): the shell's output, not the echo of a command.
fn has_line(console: &str, want: &str) -> bool {
    console
        .lines()
        .any(|l| l == want || l.strip_prefix("[linux] ") == Some(want))
}

#[test]
fn prompts_are_found_around_terminal_queries() {
    for console in [
        "intervm-init: shell (exit to power off)\n[linux] / # ",
        "intervm-init: shell (exit to power off)\n[linux] / # \x1b[6n",
        "intervm-init: shell (exit to power off)\n[linux] / # \x1b[6n\n",
        "intervm-init: shell (exit to power off)\n[linux] / # \x1b[6n\n[linux] ",
    ] {
        assert!(shell_prompt(console), "{console:?}");
    }
    assert!(
        !shell_prompt("[linux] / # "),
        "before init started the shell"
    );
    assert!(!shell_prompt(
        "intervm-init: shell (exit to power off)\n[linux] BusyBox v1.35.0"
    ));
}

#[test]
fn a_shell_on_the_console_runs_what_is_typed_on_stdin() {
    if !intervm_testkit::kvm_available() {
        return;
    }
    let Some(guest) = intervm_testkit::guest_linux() else {
        return;
    };
    let config = one_linux_vm(
        &guest,
        "shell",
        "cmdline = \"intervm.shell=1\"\nserial = \"console\"\n",
    );
    let t0 = Instant::now();
    let mut console = Console::spawn(&config);
    // Only a hang reaches it: boots take 20-30 s and every exec several
    // seconds on PVM, and five times that on a host busy with other runs
    // (measured: /init started after 85 s, no prompt within 180 s).
    let patience = Duration::from_secs(900);
    console.wait_for("the shell's prompt", patience, shell_prompt);
    let ready = t0.elapsed().as_secs_f64();
    // Only evaluating the expression prints this line; the echo of the
    // command line shows the expression itself.
    console.type_line("echo intervm-$((6*7))");
    console.wait_for("the command's output", patience, |c| {
        has_line(c, "intervm-42")
    });
    let answered = t0.elapsed().as_secs_f64();
    console.type_line("exit");
    let status = console.finish(patience);
    let _ = std::fs::remove_file(&config);
    let (out, err) = (console.output(), console.stderr());
    eprintln!(
        "shell on the console ({:?}): prompt after {ready:.1} s, answer after {answered:.1} s, \
         intervm exited after {:.1} s",
        KvmFlavor::detect(),
        t0.elapsed().as_secs_f64()
    );
    // The guest powered off with the shell's status (not a host stop, and
    // not an end of input, which leaves the VM running).
    assert!(
        status.success() && err.contains("linux stopped after") && err.contains("Guest(0)"),
        "intervm: {status}\nconsole:\n{out}\nstderr:\n{err}"
    );
}

#[test]
fn a_forged_jump_to_the_syscall_entry_gains_no_privileges() {
    // The guest kernel's PVM system-call shim takes the return address
    // from RCX and the flags from R11, which a user program controls when
    // it jumps to the entry itself (on any host). intervm-guest's hidden
    // check does that with privileged flags and with a kernel return
    // address, and exits 0 only if the kernel dropped the flags and killed
    // the second child with SIGSEGV.
    if !intervm_testkit::kvm_available() {
        return;
    }
    let Some(guest) = intervm_testkit::guest_linux() else {
        return;
    };
    let Some(nm) = intervm_testkit::host_program("nm") else {
        return;
    };
    let out = Command::new(nm).arg(&guest.vmlinux).output().expect("nm");
    let symbols = String::from_utf8_lossy(&out.stdout);
    let entry = symbols
        .lines()
        .find(|l| l.ends_with(" entry_SYSCALL_64"))
        .and_then(|l| l.split(' ').next())
        .expect("entry_SYSCALL_64 in vmlinux");
    let config = one_linux_vm(
        &guest,
        "shim",
        &format!("cmdline = 'intervm.run=\"check-syscall-entry --entry {entry}\"'\n"),
    );
    let (ok, all, _, _) = run(&config);
    let _ = std::fs::remove_file(&config);
    assert!(ok, "intervm failed:\n{all}");
    assert!(
        all.contains("intervm-guest: syscall entry ok") && all.contains("intervm-init: status 0"),
        "the shim check failed:\n{all}"
    );
}

#[test]
fn a_linux_receiver_outlives_a_probe_sender_killed_and_restarted_ten_times() {
    // Linux userspace serves three checked transfers over shared memory
    // (`intervm-guest shmem recv --transfers 3`) while the probe sending
    // them runs in an intervm process of its own that is SIGKILLed
    // mid-transfer and started again, ten times: the Linux tool sees each
    // new incarnation of its sender, reports the cut transfer, and takes
    // the next one from the start.
    const KILLS: u64 = 10;
    const SIZE: u64 = 256 << 20;
    if !intervm_testkit::kvm_available() {
        return;
    }
    let Some(guest) = intervm_testkit::guest_linux() else {
        return;
    };
    let _heavy = HEAVY.lock().unwrap_or_else(|e| e.into_inner());
    let shm = format!("intervm-linux-serve-{}", std::process::id());
    let config = one_linux_vm(
        &guest,
        "serve",
        &format!(
            r#"cmdline = '''intervm.run="shmem recv --me 1 --from 0 --size {SIZE} --transfers 3 --verify-seed shm:probe --join-timeout 600 --timeout 60"'''

[[vm]]
name = "probe"
memory = "64M"
probe = [{{ task = "send", channel = "shm", to = "linux", size = "{SIZE}" }}]

[[channel]]
name = "shm"
kind = "shmem"
members = ["probe", "linux"]
size = "4M"
backing = {{ shm = "{shm}" }}
join_timeout = "600s"   # Linux boots slowly on PVM, more so on a busy host
# The probe's process watches the Linux tool's heartbeat (a guest thread,
# every 100 ms): on a host busy with other runs it stood still for more
# than the default 10 s. Only a hang may reach this; the test kills the
# probe, never Linux.
peer_timeout = "300s"
"#
        ),
    );
    let cfg = config.to_str().unwrap();
    let (_map, region) = common::watch_shm(&shm, 4 << 20);
    let whole = SIZE / (64 << 10) * intervm_protocol::ring::frame_bytes(64 << 10);
    let t0 = Instant::now();
    // The first sender waits for Linux to boot and the tool to start:
    // minutes on a busy host. The deadline only catches a hang.
    const PATIENCE: u32 = 1200;
    // This process lives through the whole test: the boot, every kill and
    // restart of the sender, and three transfers; its `--timeout` (an hour)
    // only catches a hang, like the test's own deadlines.
    let linux = common::spawn_vm_for(cfg, "linux", &[], 3600);
    let plan = intervm_testkit::KillPlan {
        kills: KILLS,
        complete: 3,
        whole,
        patience: Duration::from_secs(PATIENCE.into()),
    };
    let (interrupted, mut completed) = intervm_testkit::kill_mid_transfer(
        plan,
        (&region, 0, 1),
        || common::spawn_vm(cfg, "probe"),
        |probe| {
            let o = probe.wait_with_output().unwrap();
            assert!(o.status.success(), "{:?}", common::text(&o));
        },
    );
    let mut last = String::new();
    let mut linux = linux;
    while completed < 3 {
        let o = common::spawn_vm(cfg, "probe").wait_with_output().unwrap();
        let (out, err) = common::text(&o);
        if !o.status.success() {
            // What the Linux side said explains a sender that failed.
            let _ = linux.kill();
            let l = linux.wait_with_output().unwrap();
            let (lout, lerr) = common::text(&l);
            panic!(
                "sender ({completed} complete, {interrupted} cut before it):\n{out}\n{err}\n\
                 --- linux:\n{lout}\n{lerr}\n--- now: {}",
                intervm_testkit::pair_state(&region, 0, 1)
            );
        }
        last = out;
        completed += 1;
    }
    let o = linux.wait_with_output().unwrap();
    let (out, err) = common::text(&o);
    let _ = std::fs::remove_file(format!("/dev/shm/{shm}"));
    let _ = std::fs::remove_file(&config);
    let all = format!("{out}\n{err}");
    assert!(o.status.success(), "{all}");
    assert!(all.contains("intervm-init: status 0"), "{all}");
    let want = format!(
        "received 3 of 3 complete transfers, {interrupted} interrupted by the sender leaving"
    );
    assert!(all.contains(&want), "expected {want:?} in\n{all}");
    assert_eq!(
        all.matches("sender gone after").count() as u64,
        interrupted,
        "{all}"
    );
    // Linux checked every byte (--verify-seed); the last transfer's stream
    // is what the last probe sent, when one finished under the test's eyes.
    let sent = last
        .lines()
        .find(|l| l.contains("probe: sent") && l.contains("over shm"))
        .and_then(stream_of);
    if !last.is_empty() {
        assert!(sent.is_some(), "{last}");
        assert_eq!(
            tool_streams(&all, "linux", "received"),
            [sent.unwrap_or("")]
        );
    }
    eprintln!(
        "Linux receiver: {interrupted} kills, 3 complete transfers of {} MiB in {:.1} s",
        SIZE >> 20,
        t0.elapsed().as_secs_f64()
    );
}
