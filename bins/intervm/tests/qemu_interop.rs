//! Tier 4: two VMs on two VMMs share regions.
//!
//! A Linux guest runs under Debian's `qemu-system-x86_64 -accel tcg` with
//! QEMU's own `ivshmem-plain` (on a `/dev/shm` object) and
//! `ivshmem-doorbell`. An intervm probe guest on KVM, run as its own
//! process (`--vm probe`), joins the same two regions; for the doorbell
//! region it starts the channel's on-demand ivshmem server at the socket
//! named after the backing, and QEMU joins by that socket, as the README
//! tells a user to. The Linux guest's
//! userspace runs `intervm-guest` (over sysfs `resource2`, and over
//! `/dev/uioN` of the ivshmem_uio driver), and the two exchange checksummed
//! data both ways over both regions. This checks the guest tool, the UIO
//! driver and our server against QEMU's devices. A second run has QEMU's
//! own contrib ivshmem-server serve the doorbell region instead, with both
//! VMMs as its clients.
//!
//! `scripts/qemu-interop` runs this test with its output shown.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Bytes moved each way over each region.
const SIZE: &str = "2M";
/// How long the whole exchange may take: only a hang reaches it (TCG boots
/// in ~2 s here, and a host busy with other runs makes that several times
/// longer).
const DEADLINE: Duration = Duration::from_secs(900);

