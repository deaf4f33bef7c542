//! `intervm-bench`: the reproducible channel comparison.
//!
//! ```text
//! intervm-bench [--sizes 4K,2M,1G] [--channels shmem,portio,doorbell]
//!               [--repeat 3] [--out target/intervm-bench]
//! ```
//!
//! Boots probe guests on /dev/kvm for every channel, variant and size,
//! repeats each point, and writes `results.json` (every sample) and
//! `results.md` (median, min, max, throughput, exits, interrupts). Port-I/O
//! points that would take hours are extrapolated linearly from a measured
//! run, and the output says from what. Progress goes to stderr.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use intervm_benches::runs::{doorbell, portio, shmem};

struct Opts {
    sizes: Vec<u64>,
    channels: Vec<String>,
    repeat: usize,
    out: PathBuf,
}

fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (n, m) = match t.chars().last() {
        Some('K' | 'k') => (&t[..t.len() - 1], 1u64 << 10),
        Some('M' | 'm') => (&t[..t.len() - 1], 1 << 20),
        Some('G' | 'g') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    n.parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(m))
        .filter(|v| *v > 0)
        .ok_or_else(|| format!("--sizes: {s:?} is not a size (e.g. 4K, 2M, 1G)"))
}

fn opts() -> Result<Opts, String> {
    let mut o = Opts {
        sizes: vec![4 << 10, 2 << 20, 1 << 30],
        channels: vec!["shmem".into(), "portio".into(), "doorbell".into()],
        repeat: 3,
        out: PathBuf::from("target/intervm-bench"),
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
            "--bench" => {} // passed by `cargo bench`
            "-h" | "--help" => {
                println!("intervm-bench [--sizes 4K,2M,1G] [--channels shmem,portio,doorbell] [--repeat N] [--out DIR]");
                std::process::exit(0);
            }
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(o)
}

/// One measured point.
struct Point {
    channel: &'static str,
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
}

impl Point {
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

/// Small transfers are repeated in one boot to be timed.
fn rounds(bytes: u64) -> u64 {
    ((64u64 << 20) / bytes).clamp(1, 200)
}

fn run(o: &Opts) -> Vec<Point> {
    let mut plan: Vec<(&'static str, String, u64)> = Vec::new();
    for c in &o.channels {
        for &b in &o.sizes {
            match c.as_str() {
                "shmem" => {
                    plan.push(("memcpy", "host".into(), b));
                    plan.push(("shmem", "polling".into(), b));
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
            channel,
            variant: variant.clone(),
            bytes,
            samples: Vec::new(),
            exits: None,
            interrupts: None,
            extrapolated_from: None,
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
                    (shmem::vm_to_vm(bytes, n).0 / n as u32).as_secs_f64()
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
                        doorbell::Mode::Always
                    } else {
                        doorbell::Mode::Adaptive
                    };
                    let n = rounds(bytes);
                    let m = doorbell::transfer_with(bytes, n, mode);
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

fn json(points: &[Point], o: &Opts, flavor: &str, raw_exit_us: f64) -> String {
    let mut s = String::from("{\n");
    s += &format!("  \"kvm\": \"{flavor}\",\n  \"repeat\": {},\n  \"raw_pio_exit_us\": {raw_exit_us:.3},\n  \"points\": [\n", o.repeat);
    for (i, p) in points.iter().enumerate() {
        let (med, min, max) = p.stats();
        let opt = |v: Option<f64>| v.map_or("null".to_string(), |x| format!("{x:.1}"));
        s += &format!(
            "    {{\"channel\": \"{}\", \"variant\": \"{}\", \"bytes\": {}, \"median_s\": {med:.9}, \"min_s\": {min:.9}, \"max_s\": {max:.9}, \"samples_s\": [{}], \"exits\": {}, \"interrupts\": {}, \"extrapolated_from\": {}}}{}\n",
            p.channel,
            p.variant,
            p.bytes,
            p.samples.iter().map(|v| format!("{v:.9}")).collect::<Vec<_>>().join(", "),
            opt(p.exits),
            opt(p.interrupts),
            p.extrapolated_from.map_or("null".into(), |b| b.to_string()),
            if i + 1 < points.len() { "," } else { "" }
        );
    }
    s += "  ]\n}\n";
    s
}

fn markdown(points: &[Point], o: &Opts, flavor: &str, raw_exit_us: f64) -> String {
    let mut s = format!(
        "# intervm channel comparison\n\nKVM: {flavor}. {} runs per point; times are per transfer, from the receiving guest's TSC (memcpy: host clock). Raw CPL3 port-I/O exit round trip in this run: {raw_exit_us:.1} µs.\n\n",
        o.repeat
    );
    s += "| channel | variant | size | median | min | max | MiB/s | exits | interrupts | note |\n|---|---|---|---|---|---|---|---|---|---|\n";
    for p in points {
        let (med, min, max) = p.stats();
        let t = |v: f64| {
            if v >= 1.0 {
                format!("{v:.3} s")
            } else if v >= 1e-3 {
                format!("{:.3} ms", v * 1e3)
            } else {
                format!("{:.2} µs", v * 1e6)
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
    s
}

fn main() {
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
    if let Err(e) = std::fs::create_dir_all(&o.out) {
        eprintln!("intervm-bench: {}: {e}", o.out.display());
        std::process::exit(1);
    }
    for (name, body) in [
        ("results.json", json(&points, &o, &flavor, raw)),
        ("results.md", markdown(&points, &o, &flavor, raw)),
    ] {
        let p = o.out.join(name);
        if let Err(e) = std::fs::write(&p, body) {
            eprintln!("intervm-bench: {}: {e}", p.display());
            std::process::exit(1);
        }
    }
    eprintln!(
        "intervm-bench: {} points in {:.0?}; wrote {}/results.json and results.md",
        points.len(),
        Duration::from_secs(t0.elapsed().as_secs()),
        o.out.display()
    );
}
