//! Linux userspace under intervm: `intervm-guest` in the Linux guest that
//! `scripts/guest-linux` builds, against a probe guest, through the
//! `intervm` launcher (so the same wiring a user gets). Measures what a
//! Linux guest costs on this host (time to `/init` and to the first
//! command, one system call, one page fault), a UIO doorbell round trip
//! with a probe, and transfers probe -> Linux userspace over each channel,
//! timed by the receiving Linux program (from its "go" to the last frame).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::{Deserialize, Serialize};

/// One transfer probe -> Linux userspace.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinuxTransfer {
    /// "shmem", "portio" or "doorbell".
    pub channel: String,
    /// The receiving tool's mode ("polling", "adaptive", "port-32bit",
    /// "descriptor").
    pub variant: String,
    /// Bytes moved.
    pub bytes: u64,
    /// Seconds, as the Linux receiver timed them.
    pub seconds: f64,
}

/// One run of the Linux userspace measurements.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct LinuxUser {
    /// Wall-clock seconds from `intervm run` to init's first line.
    pub wall_to_init_s: f64,
    /// Wall-clock seconds from `intervm run` to the first command's output.
    pub wall_to_first_output_s: f64,
    /// One `getppid` from userspace, µs.
    pub syscall_us: f64,
    /// One first touch of an anonymous page, µs.
    pub page_fault_us: f64,
    /// UIO doorbell round trip Linux -> probe -> Linux, mean µs.
    pub uio_round_trip_us: f64,
    /// ... its minimum, µs.
    pub uio_round_trip_min_us: f64,
    /// Transfers probe -> Linux.
    pub transfers: Vec<LinuxTransfer>,
}

/// The `intervm` binary built beside this one (`cargo build --release
/// -p intervm`), if present.
pub fn launcher() -> Option<PathBuf> {
    let p = std::env::current_exe().ok()?.parent()?.join("intervm");
    p.is_file().then_some(p)
}

/// A channel measured by one boot: the probe's tasks and Linux's commands.
struct Plan {
    probe: Vec<String>,
    linux: Vec<String>,
    /// (channel, variant, bytes) of each receive, in command order.
    expect: Vec<(&'static str, &'static str, u64)>,
}

fn value<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key))
}

