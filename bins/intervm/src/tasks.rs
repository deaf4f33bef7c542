//! What a probe VM does, as configured by its `probe = { ... }` table, and
//! the report of how it went. The workloads themselves live in the probe
//! guest and `probe_image::shmem`; this module only maps names to member
//! indices and formats results.

use std::collections::{HashMap, HashSet};

use intervm_protocol::probe::EXCHANGE_MAX_VECTORS;
use intervm_protocol::probe::{BootInfo, Workload};
use probe_image::portio::{self, PortioTask};
use probe_image::shmem::{
    expected_stream, frame_bytes, peer_record, seed_for, sent_record, vector_irqs, Role,
    ShmemResult, ShmemTask,
};
use shmem_device::Transport;

use crate::config::{
    ChannelRef, ChannelSpec, Config, DoorbellSpec, Kind, MemberRef, ProbeTask, VmSpec,
};

/// The outcome of a probe task, checked.
pub struct Report {
    /// Human-readable lines.
    pub lines: Vec<String>,
    /// False when data was lost, corrupted or not all moved.
    pub ok: bool,
}

/// The channel a task names (resolved when the file was read).
fn channel<'a>(cfg: &'a Config, c: &ChannelRef) -> &'a ChannelSpec {
    &cfg.channels[c.index]
}

fn sender_chunk(cfg: &Config, sender: &str, on: &str) -> u64 {
    cfg.vms
        .iter()
        .find(|v| v.name == sender)
        .and_then(|v| {
            v.probe.iter().find_map(|t| match t {
                ProbeTask::Send { chunk, channel, .. }
                | ProbeTask::Exchange { chunk, channel, .. }
                    if channel.name == on =>
                {
                    Some(*chunk)
                }
                _ => None,
            })
        })
        .unwrap_or(crate::config::DEFAULT_CHUNK)
}

/// The boot-info pages of `vm`'s tasks, in order (its `index` in the file
/// numbers its greeting when it has none).
///
/// `server_ids`: doorbell channels whose peer IDs an ivshmem server hands
/// out (split across processes, or `backing = { server }`), so that they
/// differ from member indices: ping-pong there finds the peer's ID in the
/// ring region.
///
/// `transports`: the regions of the channels, whose geometry sets the
/// frame size a receiver that checks each of several transfers expects.
pub fn boot_infos(
    cfg: &Config,
    vm: &VmSpec,
    index: usize,
    server_ids: &HashSet<String>,
    transports: &HashMap<String, Transport>,
) -> Vec<BootInfo> {
    let info = |t: &ProbeTask| boot_info(cfg, vm, t, index, server_ids, transports);
    if vm.probe.is_empty() {
        return vec![info(&ProbeTask::Hello)];
    }
    vm.probe.iter().map(info).collect()
}

/// The stream checksum of a complete transfer of `size` bytes from `from`
/// over channel `c`: the sender's pattern in the sender's frames.
fn expected_from(
    cfg: &Config,
    c: &str,
    from: &str,
    size: u64,
    transports: &HashMap<String, Transport>,
) -> u64 {
    let max_payload = transports
        .get(c)
        .map_or(u64::MAX, |t| t.geometry().max_payload());
    let frame = frame_bytes(sender_chunk(cfg, from, c), size, max_payload);
    expected_stream(seed_for(c, from), size, frame)
}

