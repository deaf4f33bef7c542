//! `intervm-bench`: the reproducible channel comparison.
//!
//! ```text
//! intervm-bench [--sizes 4K,2M,1G] [--channels shmem,portio,doorbell] [--no-linux]
//!               [--no-peers] [--repeat 3] [--out target/intervm-bench]
//! intervm-bench linux [--in DIR]   # only the Linux userspace part, into DIR/results.json
//! ```
//!
//! Boots probe guests on /dev/kvm for every channel, variant and size,
//! repeats each point, and writes `results.json` (every sample) and
//! `results.md` (median, min, max, throughput, exits, interrupts). Port-I/O
//! points that would take hours are extrapolated linearly from a measured
//! run, and the output says from what. Progress goes to stderr.

use std::path::PathBuf;
use std::time::Instant;

use intervm_benches::runs::linux::{self, LinuxBoot};
use intervm_benches::runs::linux_user::{self, LinuxUser};
use intervm_benches::runs::{doorbell, portio, shmem};
use serde::{Deserialize, Serialize};

struct Opts {
    sizes: Vec<u64>,
    channels: Vec<String>,
    repeat: usize,
    out: PathBuf,
    linux: bool,
    peers: bool,
}

fn parse_size(s: &str) -> Result<u64, String> {
    intervm_protocol::units::parse_size(s)
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("--sizes: {s:?} is not a size (e.g. 4K, 2M, 1G)"))
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts {
        sizes: vec![4 << 10, 2 << 20, 1 << 30],
        channels: vec!["shmem".into(), "portio".into(), "doorbell".into()],
        repeat: 3,
        out: PathBuf::from("target/intervm-bench"),
        linux: true,
        peers: true,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || args.next().ok_or_else(|| format!("{a}: missing value"));
        match a.as_str() {
            "--sizes" => {
                o.sizes = val()?
                    .split(',')
                    .map(parse_size)
                    .collect::<Result<_, _>>()?
            }
            "--channels" => {
                o.channels = val()?.split(',').map(str::to_string).collect();
                for c in &o.channels {
                    if !["shmem", "portio", "doorbell"].contains(&c.as_str()) {
                        return Err(format!(
                            "--channels: unknown channel {c:?} (shmem, portio, doorbell)"
                        ));
                    }
                }
            }
            "--repeat" => {
                o.repeat = val()?
                    .parse()
                    .ok()
                    .filter(|r| *r > 0)
                    .ok_or("--repeat: a positive number")?
            }
            "--out" => o.out = PathBuf::from(val()?),
            "--no-linux" => o.linux = false,
            "--no-peers" => o.peers = false,
            "--bench" => {} // passed by `cargo bench`
            "-h" | "--help" => {
                println!("intervm-bench [--sizes 4K,2M,1G] [--channels shmem,portio,doorbell] [--repeat N] [--out DIR] [--no-linux] [--no-peers]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(o)
}

/// One measured point.
#[derive(Serialize, Deserialize)]
struct Point {
    channel: String,
    variant: String,
    bytes: u64,
    /// Seconds per transfer, one per repetition.
    samples: Vec<f64>,
    /// VM exits per transfer (port I/O: device accesses of the sender).
    exits: Option<f64>,
    /// Interrupts per transfer (doorbells).
    interrupts: Option<f64>,
    /// Bytes actually moved when the time is extrapolated.
    extrapolated_from: Option<u64>,
    /// Shared-memory channels: the first (cold) transfer of each boot, s.
    #[serde(default)]
    cold: Vec<f64>,
    /// ... the later (warm) transfers of each boot.
    #[serde(default)]
    warm: Vec<Warm>,
}

/// The warm transfers of one boot.
#[derive(Serialize, Deserialize)]
struct Warm {
    /// How many.
    transfers: usize,
    /// Median, s.
    p50: f64,
    /// 99th percentile, s.
    p99: f64,
}

impl Point {
    /// Keeps the cold and warm rounds of one boot.
    fn keep_rounds(&mut self, r: &intervm_benches::runs::Rounds) {
        self.cold.extend(r.each.first());
        let w = r.warm();
        if let (Some(p50), Some(p99)) = (quantile(w, 0.5), quantile(w, 0.99)) {
            self.warm.push(Warm {
                transfers: w.len(),
                p50,
                p99,
            });
        }
    }

    fn stats(&self) -> (f64, f64, f64) {
        let mut v = self.samples.clone();
        v.sort_by(f64::total_cmp);
        (v[v.len() / 2], v[0], v[v.len() - 1])
    }
}

fn label(b: u64) -> String {
    match b {
        b if b >= 1 << 30 && b % (1 << 30) == 0 => format!("{}GiB", b >> 30),
        b if b >= 1 << 20 && b % (1 << 20) == 0 => format!("{}MiB", b >> 20),
        b if b >= 1 << 10 && b % (1 << 10) == 0 => format!("{}KiB", b >> 10),
        b => format!("{b}B"),
    }
}

/// Transfers are repeated in one boot until 64 MiB have moved (at least
/// three times, at most as often as the probe's round log holds): small
/// ones to be timed at all, and every size often enough that the warm
/// transfers pass through the whole ring many times (a transfer that
/// first touches a ring page pays for it) and the cold first one can be
/// told from them.
fn rounds(bytes: u64) -> u64 {
    ((64u64 << 20) / bytes).clamp(3, intervm_protocol::probe::ROUND_LOG_MAX)
}

fn run(o: &Opts) -> Vec<Point> {
    let mut plan: Vec<(&'static str, String, u64)> = Vec::new();
    for c in &o.channels {
        for &b in &o.sizes {
            match c.as_str() {
                "shmem" => {
                    plan.push(("memcpy", "host".into(), b));
                    plan.push(("shmem", "polling".into(), b));
                    plan.push(("shmem", "zero-copy".into(), b));
                }
                "portio" => {
                    for m in portio::MODES {
                        plan.push(("portio", m.label.into(), b));
                    }
                }
                _ => {
                    plan.push(("doorbell", "always".into(), b));
                    plan.push(("doorbell", "adaptive".into(), b));
                }
            }
        }
    }
    let total = plan.len() * o.repeat;
    let started = Instant::now();
    let mut points = Vec::new();
    let mut done = 0;
    for (channel, variant, bytes) in plan {
        let mut p = Point {
            channel: channel.to_string(),
            variant: variant.clone(),
            bytes,
            samples: Vec::new(),
            exits: None,
            interrupts: None,
            extrapolated_from: None,
            cold: Vec::new(),
            warm: Vec::new(),
        };
        for _ in 0..o.repeat {
            done += 1;
            let secs = match channel {
                "memcpy" => {
                    let n = rounds(bytes);
                    (shmem::host_memcpy(bytes, n) / n as u32).as_secs_f64()
                }
                "shmem" => {
                    let n = rounds(bytes);
                    let r = shmem::vm_to_vm_with(bytes, n, variant == "zero-copy");
                    p.keep_rounds(&r);
                    (r.total / n as u32).as_secs_f64()
                }
                "portio" => {
                    let m = portio::MODES
                        .into_iter()
                        .find(|m| m.label == variant)
                        .unwrap_or(portio::MODES[0]);
                    let measured = bytes.min(m.cap);
                    let r = portio::transfer(m, measured);
                    let scale = bytes as f64 / measured as f64;
                    if measured < bytes {
                        p.extrapolated_from = Some(measured);
                    }
                    p.exits = Some(r.tx.accesses as f64 * scale);
                    r.secs * scale
                }
                _ => {
                    let mode = if variant == "always" {
                        doorbell::Notify::Always
                    } else {
                        doorbell::Notify::Adaptive
                    };
                    let n = rounds(bytes);
                    let m = doorbell::transfer_with(bytes, n, mode);
                    p.keep_rounds(&m.rounds);
                    p.interrupts = Some(m.irqs as f64 / n as f64);
                    (m.time / n as u32).as_secs_f64()
                }
            };
            eprintln!(
                "[{done}/{total}, {:.0} s] {channel} {variant} {}: {:.6} s",
                started.elapsed().as_secs_f64(),
                label(bytes),
                secs
            );
            p.samples.push(secs);
        }
        points.push(p);
    }
    points
}

/// What a run writes to `results.json` (and `plot` reads back).
#[derive(Serialize, Deserialize)]
struct Results {
    kvm: String,
    repeat: usize,
    raw_pio_exit_us: f64,
    points: Vec<Point>,
    breakdown: Vec<Layers>,
    doorbell: Option<DoorbellFacts>,
    /// One message in flight: ping-pong latencies and their floor.
    #[serde(default)]
    latency: Vec<Latency>,
    /// All to one and all pairs as the members of a region grow.
    #[serde(default)]
    peers: Vec<Peers>,
    /// Doorbell round trips as the members of a region grow.
    #[serde(default)]
    bell_peers: Vec<BellPeers>,
    /// Linux boots to /init (absent when the Linux guest is not built).
    #[serde(default)]
    linux: Vec<LinuxBoot>,
    /// Linux userspace under intervm (absent without the Linux guest).
    #[serde(default)]
    linux_user: Option<LinuxUser>,
}

/// Ping-pong between two probe VMs: one way = round trip / 2.
#[derive(Serialize, Deserialize)]
struct Latency {
    /// How the sides wait: "polled" (shared memory), or a doorbell mode
    /// ("always", "adaptive").
    #[serde(default = "polled")]
    notify: String,
    /// Message bytes over the ring.
    bytes: u64,
    /// Round trips of each kind per run.
    rounds: u64,
    /// The floor in the same boots (one word each way, no ring), one way:
    /// median over the runs of each run's median, s.
    floor_p50: f64,
    /// ... of each run's 99th percentile, s.
    floor_p99: f64,
    /// Ring messages, one way: median over the runs of each run's median, s.
    p50: f64,
    /// ... of each run's 99th percentile, s.
    p99: f64,
    /// Median over the runs of each run's ring p50 over its floor p50.
    ratio: f64,
}

fn polled() -> String {
    "polled".into()
}

/// Round trips of each kind per ping-pong run: enough for ring messages
/// to pass through the whole ring many times (first touches are not what
/// a long-lived pair sees), and both kinds fit in the probe's round log.
const PING_PONG_ROUNDS: u64 = 16_000;

/// Ping-pong latency of ring messages, with the cache-line floor of the
/// same boots: polled shared memory (with `shmem` in the channels), and
/// both doorbell modes (with `doorbell`); and of port-I/O descriptor
/// messages (with `portio`) beside `raw_exit` (s), the raw CPL3 exit of
/// this invocation.
fn latencies(o: &Opts, raw_exit: f64) -> Vec<Latency> {
    let mut out = Vec::new();
    if o.channels.iter().any(|c| c == "portio") {
        for bytes in [64u64, 4096] {
            eprintln!(
                "latency (port I/O descriptors): {} x{}",
                label(bytes),
                o.repeat
            );
            let rounds = PING_PONG_ROUNDS / 64;
            let runs: Vec<Vec<f64>> = (0..o.repeat)
                .map(|_| portio::ping_pong(bytes, rounds))
                .collect();
            let of = |q: f64| median(runs.iter().filter_map(|r| quantile(r, q)).collect());
            let (p50, p99) = (of(0.5) / 2.0, of(0.99) / 2.0);
            out.push(Latency {
                notify: "port I/O (descriptors)".into(),
                bytes,
                rounds,
                floor_p50: raw_exit,
                floor_p99: raw_exit,
                p50,
                p99,
                ratio: p50 / raw_exit.max(f64::MIN_POSITIVE),
            });
        }
    }
    // (doorbell mode or polled, whether the floor carries the message)
    let mut modes = Vec::new();
    if o.channels.iter().any(|c| c == "shmem") {
        modes.extend([(None, false), (None, true)]);
    }
    if o.channels.iter().any(|c| c == "doorbell") {
        modes.extend([
            (Some(doorbell::Notify::Always), false),
            (Some(doorbell::Notify::Adaptive), false),
        ]);
    }
    for ((mode, copy), bytes) in modes.into_iter().flat_map(|m| [(m, 64u64), (m, 4096)]) {
        let name = match (mode, copy) {
            (Some(m), _) => m.name(),
            (None, false) => "polled",
            (None, true) => "polled, copy floor",
        };
        eprintln!(
            "latency ({name}): floor and ring {} x{}",
            label(bytes),
            o.repeat
        );
        // Doorbell round trips cost ~100 µs: fewer of them.
        let rounds = match mode {
            None => PING_PONG_ROUNDS,
            Some(_) => PING_PONG_ROUNDS / 8,
        };
        let runs: Vec<shmem::PingPong> = (0..o.repeat)
            .map(|_| match mode {
                None => shmem::ping_pong(bytes, rounds, copy),
                Some(m) => doorbell::ring_ping_pong(bytes, rounds, m),
            })
            .collect();
        let one_way = |v: &[f64], q: f64| quantile(v, q).map(|rt| rt / 2.0);
        let of = |f: &dyn Fn(&shmem::PingPong) -> Option<f64>| {
            median(runs.iter().filter_map(f).collect())
        };
        out.push(Latency {
            notify: name.to_string(),
            bytes,
            rounds,
            floor_p50: of(&|r| one_way(&r.floor, 0.5)),
            floor_p99: of(&|r| one_way(&r.floor, 0.99)),
            p50: of(&|r| one_way(&r.ring, 0.5)),
            p99: of(&|r| one_way(&r.ring, 0.99)),
            ratio: of(&|r| Some(one_way(&r.ring, 0.5)? / one_way(&r.floor, 0.5)?)),
        });
    }
    out
}

fn latency_markdown(r: &Results) -> String {
    if r.latency.is_empty() {
        return String::new();
    }
    let mut m = "\n## Latency: one message in flight\n\nTwo probe VMs bounce one word each way in their member-table entries (the floor: a cache line each way, no ring protocol, polled) N times, then a ring message as many times, in the same boot; one way is half a round trip, timed by the initiator. The sides wait for ring messages by polling (shared memory), or on doorbell devices (in-kernel path) by sleeping at once and ringing every message (always), or by polling for the PVM budget and ringing only a side that declared it sleeps (adaptive). Port I/O sends and receives each message with one descriptor command (its floor is this run's raw CPL3 `out` exit, a mean of 2,000). Medians over the runs of each run's p50 and p99, and of each run's ring p50 over its floor p50."
        .to_string();
    if r.latency.iter().any(|l| l.notify.contains("copy floor")) {
        m += " The \"copy floor\" rows carry the message in their floor: each side copies it to the start of its ring's data area before its word, and the other copies it out after seeing the word (no frame, index or checksum), the least any protocol that signals beside its data needs.";
    }
    m += "\n\n| waiting | message | N | floor p50 | floor p99 | ring p50 | ring p99 | ring / floor |\n|---|---|---|---|---|---|---|---|\n";
    for l in &r.latency {
        m += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {:.1}x |\n",
            l.notify,
            label(l.bytes),
            l.rounds,
            seconds(l.floor_p50),
            seconds(l.floor_p99),
            seconds(l.p50),
            seconds(l.p99),
            l.ratio
        );
    }
    if let Some(d) = &r.doorbell {
        m += &format!(
            "\nFor comparison, a doorbell one way (no data) is {:.1} µs through ioeventfd -> irqfd (see Doorbells).\n",
            d.round_trip_in_kernel_us / 2.0
        );
    }
    m
}

/// All to one: `members - 1` senders of `bytes` each to one receiver.
#[derive(Serialize, Deserialize)]
struct Peers {
    /// "all to one" (every member but 0 sends to 0) or "all pairs" (every
    /// member exchanges `bytes` both ways with every other).
    #[serde(default = "all_to_one")]
    pattern: String,
    /// Members of the region.
    members: u32,
    /// "polling" or "adaptive" (doorbells when the receiver sleeps).
    notify: String,
    /// Bytes from each sender (all pairs: each way per pair).
    bytes: u64,
    /// Receiver's time for all of it (all pairs: the slowest member's),
    /// median of the runs, s.
    secs: f64,
}

fn all_to_one() -> String {
    "all to one".into()
}

impl Peers {
    /// Bytes moved in all.
    fn total(&self) -> u64 {
        let n = self.members as u64;
        match self.pattern.as_str() {
            "all pairs" => self.bytes * n * (n - 1),
            _ => self.bytes * (n - 1),
        }
    }
}

/// Doorbell round trips while a region's members ping-pong in pairs, all
/// at once.
#[derive(Serialize, Deserialize)]
struct BellPeers {
    /// Members of the region (pairs: half as many).
    members: u32,
    /// Round trips per pair per run.
    rounds: u64,
    /// Median over runs of the pairs' mean round trip, µs.
    round_trip_us: f64,
    /// Median over runs of the slowest pair's mean round trip, µs.
    slowest_pair_us: f64,
}

/// Bytes each pair moves each way in the all-pairs runs.
const ALL_PAIRS_BYTES: u64 = 1 << 20;

/// Round trips per pair in the doorbell-latency runs.
const BELL_PEER_ROUNDS: u64 = 2000;

fn bell_curve(o: &Opts) -> Vec<BellPeers> {
    let mut out = Vec::new();
    for members in [2u32, 4, 8, 16] {
        eprintln!("doorbells: {members} members in pairs x{}", o.repeat);
        let runs: Vec<Vec<f64>> = (0..o.repeat)
            .map(|_| {
                doorbell::pairs_ping_pong(members, BELL_PEER_ROUNDS)
                    .iter()
                    .map(|d| d.as_secs_f64() * 1e6)
                    .collect()
            })
            .collect();
        let mean = |v: &Vec<f64>| v.iter().sum::<f64>() / v.len().max(1) as f64;
        let worst = |v: &Vec<f64>| v.iter().cloned().fold(0.0, f64::max);
        out.push(BellPeers {
            members,
            rounds: BELL_PEER_ROUNDS,
            round_trip_us: median(runs.iter().map(mean).collect()),
            slowest_pair_us: median(runs.iter().map(worst).collect()),
        });
    }
    out
}

/// Bytes each sender moves in the all-to-one runs.
const FAN_IN_BYTES: u64 = 16 << 20;

fn peer_curve(o: &Opts) -> Vec<Peers> {
    use intervm_benches::runs::doorbell::Notify;
    let mut out = Vec::new();
    type Run = fn(u32, u64, Notify) -> std::time::Duration;
    let patterns: [(&str, u64, Run); 2] = [
        ("all to one", FAN_IN_BYTES, shmem::fan_in),
        ("all pairs", ALL_PAIRS_BYTES, shmem::all_pairs),
    ];
    for (pattern, bytes, go) in patterns {
        for (notify, mode) in [("polling", Notify::Never), ("adaptive", Notify::Adaptive)] {
            for members in [2u32, 4, 8, 16] {
                eprintln!(
                    "peers: {pattern}, {members} members, {notify} x{}",
                    o.repeat
                );
                let secs = median(
                    (0..o.repeat)
                        .map(|_| go(members, bytes, mode).as_secs_f64())
                        .collect(),
                );
                out.push(Peers {
                    pattern: pattern.into(),
                    members,
                    notify: notify.into(),
                    bytes,
                    secs,
                });
            }
        }
    }
    out
}

fn peers_markdown(r: &Results) -> String {
    let mut m = String::new();
    let intro = |pattern: &str| {
        match pattern {
        "all pairs" => "\n## All pairs as a region's members grow\n\nEvery member exchanges the same amount both ways with every other, all at once, over one region (`members x (members - 1)` rings in use; with doorbells, one MSI-X vector per member); the slowest member's time from its start line to its last byte. Every VM has one vCPU, so above two members the VMs share the host's cores.\n\n| members | notify | per pair, each way | slowest member's time | aggregate MiB/s |\n|---|---|---|---|---|\n",
        _ => "\n## All to one as a region's members grow\n\nEvery member but one sends the same amount to member 0 at once, over one region; the receiver's time from its start line to the last byte of the last sender. Every VM has one vCPU, so above two members the VMs share the host's cores.\n\n| members | notify | per sender | receiver's time | aggregate MiB/s |\n|---|---|---|---|---|\n",
    }
    };
    let mut last = "";
    for p in &r.peers {
        if p.pattern != last {
            m += intro(&p.pattern);
            last = &p.pattern;
        }
        m += &format!(
            "| {} | {} | {} | {} | {:.0} |\n",
            p.members,
            p.notify,
            label(p.bytes),
            seconds(p.secs),
            p.total() as f64 / p.secs / (1u64 << 20) as f64
        );
    }
    if !r.bell_peers.is_empty() {
        m += "\n## Doorbell round trips as a region's members grow\n\nThe members of one doorbell region ping-pong in pairs (0 with 1, 2 with 3, ...), all at once, over the in-kernel path (`ioeventfd -> irqfd`); each pair's initiator times its round trips. Every doorbell arrived.\n\n| members | pairs | round trips per pair | mean round trip | slowest pair's mean |\n|---|---|---|---|---|\n";
        for b in &r.bell_peers {
            m += &format!(
                "| {} | {} | {} | {:.1} us | {:.1} us |\n",
                b.members,
                b.members / 2,
                b.rounds,
                b.round_trip_us,
                b.slowest_pair_us
            );
        }
    }
    m
}

/// Doorbell latency and idle cost, medians over the repetitions.
#[derive(Serialize, Deserialize)]
struct DoorbellFacts {
    /// Round trip through ioeventfd -> irqfd in KVM, µs.
    round_trip_in_kernel_us: f64,
    /// Round trip through the VMM's doorbell handler, µs.
    round_trip_vmm_us: f64,
    /// CPU use of an idle receiver (share of one CPU): polling.
    idle_cpu_polling: f64,
    /// ... doorbell per frame (sleeps whenever idle).
    idle_cpu_always: f64,
    /// ... adaptive.
    idle_cpu_adaptive: f64,
}

fn doorbell_facts(o: &Opts) -> DoorbellFacts {
    eprintln!("doorbell latency and idle CPU x{}", o.repeat);
    let rt = |fast: bool| {
        median(
            (0..o.repeat)
                .map(|_| doorbell::ping_pong(2000, fast).as_secs_f64() / 2000.0 * 1e6)
                .collect(),
        )
    };
    let idle = |m: doorbell::Notify| median((0..o.repeat).map(|_| doorbell::idle_cpu(m)).collect());
    DoorbellFacts {
        round_trip_in_kernel_us: rt(true),
        round_trip_vmm_us: rt(false),
        idle_cpu_polling: idle(doorbell::Notify::Never),
        idle_cpu_always: idle(doorbell::Notify::Always),
        idle_cpu_adaptive: idle(doorbell::Notify::Adaptive),
    }
}

/// The per-layer breakdown of the fastest channel (shared memory, polled)
/// for one size: medians over the repetitions, seconds per transfer.
#[derive(Serialize, Deserialize)]
struct Layers {
    bytes: u64,
    /// Frames filled and read in place (older results: copied).
    #[serde(default)]
    zero_copy: bool,
    total: f64,
    send_copy: f64,
    send_wait: f64,
    recv_copy: f64,
    recv_wait: f64,
    exits: u64,
    interrupts: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn layers(o: &Opts) -> Vec<Layers> {
    let mut out = Vec::new();
    for &(bytes, rounds) in &[(2u64 << 20, 20u64), (1 << 30, 1)] {
        for zero_copy in [false, true] {
            let how = if zero_copy { ", in place" } else { "" };
            eprintln!("breakdown: shmem {}{how} x{}", label(bytes), o.repeat);
            let runs: Vec<shmem::Breakdown> = (0..o.repeat)
                .map(|_| shmem::breakdown(bytes, rounds, zero_copy))
                .collect();
            let m = |f: fn(&shmem::Breakdown) -> f64| median(runs.iter().map(f).collect());
            out.push(Layers {
                bytes,
                zero_copy,
                total: m(|b| b.total),
                send_copy: m(|b| b.send_copy),
                send_wait: m(|b| b.send_wait),
                recv_copy: m(|b| b.recv_copy),
                recv_wait: m(|b| b.recv_wait),
                exits: runs.iter().map(|b| b.exits).max().unwrap_or(0),
                interrupts: runs.iter().map(|b| b.interrupts).max().unwrap_or(0),
            });
        }
    }
    out
}

/// Linux userspace against a probe, if the Linux guest and the `intervm`
/// launcher are built.
fn linux_userspace() -> Option<LinuxUser> {
    let Some((kernel, initrd)) = linux::artifacts() else {
        eprintln!(
            "intervm-bench: no Linux guest (run scripts/guest-linux); skipping Linux userspace"
        );
        return None;
    };
    let Some(intervm) = linux_user::launcher() else {
        eprintln!(
            "intervm-bench: no intervm launcher beside this binary (cargo build --release -p intervm); skipping Linux userspace"
        );
        return None;
    };
    eprintln!("intervm-bench: Linux userspace (three boots of probe + Linux)");
    match linux_user::measure(&intervm, &kernel, &initrd) {
        Ok(r) => Some(r),
        Err(e) => {
            eprintln!("intervm-bench: Linux userspace: {e}");
            None
        }
    }
}

/// The probe-to-probe median for the same channel, variant and size.
fn probe_median(r: &Results, channel: &str, variant: &str, bytes: u64) -> Option<f64> {
    r.points
        .iter()
        .find(|p| p.channel == channel && p.variant == variant && p.bytes == bytes)
        .map(|p| p.stats().0)
}

fn seconds(s: f64) -> String {
    if s < 1e-5 {
        format!("{:.2} µs", s * 1e6)
    } else if s < 1e-3 {
        format!("{:.1} µs", s * 1e6)
    } else if s < 1.0 {
        format!("{:.2} ms", s * 1e3)
    } else {
        format!("{s:.2} s")
    }
}

/// The `q` quantile (0..=1) of `v`, nearest rank; `None` when empty.
fn quantile(v: &[f64], q: f64) -> Option<f64> {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len().max(1));
    v.get(rank - 1).copied()
}

/// Port I/O against its floor: the time per sender access over the raw
/// CPL3 exit round trip measured in the same run (1.0x: nothing but the
/// sender's exits; the receiver's accesses exit too, and on a 2-core host
/// they compete with the sender's).
fn portio_floor_markdown(r: &Results) -> String {
    let rows: Vec<&Point> = r
        .points
        .iter()
        // Port mode only: a descriptor sender's accesses are a handful per
        // message plus its polls, also those before the start line, so
        // time per access says nothing there.
        .filter(|p| {
            p.channel == "portio"
                && !p.variant.starts_with("descriptor")
                && p.exits.is_some_and(|e| e > 0.0)
        })
        .collect();
    if rows.is_empty() || r.raw_pio_exit_us <= 0.0 {
        return String::new();
    }
    let mut m = format!(
        "\n## Port I/O against the exit floor\n\nPort mode: time per sender access (median time / accesses) over the raw CPL3 port-I/O exit round trip of this run ({:.1} µs). 1.0x would be nothing but the sender's exits; the receiver's accesses exit too and share the host's cores. (The exits column above counts every access of a boot's sender, its polls before the start line too: for descriptor modes, whose senders mostly poll, it is an upper bound.)\n\n| variant | size | per access | / raw exit |\n|---|---|---|---|\n",
        r.raw_pio_exit_us
    );
    for p in rows {
        let per = p.stats().0 / p.exits.unwrap_or(1.0);
        m += &format!(
            "| {} | {} | {} | {:.2}x |\n",
            p.variant,
            label(p.bytes),
            seconds(per),
            per * 1e6 / r.raw_pio_exit_us
        );
    }
    m
}

/// Cold against warm transfers of the shared-memory channels.
fn steady_state_markdown(r: &Results) -> String {
    let rows: Vec<&Point> = r.points.iter().filter(|p| !p.warm.is_empty()).collect();
    if rows.is_empty() {
        return String::new();
    }
    let mut m = String::from(
        "\n## Steady state: the first transfer of a boot against the later ones\n\nEvery boot above moves its size until 64 MiB have moved (at least 3 times). The first (cold) transfer pays the first touches of buffers and ring; the later (warm) ones are what a long-lived pair of VMs sees. Each run's warm transfers give a p50 and a p99; the table shows the median over the runs of each, and the warm p50 over the host memcpy median of the same size in this run.\n\n| channel | variant | size | cold (median) | warm p50 | warm p99 | warm transfers per run | warm p50 / memcpy |\n|---|---|---|---|---|---|---|---|\n",
    );
    for p in rows {
        let memcpy = probe_median(r, "memcpy", "host", p.bytes);
        let of = |f: fn(&Warm) -> f64| quantile(&p.warm.iter().map(f).collect::<Vec<_>>(), 0.5);
        let p50 = of(|w| w.p50);
        let cell = |v: Option<f64>| v.map_or("-".into(), seconds);
        m += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
            p.channel,
            p.variant,
            label(p.bytes),
            cell(quantile(&p.cold, 0.5)),
            cell(p50),
            cell(of(|w| w.p99)),
            p.warm.iter().map(|w| w.transfers).max().unwrap_or(0),
            match (p50, memcpy) {
                (Some(w), Some(c)) if c > 0.0 => format!("{:.1}x", w / c),
                _ => "-".into(),
            }
        );
    }
    m
}

fn linux_user_markdown(r: &Results, u: &LinuxUser) -> String {
    let mut m = String::from(
        "\n## Linux userspace under intervm (intervm-guest in the Linux guest, against a probe)\n\n",
    );
    m += &format!(
        "| | value |\n|---|---|\n| `intervm run` to init's first line, wall clock | {:.1} s |\n| ... to the first command's output | {:.1} s |\n| one system call (`getppid`) from userspace | {:.1} µs |\n| one page fault (first touch of an anonymous page) | {:.1} µs |\n| UIO doorbell round trip Linux -> probe -> Linux, mean (min) | {:.1} µs ({:.1} µs) |\n",
        u.wall_to_init_s,
        u.wall_to_first_output_s,
        u.syscall_us,
        u.page_fault_us,
        u.uio_round_trip_us,
        u.uio_round_trip_min_us
    );
    m += "\nTransfers probe -> Linux userspace, one run, timed by the Linux receiver from its \"go\" to the last frame; beside them the probe -> probe median of the table above. Sizes Linux did not move are extrapolated linearly and say so.\n\n| channel | variant | size | Linux userspace | probe -> probe | note |\n|---|---|---|---|---|---|\n";
    for (channel, variant) in [
        ("shmem", "polling"),
        ("doorbell", "adaptive"),
        ("portio", "port-32bit"),
        ("portio", "descriptor"),
    ] {
        let got: Vec<&linux_user::LinuxTransfer> = u
            .transfers
            .iter()
            .filter(|t| t.channel == channel && t.variant == variant)
            .collect();
        let Some(largest) = got.iter().max_by_key(|t| t.bytes) else {
            continue;
        };
        for bytes in [4u64 << 10, 2 << 20, 1 << 30] {
            let (secs, note) = match got.iter().find(|t| t.bytes == bytes) {
                Some(t) => (t.seconds, String::new()),
                None => (
                    largest.seconds * bytes as f64 / largest.bytes as f64,
                    format!("extrapolated from {}", label(largest.bytes)),
                ),
            };
            let probe = probe_median(r, channel, variant, bytes).map_or("-".into(), seconds);
            m += &format!(
                "| {channel} | {variant} | {} | {} | {probe} | {note} |\n",
                label(bytes),
                seconds(secs)
            );
        }
    }
    m
}

/// Boots the Linux guest `--repeat` times, if `scripts/guest-linux` built it.
fn linux_boots(o: &Opts) -> Vec<LinuxBoot> {
    let Some((kernel, initrd)) = linux::artifacts() else {
        eprintln!(
            "intervm-bench: no Linux guest (run scripts/guest-linux); skipping its boot time"
        );
        return Vec::new();
    };
    (0..o.repeat)
        .filter_map(|i| {
            eprintln!("intervm-bench: Linux boot {}/{}", i + 1, o.repeat);
            linux::boot(&kernel, &initrd)
                .map_err(|e| eprintln!("intervm-bench: Linux boot: {e}"))
                .ok()
        })
        .collect()
}

fn markdown(r: &Results) -> String {
    let (points, flavor, raw_exit_us) = (&r.points, &r.kvm, r.raw_pio_exit_us);
    let mut s = format!(
        "# intervm channel comparison\n\nKVM: {flavor}. {} runs per point; times are per transfer, from the receiving guest's TSC (memcpy: host clock). Raw CPL3 port-I/O exit round trip in this run: {raw_exit_us:.1} µs.\n\n",
        r.repeat
    );
    s += "| channel | variant | size | median | min | max | MiB/s | exits | interrupts | note |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for p in points {
        let (med, min, max) = p.stats();
        let t = |v: f64| {
            if v >= 1.0 {
                format!("{v:.3} s")
            } else if v >= 1e-3 {
                format!("{:.3} ms", v * 1e3)
            } else if v >= 1e-7 {
                format!("{:.2} µs", v * 1e6)
            } else {
                format!("{:.1} ns", v * 1e9)
            }
        };
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {:.1} | {} | {} | {} |\n",
            p.channel,
            p.variant,
            label(p.bytes),
            t(med),
            t(min),
            t(max),
            p.bytes as f64 / med / (1 << 20) as f64,
            p.exits.map_or("-".into(), |v| format!("{v:.0}")),
            p.interrupts.map_or("-".into(), |v| format!("{v:.1}")),
            p.extrapolated_from
                .map_or(String::new(), |b| format!("extrapolated from {}", label(b)))
        );
    }
    s += &portio_floor_markdown(r);
    s += &steady_state_markdown(r);
    s += &latency_markdown(r);
    s += &peers_markdown(r);
    if let Some(d) = &r.doorbell {
        s += &format!(
            "\n## Doorbells\n\n| | value |\n|---|---|\n| round trip, ioeventfd -> irqfd in KVM | {:.1} µs |\n| round trip, VMM handler | {:.1} µs |\n| idle receiver CPU, polling | {:.1}% |\n| idle receiver CPU, doorbell per frame | {:.1}% |\n| idle receiver CPU, adaptive | {:.1}% |\n",
            d.round_trip_in_kernel_us,
            d.round_trip_vmm_us,
            d.idle_cpu_polling * 100.0,
            d.idle_cpu_always * 100.0,
            d.idle_cpu_adaptive * 100.0
        );
    }
    s += "\n## Where the time goes: shared memory, polled (per transfer)\n\n";
    s += "Frames copied (`try_send`, `try_recv`: each copy sums as it goes), or in place (the sender writes into a reserved frame and the commit sums it there; the receiver only sums each frame where it lies). \"Copy\" is the guest's time in ring calls and the copies they make.\n\n";
    s += "| size | frames | total | sender copy (CPL3) | sender waits | receiver copy (CPL3) | receiver waits (peer) | VM exits (incl. 2 power-offs) | interrupts |\n|---|---|---|---|---|---|---|---|---|\n";
    for l in &r.breakdown {
        let ms = |v: f64| format!("{:.3} ms", v * 1e3);
        s += &format!(
            "| {} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            label(l.bytes),
            if l.zero_copy { "in place" } else { "copied" },
            ms(l.total),
            ms(l.send_copy),
            ms(l.send_wait),
            ms(l.recv_copy),
            ms(l.recv_wait),
            l.exits,
            l.interrupts
        );
    }
    if !r.linux.is_empty() {
        let med = |f: fn(&LinuxBoot) -> f64| {
            let mut v: Vec<f64> = r.linux.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        s += &format!(
            "\n## Linux boot (scripts/guest-linux kernel + initramfs, 128 MiB, 1 vCPU)\n\n| | median of {} |\n|---|---|\n| start to `Run /init`, wall clock | {:.1} s |\n| same, kernel timestamp | {:.1} s |\n| initramfs unpacking (kernel timestamps) | {:.1} s .. {:.1} s |\n| port-I/O exits until /init | {:.0} |\n| instructions completed by the VMM (int3, fwait) | {:.0} |\n",
            r.linux.len(),
            med(|b| b.wall_to_init_s),
            med(|b| b.guest_to_init_s),
            med(|b| b.guest_unpack_start_s),
            med(|b| b.guest_unpack_end_s),
            med(|b| b.pio_exits as f64),
            med(|b| b.emulated as f64),
        );
    }
    if let Some(u) = &r.linux_user {
        s += &linux_user_markdown(r, u);
    }
    s
}

/// `DIR/results.json`, its path and contents.
fn read_results(dir: &std::path::Path) -> Result<(std::path::PathBuf, Results), String> {
    let path = dir.join("results.json");
    let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let r = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    Ok((path, r))
}

/// `intervm-bench linux --in DIR`: measures Linux userspace again and
/// stores it in `DIR/results.json`, then regenerates `results.md`.
fn relinux(dir: &std::path::Path) -> Result<(), String> {
    let (path, mut r) = read_results(dir)?;
    r.linux_user = Some(linux_userspace().ok_or("the Linux userspace run failed")?);
    let json = serde_json::to_string_pretty(&r).map_err(|e| e.to_string())?;
    std::fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(dir.join("results.md"), markdown(&r)).map_err(|e| e.to_string())?;
    eprintln!("intervm-bench linux: updated {}", path.display());
    Ok(())
}

/// `intervm-bench plot --in DIR`: regenerates `results.md` and the SVG
/// plots from `DIR/results.json`.
fn plot(dir: &std::path::Path) -> Result<(), String> {
    let (_, r) = read_results(dir)?;
    std::fs::write(dir.join("results.md"), markdown(&r)).map_err(|e| e.to_string())?;
    plots::time_vs_size(&r, &dir.join("time_vs_size.svg"))?;
    plots::throughput(&r, &dir.join("throughput.svg"))?;
    plots::breakdown(&r, &dir.join("breakdown.svg"))?;
    eprintln!(
        "intervm-bench: wrote results.md, time_vs_size.svg, throughput.svg, breakdown.svg in {}",
        dir.display()
    );
    Ok(())
}

mod plots {
    use super::{label, Results};
    use plotters::prelude::*;
    use std::path::Path;

    fn e(err: impl std::fmt::Display) -> String {
        err.to_string()
    }

    /// One series per channel and variant: (bytes, median seconds).
    fn series(r: &Results) -> Vec<(String, Vec<(f64, f64)>)> {
        let mut out: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
        for p in &r.points {
            let name = format!("{} {}", p.channel, p.variant);
            let (med, _, _) = p.stats();
            match out.iter_mut().find(|(n, _)| *n == name) {
                Some((_, v)) => v.push((p.bytes as f64, med)),
                None => out.push((name, vec![(p.bytes as f64, med)])),
            }
        }
        out
    }

    /// A tick label for seconds or MiB/s.
    fn approx(v: f64, unit: &str) -> String {
        if unit != "seconds" {
            return format!("{v}");
        }
        const U: [(f64, &str); 4] = [(1.0, "s"), (1e-3, "ms"), (1e-6, "µs"), (1e-9, "ns")];
        U.iter()
            .find(|(d, _)| v >= *d * 0.999)
            .map_or(format!("{v:e} s"), |(d, u)| {
                format!("{} {u}", (v / d * 1000.0).round() / 1000.0)
            })
    }

    fn bounds(v: impl Iterator<Item = f64>) -> (f64, f64) {
        let (lo, hi) = v.fold((f64::MAX, f64::MIN), |(a, b), x| (a.min(x), b.max(x)));
        (lo / 2.0, hi * 2.0)
    }

    fn log_chart(
        r: &Results,
        path: &Path,
        title: &str,
        y_desc: &str,
        y: fn(f64, f64) -> f64,
    ) -> Result<(), String> {
        let s = series(r);
        // The x axis is log2 of the size, so that ticks can sit exactly at
        // the measured sizes (4 KiB, 2 MiB, 1 GiB) and nowhere else.
        let sizes: Vec<f64> = {
            let mut v: Vec<f64> = s
                .iter()
                .flat_map(|(_, v)| v.iter().map(|p| p.0.log2()))
                .collect();
            v.sort_by(f64::total_cmp);
            v.dedup();
            v
        };
        // Room on the right, past the largest size, for the legend, so
        // that it covers no line.
        let (x0, x1) = (
            sizes.first().copied().unwrap_or(10.0).floor() - 1.0,
            sizes.last().copied().unwrap_or(30.0).ceil() + 12.0,
        );
        let (y0, y1) = bounds(s.iter().flat_map(|(_, v)| v.iter().map(|p| y(p.0, p.1))));
        let root = SVGBackend::new(path, (1200, 760)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 30))
            .margin(20)
            .x_label_area_size(60)
            .y_label_area_size(110)
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(e)?;
        let tick = |v: &f64| {
            sizes
                .iter()
                .find(|s| (*s - v).abs() < 0.01)
                .map_or(String::new(), |s| label(s.exp2().round() as u64))
        };
        chart
            .configure_mesh()
            .x_desc("transfer size")
            .y_desc(y_desc)
            .x_labels((x1 - x0) as usize + 1)
            .disable_x_mesh()
            .x_label_formatter(&tick)
            .y_label_formatter(&|v| approx(*v, y_desc))
            .label_style(("sans-serif", 22))
            .axis_desc_style(("sans-serif", 22))
            .draw()
            .map_err(e)?;
        for (i, (name, pts)) in s.iter().enumerate() {
            let color = line_color(i);
            let data: Vec<(f64, f64)> = pts.iter().map(|&(b, t)| (b.log2(), y(b, t))).collect();
            chart
                .draw_series(LineSeries::new(data.clone(), color.stroke_width(2)))
                .map_err(e)?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
                });
            chart
                .draw_series(data.iter().map(|&p| Circle::new(p, 3, color.filled())))
                .map_err(e)?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 24))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)
    }

    /// Line `i`'s color: twelve that tell apart in print, then repeats.
    fn line_color(i: usize) -> RGBAColor {
        const C: [(u8, u8, u8); 12] = [
            (31, 119, 180),
            (255, 127, 14),
            (44, 160, 44),
            (214, 39, 40),
            (148, 103, 189),
            (140, 86, 75),
            (227, 119, 194),
            (127, 127, 127),
            (188, 189, 34),
            (23, 190, 207),
            (0, 0, 0),
            (174, 199, 232),
        ];
        let (r, g, b) = C[i % C.len()];
        RGBColor(r, g, b).to_rgba()
    }

    /// Time per transfer against size, log-log.
    pub fn time_vs_size(r: &Results, path: &Path) -> Result<(), String> {
        log_chart(
            r,
            path,
            "Time to move a transfer, VM to VM (log-log)",
            "seconds",
            |_, t| t,
        )
    }

    /// Throughput against size.
    pub fn throughput(r: &Results, path: &Path) -> Result<(), String> {
        log_chart(r, path, "Throughput, VM to VM", "MiB/s", |b, t| {
            b / t / (1u64 << 20) as f64
        })
    }

    /// Stacked per-layer breakdown of the polled shared-memory channel.
    pub fn breakdown(r: &Results, path: &Path) -> Result<(), String> {
        let root = SVGBackend::new(path, (1300, 650)).into_drawing_area();
        root.fill(&WHITE).map_err(e)?;
        let n = r.breakdown.len().max(1);
        // Said only when measured: every run made no exit but its two
        // power-offs and took no interrupt.
        let quiet = r
            .breakdown
            .iter()
            .all(|l| l.exits <= 2 && l.interrupts == 0);
        let caption = format!(
            "Shared memory, polled: where a transfer's time goes (share of the receiver's total{})",
            if quiet { "; no exit, no interrupt" } else { "" }
        );
        let mut chart = ChartBuilder::on(&root)
            .caption(caption, ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(0f64..n as f64, 0f64..140f64)
            .map_err(e)?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(0)
            .y_desc("% of the transfer (left bar: sender, right bar: receiver)")
            .label_style(("sans-serif", 20))
            .axis_desc_style(("sans-serif", 20))
            .draw()
            .map_err(e)?;
        chart
            .draw_series(r.breakdown.iter().enumerate().map(|(i, l)| {
                Text::new(
                    format!(
                        "{}{}: {:.2} ms",
                        label(l.bytes),
                        if l.zero_copy { " in place" } else { " copied" },
                        l.total * 1e3,
                    ),
                    (i as f64 + 0.05, 106.0),
                    ("sans-serif", 20),
                )
            }))
            .map_err(e)?;
        type Layer = (&'static str, fn(&super::Layers) -> f64);
        let layers: [Layer; 4] = [
            ("sender: ring calls, copy and sum (guest CPL3)", |l| {
                l.send_copy
            }),
            ("sender: waiting on a full ring", |l| l.send_wait),
            ("receiver: ring calls, copy or sum (guest CPL3)", |l| {
                l.recv_copy
            }),
            ("receiver: waiting for the peer's data", |l| l.recv_wait),
        ];
        for (k, (name, f)) in layers.iter().enumerate() {
            let color = Palette99::pick(k).to_rgba();
            let bars: Vec<Rectangle<(f64, f64)>> = r
                .breakdown
                .iter()
                .enumerate()
                .map(|(i, l)| {
                    // The sender's two parts stack on the left half, the
                    // receiver's on the right, each as a share of the total.
                    let side = if k < 2 { 0.1 } else { 0.5 };
                    let below: f64 = layers[if k < 2 { 0 } else { 2 }..k]
                        .iter()
                        .map(|(_, g)| g(l))
                        .sum();
                    let pct = |v: f64| 100.0 * v / l.total.max(1e-12);
                    Rectangle::new(
                        [
                            (i as f64 + side, pct(below)),
                            (i as f64 + side + 0.35, pct(below + f(l))),
                        ],
                        color.filled(),
                    )
                })
                .collect();
            chart
                .draw_series(bars)
                .map_err(e)?
                .label(*name)
                .legend(move |(x, y)| {
                    Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled())
                });
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .label_font(("sans-serif", 20))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .draw()
            .map_err(e)?;
        root.present().map_err(e)
    }
}

fn main() {
    // Subcommands that work on an existing results directory (--in DIR):
    // `plot` redraws it, `linux` re-measures only the Linux userspace part
    // into it (the probe numbers stay as measured).
    type Sub = fn(&std::path::Path) -> Result<(), String>;
    let subcommands: [(&str, Sub, &str); 2] = [
        ("plot", plot, "target/intervm-bench"),
        ("linux", relinux, "docs/results"),
    ];
    let first = std::env::args().nth(1);
    if let Some((name, run, default)) = subcommands
        .iter()
        .find(|(name, ..)| first.as_deref() == Some(*name))
    {
        let dir = std::env::args()
            .skip(2)
            .skip_while(|a| a != "--in")
            .nth(1)
            .unwrap_or_else(|| default.to_string());
        if let Err(e) = run(std::path::Path::new(&dir)) {
            eprintln!("intervm-bench {name}: {e}");
            std::process::exit(1);
        }
        return;
    }
    let o = match opts() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("intervm-bench: {e}");
            std::process::exit(2);
        }
    };
    if let Some(why) = vmm_core::host::kvm_unavailable_reason() {
        eprintln!("intervm-bench: KVM is unavailable: {why}");
        std::process::exit(1);
    }
    let flavor = format!("{:?}", vmm_core::host::KvmFlavor::detect());
    let raw = portio::raw_exit() * 1e6;
    let t0 = Instant::now();
    let points = run(&o);
    let breakdown = if o.channels.iter().any(|c| c == "shmem") {
        layers(&o)
    } else {
        Vec::new()
    };
    let latency = latencies(&o, raw / 1e6);
    let peers = if o.channels.iter().any(|c| c == "shmem") && o.peers {
        peer_curve(&o)
    } else {
        Vec::new()
    };
    let bell_peers = if o.channels.iter().any(|c| c == "doorbell") && o.peers {
        bell_curve(&o)
    } else {
        Vec::new()
    };
    let doorbell = o
        .channels
        .iter()
        .any(|c| c == "doorbell")
        .then(|| doorbell_facts(&o));
    let linux = if o.linux { linux_boots(&o) } else { Vec::new() };
    let linux_user = if o.linux { linux_userspace() } else { None };
    let results = Results {
        kvm: flavor,
        repeat: o.repeat,
        raw_pio_exit_us: raw,
        points,
        breakdown,
        doorbell,
        latency,
        peers,
        bell_peers,
        linux,
        linux_user,
    };
    if let Err(e) = std::fs::create_dir_all(&o.out) {
        eprintln!("intervm-bench: {}: {e}", o.out.display());
        std::process::exit(1);
    }
    let json = match serde_json::to_string_pretty(&results) {
        Ok(j) => j,
        Err(e) => {
            eprintln!("intervm-bench: {e}");
            std::process::exit(1);
        }
    };
    for (name, body) in [("results.json", json), ("results.md", markdown(&results))] {
        let p = o.out.join(name);
        if let Err(e) = std::fs::write(&p, body) {
            eprintln!("intervm-bench: {}: {e}", p.display());
            std::process::exit(1);
        }
    }
    eprintln!(
        "intervm-bench: {} points in {:.1} s; wrote {}/results.json and results.md",
        results.points.len(),
        t0.elapsed().as_secs_f64(),
        o.out.display()
    );
}