fn num(line: &str, key: &str) -> f64 {
    value(line, key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// Boots probe + Linux with `plan` and returns the console lines with the
/// wall-clock second each arrived at.
fn boot(
    intervm: &Path,
    kernel: &Path,
    initrd: &Path,
    plan: &Plan,
) -> Result<Vec<(f64, String)>, String> {
    let tasks = plan.probe.join(",\n    ");
    let run = plan.linux.join(" ; ");
    let config = format!(
        r#"[[vm]]
name = "probe"
memory = "160M"
kernel = "probe"
probe = [
    {tasks}
]

[[vm]]
name = "linux"
memory = "256M"
kernel = {kernel:?}
initrd = {initrd:?}
cmdline = 'hugepages=1 intervm.run="{run}"'

[[channel]]
name = "shm"
kind = "shmem"
members = ["probe", "linux"]
size = "4M"
join_timeout = "600s"

[[channel]]
name = "pio"
kind = "portio"
members = ["probe", "linux"]
port = 0x5000
join_timeout = "600s"

[[channel]]
name = "bell"
kind = "doorbell"
members = ["probe", "linux"]
size = "4M"
join_timeout = "600s"
"#,
        kernel = kernel.display().to_string(),
        initrd = initrd.display().to_string(),
    );
    let path =
        std::env::temp_dir().join(format!("intervm-bench-linux-{}.toml", std::process::id()));
    std::fs::write(&path, config).map_err(|e| format!("{}: {e}", path.display()))?;
    let t0 = Instant::now();
    let mut child = Command::new(intervm)
        .arg("run")
        .arg(&path)
        .args(["--timeout", "900"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("{}: {e}", intervm.display()))?;
    let stderr = child.stderr.take().ok_or("no stderr")?;
    let errs = std::thread::spawn(move || {
        BufReader::new(stderr)
            .lines()
            .map_while(Result::ok)
            .collect::<Vec<_>>()
    });
    let mut lines = Vec::new();
    if let Some(out) = child.stdout.take() {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            lines.push((t0.elapsed().as_secs_f64(), l));
        }
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let _ = std::fs::remove_file(&path);
    let errs = errs.join().unwrap_or_default();
    if !status.success() {
        let tail: Vec<&str> = lines
            .iter()
            .map(|(_, l)| l.as_str())
            .filter(|l| !l.contains("] ["))
            .chain(errs.iter().map(|l| l.as_str()))
            .collect();
        return Err(format!(
            "intervm run failed ({status}):\n{}",
            tail.join("\n")
        ));
    }
    Ok(lines)
}

fn plans() -> Vec<Plan> {
    const SIZES: [(&str, u64); 3] = [("4K", 4 << 10), ("2M", 2 << 20), ("64M", 64 << 20)];
    let mut shm = Plan {
        probe: vec![r#"{ task = "pong", channel = "bell", to = "linux", rounds = 500 }"#.into()],
        linux: vec![
            "costs --count 2000".into(),
            "doorbell pingpong --peer 0 --rounds 500 --initiator".into(),
        ],
        expect: Vec::new(),
    };
    let mut bell = Plan {
        probe: Vec::new(),
        linux: Vec::new(),
        expect: Vec::new(),
    };
    for (label, bytes) in SIZES {
        shm.probe.push(format!(
            r#"{{ task = "send", channel = "shm", to = "linux", size = "{label}" }}"#
        ));
        shm.linux.push(format!(
            "shmem recv --me 1 --from 0 --size {label} --device 0000:00:01.0 --verify-seed shm:probe"
        ));
        shm.expect.push(("shmem", "polling", bytes));
        bell.probe.push(format!(
            r#"{{ task = "send", channel = "bell", to = "linux", size = "{label}" }}"#
        ));
        bell.linux.push(format!(
            "doorbell recv --me 1 --from 0 --size {label} --verify-seed bell:probe"
        ));
        bell.expect.push(("doorbell", "adaptive", bytes));
    }
    // Port mode: 4 KiB and 64 KiB (larger sizes are extrapolated by the
    // caller, about 75 us per 32-bit access); descriptors: every size.
    let mut pio = Plan {
        probe: Vec::new(),
        linux: Vec::new(),
        expect: Vec::new(),
    };
    for (label, bytes) in [("4K", 4u64 << 10), ("64K", 64 << 10)] {
        pio.probe.push(format!(
            r#"{{ task = "send", channel = "pio", to = "linux", size = "{label}", chunk = "64K", mode = "port", width = 4 }}"#
        ));
        pio.linux
            .push(format!("portio recv --port 0x5000 --from 0 --size {label}"));
        pio.expect.push(("portio", "port-32bit", bytes));
    }
    for (label, bytes) in SIZES {
        pio.probe.push(format!(
            r#"{{ task = "send", channel = "pio", to = "linux", size = "{label}", chunk = "64K", mode = "descriptor" }}"#
        ));
        pio.linux.push(format!(
            "portio recv --port 0x5000 --from 0 --size {label} --descriptor"
        ));
        pio.expect.push(("portio", "descriptor", bytes));
    }
    vec![shm, bell, pio]
}

/// Runs every measurement once (three boots of probe + Linux).
pub fn measure(intervm: &Path, kernel: &Path, initrd: &Path) -> Result<LinuxUser, String> {
    let mut r = LinuxUser::default();
    for (i, plan) in plans().iter().enumerate() {
        let lines = boot(intervm, kernel, initrd, plan)?;
        let text = |t: &(f64, String)| t.1.clone();
        if i == 0 {
            let at = |what: &str| {
                lines
                    .iter()
                    .find(|(_, l)| l.contains(what))
                    .map_or(f64::NAN, |(t, _)| *t)
            };
            r.wall_to_init_s = at("intervm-init: up after");
            r.wall_to_first_output_s = at("intervm-guest: costs");
            let costs = lines
                .iter()
                .map(text)
                .find(|l| l.contains("intervm-guest: costs"));
            let costs = costs.ok_or("no costs line")?;
            r.syscall_us = num(&costs, "syscall_us=");
            r.page_fault_us = num(&costs, "page_fault_us=");
            let pp = lines
                .iter()
                .map(text)
                .find(|l| l.contains("intervm-guest: ping-pong"));
            let pp = pp.ok_or("no ping-pong line")?;
            r.uio_round_trip_us = num(&pp, "mean_us=");
            r.uio_round_trip_min_us = num(&pp, "min_us=");
        }
        let received: Vec<String> = lines
            .iter()
            .map(text)
            .filter(|l| l.contains("intervm-guest: received"))
            .collect();
        if received.len() != plan.expect.len() {
            return Err(format!(
                "expected {} transfers, Linux reported {}",
                plan.expect.len(),
                received.len()
            ));
        }
        for (l, (channel, variant, bytes)) in received.iter().zip(&plan.expect) {
            if num(l, "bytes=") as u64 != *bytes {
                return Err(format!("short transfer: {l}"));
            }
            r.transfers.push(LinuxTransfer {
                channel: channel.to_string(),
                variant: variant.to_string(),
                bytes: *bytes,
                seconds: num(l, "seconds="),
            });
        }
    }
    Ok(r)
}