fn boot_info(
    cfg: &Config,
    vm: &VmSpec,
    task: &ProbeTask,
    index: usize,
    server_ids: &HashSet<String>,
    transports: &HashMap<String, Transport>,
) -> BootInfo {
    match task {
        ProbeTask::Hello => {
            let mut info = BootInfo::new(Workload::Hello, 0, 0);
            info.args[0] = index as u64;
            info
        }
        ProbeTask::Chaos { ops, seed } => {
            use intervm_protocol::probe::chaos_args as a;
            let mut info = BootInfo::new(Workload::Chaos, 0, 0);
            info.args[a::SEED] = *seed;
            info.args[a::OPS] = *ops;
            // The first port-I/O block of this VM, if any.
            info.args[a::PORT_BASE] = cfg
                .channels
                .iter()
                .filter(|c| c.index_of(&vm.name).is_some())
                .find_map(|c| match c.kind {
                    Kind::Portio { port } => Some(port as u64),
                    _ => None,
                })
                .unwrap_or(0);
            info
        }
        ProbeTask::PingPong {
            channel: c,
            to,
            rounds,
            initiator,
        } => {
            use intervm_protocol::probe::doorbell_args as a;
            let ch = channel(cfg, c);
            let mut info = BootInfo::new(Workload::DoorbellPingPong, 0, 0);
            info.args[a::DEVICE_INDEX] = c.device as u64;
            info.args[a::PEER] = to.index as u64;
            if server_ids.contains(&c.name) {
                // IDs from a server: both sides publish theirs in the ring
                // region (which the launcher formats) and ring the other's.
                info.args[a::ME] = c.me as u64;
                info.args[a::JOIN_TIMEOUT_MS] = ch.join_timeout_ms;
                info.args[a::FLAGS] |= intervm_protocol::probe::DB_BY_REGION;
            }
            info.args[a::ROUNDS] = *rounds;
            info.args[a::INITIATOR] = *initiator as u64;
            info
        }
        ProbeTask::Send {
            channel: c,
            to,
            size,
            chunk,
            portio: Some(how),
            ..
        } => {
            let ch = channel(cfg, c);
            let mut t = PortioTask::new(portio::Role::Send { to: to.index }, *size);
            t.base = how.port;
            t.message = *chunk;
            t.seed = seed_for(&c.name, &vm.name);
            t.descriptor = how.descriptor;
            t.width = how.width;
            t.rep = how.rep;
            t.timeout_ms = ch.peer_timeout_ms;
            t.join_timeout_ms = ch.join_timeout_ms;
            t.boot_info()
        }
        ProbeTask::Recv {
            channel: c,
            from,
            size,
            portio: Some(how),
            transfers,
            ..
        } => {
            let ch = channel(cfg, c);
            let mask = from.iter().fold(0u32, |m, f| m | 1 << f.index);
            let mut t = PortioTask::new(portio::Role::Recv { from: mask }, *size);
            t.base = how.port;
            t.descriptor = how.descriptor;
            t.width = how.width;
            t.rep = how.rep;
            if let (n @ 1.., [f]) = (*transfers, from.as_slice()) {
                t.transfers = n;
                t.expect_stream = expected_from(cfg, &c.name, &f.name, *size, transports);
            }
            t.timeout_ms = ch.peer_timeout_ms;
            t.join_timeout_ms = ch.join_timeout_ms;
            t.boot_info()
        }
        ProbeTask::Send {
            channel: c,
            to,
            size,
            chunk,
            portio: None,
            zero_copy,
        } => {
            let ch = channel(cfg, c);
            let mut t = ShmemTask::new(c.me, Role::Send { to: to.index }, *size);
            t.device_index = c.device;
            t.chunk = *chunk;
            t.zero_copy = *zero_copy;
            t.seed = seed_for(&c.name, &vm.name);
            set_notify(&mut t, ch);
            t.timeout_ms = ch.peer_timeout_ms;
            t.join_timeout_ms = ch.join_timeout_ms;
            t.boot_info()
        }
        ProbeTask::Exchange {
            channel: c,
            with,
            size,
            chunk,
        } => {
            let ch = channel(cfg, c);
            let mask = with.iter().fold(0u32, |m, w| m | 1 << w.index);
            let mut t = ShmemTask::new(c.me, Role::Exchange { with: mask }, *size);
            t.device_index = c.device;
            t.chunk = *chunk;
            t.seed = seed_for(&c.name, &vm.name);
            set_notify(&mut t, ch);
            if let Some(d) = ch.kind.doorbell() {
                t.vectors = exchange_vectors(d);
            }
            t.timeout_ms = ch.peer_timeout_ms;
            t.join_timeout_ms = ch.join_timeout_ms;
            t.boot_info()
        }
        ProbeTask::Recv {
            channel: c,
            from,
            size,
            chunk,
            portio: None,
            transfers,
            zero_copy,
        } => {
            let ch = channel(cfg, c);
            let mask = from.iter().fold(0u32, |m, f| m | 1 << f.index);
            let mut t = ShmemTask::new(c.me, Role::Recv { from: mask }, *size);
            t.device_index = c.device;
            t.chunk = *chunk;
            t.zero_copy = *zero_copy;
            if let (n @ 1.., [f]) = (*transfers, from.as_slice()) {
                t.transfers = n;
                t.expect_stream = expected_from(cfg, &c.name, &f.name, *size, transports);
            }
            set_notify(&mut t, ch);
            t.timeout_ms = ch.peer_timeout_ms;
            t.join_timeout_ms = ch.join_timeout_ms;
            t.boot_info()
        }
    }
}

/// Doorbell channels: what the side did with doorbells.
fn doorbells(ch: &ChannelSpec, info: &BootInfo) -> String {
    use intervm_protocol::probe::results as r;
    if ch.kind.doorbell().is_none() {
        return String::new();
    }
    format!(
        ", {} doorbells rung, {} sleeps",
        info.results[r::SHM_DOORBELLS],
        info.results[r::SHM_SLEEPS]
    )
}