/// Kills and reaps a child when dropped.
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Waits for `child` until `deadline`; kills it after that.
fn wait_until(child: &mut Reaped, deadline: Instant) -> Option<std::process::ExitStatus> {
    loop {
        if let Ok(Some(s)) = child.0.try_wait() {
            return Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.0.kill();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn read_all(r: Option<impl Read>) -> String {
    let mut s = String::new();
    if let Some(mut r) = r {
        let _ = r.read_to_string(&mut s);
    }
    s
}

struct Names {
    dir: PathBuf,
    plain: String,
    bell: String,
    /// The rendezvous directory (`INTERVM_RUNTIME_DIR`).
    run: PathBuf,
}

impl Drop for Names {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(Path::new("/dev/shm").join(&self.plain));
        let _ = std::fs::remove_file(Path::new("/dev/shm").join(&self.bell));
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn qemu_linux_guest_and_intervm_probe_exchange_data_both_ways() {
    exchange(None);
}

#[test]
fn the_same_exchange_through_qemus_own_ivshmem_server() {
    // The doorbell region and its peers come from QEMU's contrib
    // ivshmem-server (built by scripts/qemu-ivshmem-tools): intervm's probe
    // joins it with backing = { server }, QEMU's device by its socket.
    if let Some((server, _)) = intervm_testkit::qemu_ivshmem_tools() {
        exchange(Some(&server));
    }
}

/// Runs the exchange; with `qemu_server`, the doorbell region is served by
/// that program (QEMU's ivshmem-server) instead of intervm's own server.
fn exchange(qemu_server: Option<&Path>) {
    if !intervm_testkit::kvm_available() {
        return;
    }
    let Some(qemu) = intervm_testkit::host_program("qemu-system-x86_64") else {
        return;
    };
    let Some(guest) = intervm_testkit::guest_linux() else {
        return;
    };
    let intervm = env!("CARGO_BIN_EXE_intervm");
    // Both tests run at once in this process: names of their own.
    let tag = format!(
        "{}-{}",
        std::process::id(),
        if qemu_server.is_some() { "q" } else { "i" }
    );
    let dir = std::env::temp_dir().join(format!("intervm-qemu-{tag}"));
    std::fs::create_dir_all(&dir).unwrap();
    let names = Names {
        plain: format!("intervm-qemu-{tag}-plain"),
        bell: format!("intervm-qemu-{tag}-bell"),
        run: dir.join("run"),
        dir,
    };
    let deadline = Instant::now() + DEADLINE;
    // QEMU's server, if asked for, serving the doorbell region at its own
    // socket; else the probe's process starts ours at the rendezvous.
    let socket = match qemu_server {
        Some(_) => names.dir.join("qemu-ivshmem.sock"),
        None => names.run.join(format!("shm-{}.sock", names.bell)),
    };
    let _qemu_server = qemu_server.map(|server| {
        let child = Reaped(
            Command::new(server)
                .args(["-F", "-S"])
                .arg(&socket)
                .args(["-M", &names.bell, "-l", "4M", "-n", "1"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("starting QEMU's ivshmem-server"),
        );
        while !socket.exists() {
            assert!(
                Instant::now() < deadline,
                "QEMU's ivshmem-server never listened"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        child
    });
    let bell_backing = match qemu_server {
        Some(_) => format!("{{ server = \"{}\" }}", socket.display()),
        None => format!("{{ shm = \"{}\" }}", names.bell),
    };

    // 1. intervm runs the probe; "linux" is the QEMU guest (the same
    //    [[vm]] would boot under intervm on VMX/SVM).
    let cfg = names.dir.join("interop.toml");
    std::fs::write(
        &cfg,
        format!(
            r#"
[[vm]]
name = "probe"
memory = "64M"
kernel = "probe"
probe = [
    {{ task = "send", channel = "plain", to = "linux", size = "{SIZE}" }},
    {{ task = "recv", channel = "plain", from = ["linux"], size = "{SIZE}" }},
    {{ task = "send", channel = "bell", to = "linux", size = "{SIZE}" }},
    {{ task = "recv", channel = "bell", from = ["linux"], size = "{SIZE}" }},
]

[[vm]]
name = "linux"
memory = "256M"
kernel = "{kernel}"
initrd = "{initrd}"

[[channel]]
name = "plain"
kind = "shmem"
members = ["probe", "linux"]
size = "4M"
backing = {{ shm = "{plain}" }}
# The probe's process watches the QEMU guest tool's heartbeat (a thread of
# a TCG guest): only a hang may stop it this long.
peer_timeout = "120s"

[[channel]]
name = "bell"
kind = "doorbell"
members = ["probe", "linux"]
size = "4M"
backing = {bell_backing}
peer_timeout = "120s"
"#,
            kernel = guest.bzimage.display(),
            initrd = guest.initramfs_gz.display(),
            plain = names.plain,
        ),
    )
    .unwrap();
    let mut probe = Reaped(
        Command::new(intervm)
            .arg("run")
            .arg(&cfg)
            .args(["--vm", "probe", "--timeout", "880"])
            .env("INTERVM_RUNTIME_DIR", &names.run)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting intervm"),
    );
    // The probe's process creates the plain region and, for the doorbell
    // region, starts the on-demand server (`intervm check` names its
    // socket: DIR/shm-NAME.sock).
    let plain_path = Path::new("/dev/shm").join(&names.plain);
    while !(plain_path.exists() && socket.exists()) {
        assert!(
            Instant::now() < deadline,
            "intervm never created the region or its rendezvous socket"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // 2. QEMU: the plain device at 00:04.0, the doorbell device at 00:05.0.
    // Seeds named CHANNEL:SENDER are the ones the launcher uses.
    let run = [
        format!(
            "shmem recv --me 1 --from 0 --size {SIZE} --device 0000:00:04.0 --verify-seed plain:probe"
        ),
        format!("shmem send --me 1 --to 0 --size {SIZE} --device 0000:00:04.0 --seed plain:linux"),
        format!("doorbell recv --me 1 --from 0 --size {SIZE} --verify-seed bell:probe"),
        format!("doorbell send --me 1 --to 0 --size {SIZE} --seed bell:linux"),
    ]
    .join(" ; ");
    let mem_plain = format!(
        "memory-backend-file,id=plain,mem-path={},size=4M,share=on",
        plain_path.display()
    );
    let chardev = format!("socket,path={},id=bell", socket.display());
    let mut vm = Reaped(
        Command::new(qemu)
            .args(["-accel", "tcg", "-m", "256", "-nographic", "-no-reboot"])
            .args(["-nodefaults", "-serial", "stdio"])
            .arg("-kernel")
            .arg(&guest.bzimage)
            .arg("-initrd")
            .arg(&guest.initramfs_gz)
            .args(["-object", &mem_plain])
            .args(["-device", "ivshmem-plain,memdev=plain,addr=4"])
            .args(["-chardev", &chardev])
            .args(["-device", "ivshmem-doorbell,chardev=bell,vectors=1,addr=5"])
            .arg("-append")
            .arg(format!(
                "console=ttyS0 panic=-1 reboot=t quiet intervm.run=\"{run}\""
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting qemu-system-x86_64"),
    );

    let qemu_status = wait_until(&mut vm, deadline);
    let console = read_all(vm.0.stdout.take()) + &read_all(vm.0.stderr.take());
    let probe_status = wait_until(&mut probe, deadline + Duration::from_secs(10));
    let report = read_all(probe.0.stdout.take()) + &read_all(probe.0.stderr.take());
    eprintln!("--- QEMU guest console ---\n{console}\n--- intervm ---\n{report}");

    assert!(qemu_status.is_some(), "QEMU did not finish in time");
    assert!(
        console.contains("intervm-init: status 0"),
        "a guest command failed"
    );
    for what in ["received bytes=2097152", "sent bytes=2097152"] {
        assert_eq!(
            console.matches(what).count(),
            2,
            "expected two {what:?} lines from intervm-guest"
        );
    }
    assert!(
        probe_status.is_some_and(|s| s.success()),
        "the intervm probe failed"
    );
    for ch in ["plain", "bell"] {
        assert!(
            report.contains(&format!("from linux over {ch}"))
                && report
                    .lines()
                    .any(|l| l.contains(&format!("from linux over {ch}"))
                        && l.contains("checksum ok")),
            "the probe did not receive a clean stream over {ch}"
        );
    }
}