/// The MSI-X vectors an exchange on doorbell channel `d` enables (and
/// reports): the channel's, up to one per member of the largest region.
fn exchange_vectors(d: &DoorbellSpec) -> u32 {
    d.vectors.min(EXCHANGE_MAX_VECTORS as usize) as u32
}

/// Doorbell channels: how a transfer waits and rings.
fn set_notify(t: &mut ShmemTask, ch: &ChannelSpec) {
    if let Some(d) = ch.kind.doorbell() {
        t.notify = d.notify;
        t.spin_us = d.spin_us();
    }
}

fn human(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (size, unit) in UNITS {
        if bytes >= size {
            return if bytes.is_multiple_of(size) {
                format!("{} {unit}", bytes / size)
            } else {
                format!("{:.2} {unit}", bytes as f64 / size as f64)
            };
        }
    }
    format!("{bytes} bytes")
}

fn rate(bytes: u64, secs: Option<f64>) -> String {
    match secs {
        Some(s) if s > 0.0 => format!(
            " in {:.6} s ({:.2} MiB/s)",
            s,
            bytes as f64 / s / (1 << 20) as f64
        ),
        _ => String::new(),
    }
}

/// Checks and describes what each of `vm`'s tasks did, from guest memory.
pub fn reports(
    cfg: &Config,
    vm: &VmSpec,
    mem: &vmm_core::memory::GuestMemoryMmap,
    transports: &HashMap<String, Transport>,
) -> Option<Report> {
    use vmm_core::boot::probe;
    match vm.probe.as_slice() {
        [] => None,
        [one] => probe::read_info(mem)
            .ok()
            .and_then(|info| report(cfg, vm, one, &info, transports)),
        many => {
            let mut all = Report {
                lines: Vec::new(),
                ok: true,
            };
            for (i, task) in many.iter().enumerate() {
                match probe::read_task(mem, i) {
                    Ok((u32::MAX, _)) => {
                        // Not finished: stopped by an earlier failure, or
                        // the VM stopped (timeout, host stop) during it.
                        let why = if all.ok {
                            "did not finish (the VM stopped first)"
                        } else {
                            "did not run (an earlier one failed)"
                        };
                        all.ok = false;
                        all.lines.push(format!("{}: task {i} {why}", vm.name));
                    }
                    Ok((_, info)) => {
                        if let Some(r) = report(cfg, vm, task, &info, transports) {
                            all.ok &= r.ok;
                            all.lines.extend(r.lines);
                        }
                    }
                    Err(e) => {
                        all.ok = false;
                        all.lines.push(format!("{}: task {i}: {e}", vm.name));
                    }
                }
            }
            Some(all)
        }
    }
}

/// Checks and describes what one task of `vm` did, from its boot-info page.
/// `None` for tasks with nothing to check.
pub fn report(
    cfg: &Config,
    vm: &VmSpec,
    task: &ProbeTask,
    info: &BootInfo,
    transports: &HashMap<String, Transport>,
) -> Option<Report> {
    let res = ShmemResult::from_info(info);
    let secs = res.seconds();
    let mut lines = Vec::new();
    let mut ok = true;
    let (c, verb) = match task {
        ProbeTask::Hello => return None,
        ProbeTask::Chaos { ops, .. } => {
            use intervm_protocol::probe::results as r;
            let done = info.results[r::CHAOS_OPS];
            return Some(Report {
                lines: vec![format!(
                    "{}: chaos: {done} of {ops} random accesses over {} PCI functions ({} skipped: no device there)",
                    vm.name,
                    info.results[r::CHAOS_FUNCTIONS],
                    info.results[r::CHAOS_SKIPPED],
                )],
                ok: done == *ops,
            });
        }
        ProbeTask::PingPong {
            channel,
            to,
            rounds,
            initiator,
        } => {
            use intervm_protocol::probe::results as r;
            let done = info.results[r::DB_ROUNDS];
            let irqs = info.results[r::DB_IRQS];
            let us = |c: u64| c as f64 / info.tsc_khz.max(1) as f64 * 1e3;
            // The initiator times round trips; the answering side times
            // its waits for each ring, the first of which includes the
            // peer's start-up.
            let (what, timed) = if *initiator {
                ("round trips", "round trip")
            } else {
                (
                    "answers",
                    "wait for a ring (the first includes the peer's start-up)",
                )
            };
            // Every round answered, and at least one interrupt each; more
            // are rings left pending by an earlier task on this vector
            // (doorbells of a transfer), delivered once it was enabled.
            let ok = done == *rounds && irqs >= *rounds;
            return Some(Report {
                lines: vec![format!(
                    "{}: {done} of {rounds} {what} with {to} over {channel}, {irqs} interrupts; {timed}: mean {:.1} us, min {:.1} us{}",
                    vm.name,
                    us(info.results[r::DB_TOTAL_CYCLES]) / done.max(1) as f64,
                    us(info.results[r::DB_MIN_CYCLES]),
                    if ok { "" } else { ": LOST INTERRUPTS" }
                )],
                ok,
            });
        }
        ProbeTask::Send { channel, .. } => (channel, "send"),
        ProbeTask::Exchange { channel, .. } => (channel, "exchange"),
        ProbeTask::Recv { channel, .. } => (channel, "receive"),
    };
    let ch = channel(cfg, c);
    if let Some((code, detail)) = res.error {
        ok = false;
        let name = match ch.kind {
            Kind::Portio { .. } => probe_image::portio::error_name(code),
            _ => probe_image::shmem::error_name(code),
        };
        lines.push(format!(
            "{}: {verb} over {c} stopped: {name} (detail {detail:#x})",
            vm.name
        ));
    }
    match task {
        ProbeTask::Hello | ProbeTask::Chaos { .. } | ProbeTask::PingPong { .. } => {}
        ProbeTask::Send { to, size, .. } => {
            let r = peer_record(info, to.index);
            ok &= r.bytes == *size;
            lines.push(format!(
                "{}: sent {} of {} to {to} over {c}{}, stream checksum {:#018x}{}",
                vm.name,
                human(r.bytes),
                human(*size),
                rate(r.bytes, secs),
                r.stream,
                doorbells(ch, info)
            ));
        }
        ProbeTask::Recv {
            from,
            size,
            transfers: n @ 1..,
            ..
        } => {
            let t = res.transfers;
            ok &= t.ok == *n && t.bad == 0;
            let f = from.first().map_or("?", |f| f.name.as_str());
            lines.push(format!(
                "{}: received {} of {n} complete transfers of {} from {f} over {c}: {}; \
                 {} interrupted by {f} leaving (reported, not received; {} left in the ring, dropped){}",
                vm.name,
                t.ok,
                human(*size),
                if t.bad == 0 {
                    "every one checksum ok".to_string()
                } else {
                    format!("{} BAD (ring error or checksum mismatch)", t.bad)
                },
                t.lost,
                human(t.stale_bytes),
                doorbells(ch, info)
            ));
        }
        ProbeTask::Exchange { with, size, .. } => {
            let sent: Vec<u64> = with
                .iter()
                .map(|w| sent_record(info, w.index).bytes)
                .collect();
            let all = sent.iter().all(|b| b == size);
            ok &= all;
            lines.push(format!(
                "{}: sent {} of {} to each of {} peers over {c}: {}{}",
                vm.name,
                human(sent.iter().copied().min().unwrap_or(0)),
                human(*size),
                with.len(),
                if all { "complete" } else { "INCOMPLETE" },
                doorbells(ch, info)
            ));
            ok &= received(cfg, vm, c, with, *size, info, secs, transports, &mut lines);
            if let Some(d) = ch.kind.doorbell() {
                // Which peer rang is the vector it rang on (`me % vectors`).
                let n = exchange_vectors(d);
                let counts: Vec<String> = (0..n)
                    .map(|v| format!("{v}:{}", vector_irqs(info, v)))
                    .collect();
                lines.push(format!(
                    "{}: interrupts by vector over {c}: {}",
                    vm.name,
                    counts.join(" ")
                ));
            }
        }
        ProbeTask::Recv { from, size, .. } => {
            ok &= received(cfg, vm, c, from, *size, info, secs, transports, &mut lines);
        }
    }
    Some(Report { lines, ok })
}

/// Checks what `vm` received from each of `from` over `c` against the
/// checksum each sender's pattern must give, one line each; false when any
/// is incomplete or differs.
#[allow(clippy::too_many_arguments)]
fn received(
    cfg: &Config,
    vm: &VmSpec,
    c: &ChannelRef,
    from: &[MemberRef],
    size: u64,
    info: &BootInfo,
    secs: Option<f64>,
    transports: &HashMap<String, Transport>,
    lines: &mut Vec<String>,
) -> bool {
    let mut ok = true;
    for f in from {
        let r = peer_record(info, f.index);
        let verdict = if r.bytes != size {
            ok = false;
            "INCOMPLETE".to_string()
        } else {
            // What a complete transfer must arrive with (one step per
            // frame: not worth computing for one cut short).
            let want = expected_from(cfg, &c.name, &f.name, size, transports);
            if r.stream != want {
                ok = false;
                format!("checksum MISMATCH (expected {want:#018x})")
            } else {
                "checksum ok".to_string()
            }
        };
        lines.push(format!(
            "{}: received {} of {} from {f} over {c}{}, stream checksum {:#018x}: {verdict}",
            vm.name,
            human(r.bytes),
            human(size),
            rate(r.bytes, secs),
            r.stream
        ));
    }
    ok
}
