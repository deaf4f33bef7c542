//! The port-I/O channel at CPL3: send and receive through the device's
//! registers (`intervm_protocol::portio`), in port mode (any width, with or
//! without `rep`) or descriptor mode.
//!
//! Start line: the receiver starts its clock and sends a one-byte "go"
//! message to each sender; a sender starts when it has it. The receiver's
//! clock therefore covers the whole transfer.

use crate::transfer::{buffer, record, Clock, RoundTimes};
use crate::{arch, arg, fail, set_result, set_state};
use intervm_protocol::portio::*;
use intervm_protocol::probe::{
    portio_args as a, results, shmem_frame_bytes, State, EXIT_OK, PORTIO_MODE_DESCRIPTOR,
};
use intervm_protocol::ring::{checksum, fold, MAX_MEMBERS};

/// Failure reason base: `FAIL_BASE + R_*` result code.
const FAIL_BASE: u64 = 300;

struct Dev {
    base: u16,
}

impl Dev {
    fn rd(&self, reg: u16) -> u32 {
        arch::inl(self.base + reg)
    }
    fn wr(&self, reg: u16, v: u32) {
        arch::outl(self.base + reg, v)
    }
    fn command(&self, c: u32) -> u32 {
        self.wr(CONTROL, c);
        self.rd(RESULT)
    }
    fn select(&self, peer: u32) -> Result<(), u32> {
        self.wr(PEER, peer);
        match self.rd(RESULT) {
            R_OK => Ok(()),
            r => Err(port_fail(r, peer as u64)),
        }
    }
    fn set_desc(&self, addr: u64, len: u32) {
        self.wr(DESC_ADDR_LO, addr as u32);
        self.wr(DESC_ADDR_HI, (addr >> 32) as u32);
        self.wr(DESC_LEN, len);
    }

    /// Writes `msg` to the data register, `width` bytes per access.
    fn put(&self, msg: &[u8], width: usize, rep: bool) {
        let port = self.base + DATA;
        let whole = msg.len() / width * width;
        if rep {
            arch::rep_outs(port, &msg[..whole], width);
        } else {
            for c in msg[..whole].chunks_exact(width) {
                match width {
                    1 => arch::outb(port, c[0]),
                    2 => arch::outw(port, u16::from_le_bytes([c[0], c[1]])),
                    _ => arch::outl(port, u32::from_le_bytes([c[0], c[1], c[2], c[3]])),
                }
            }
        }
        for &b in &msg[whole..] {
            arch::outb(port, b);
        }
    }

    /// Reads `dst.len()` bytes from the data register.
    fn get(&self, dst: &mut [u8], width: usize, rep: bool) {
        let port = self.base + DATA;
        let whole = dst.len() / width * width;
        if rep {
            arch::rep_ins(port, &mut dst[..whole], width);
        } else {
            for c in dst[..whole].chunks_exact_mut(width) {
                match width {
                    1 => c[0] = arch::inb(port),
                    2 => c.copy_from_slice(&arch::inw(port).to_le_bytes()),
                    _ => c.copy_from_slice(&arch::inl(port).to_le_bytes()),
                }
            }
        }
        for b in &mut dst[whole..] {
            *b = arch::inb(port);
        }
    }
}

fn port_fail(r: u32, detail: u64) -> u32 {
    set_result(results::SHM_ERROR, r as u64);
    set_result(results::SHM_ERROR_DETAIL, detail);
    fail(FAIL_BASE + r as u64, detail)
}

fn width() -> usize {
    match arg(a::WIDTH) {
        1 => 1,
        2 => 2,
        _ => 4,
    }
}

/// Polls until `peer` is gone-with-nothing-left or `ok` holds; gives up
/// after `limit_ms` with [`R_PEER_GONE`].
fn wait(
    dev: &Dev,
    clock: &Clock,
    limit_ms: u64,
    mut ok: impl FnMut(&Dev) -> bool,
) -> Result<(), u32> {
    let t0 = clock.now_ms();
    loop {
        if ok(dev) {
            return Ok(());
        }
        if clock.now_ms() - t0 > limit_ms {
            return Err(port_fail(R_PEER_GONE, dev.rd(PEER) as u64));
        }
    }
}

/// [`intervm_protocol::probe::Workload::PortioSend`].
pub fn send() -> u32 {
    match try_send() {
        Ok(()) => EXIT_OK,
        Err(code) => code,
    }
}

fn try_send() -> Result<(), u32> {
    let dev = Dev {
        base: arg(a::BASE) as u16,
    };
    let clock = Clock::new();
    let peer = arg(a::PEERS) as u32;
    let bytes = arg(a::BYTES);
    let max = dev.rd(MAX_MESSAGE) as u64;
    let msg_len = shmem_frame_bytes(arg(a::MESSAGE), bytes, max);
    let (desc, w, rep) = (
        arg(a::MODE) == PORTIO_MODE_DESCRIPTOR,
        width(),
        arg(a::REP) == 1,
    );
    dev.select(peer)?;
    let src = buffer(bytes, msg_len)?;
    intervm_protocol::ring::fill_pattern(arg(a::SEED), 0, src);
    set_state(State::Ready);
    // The receiver's "go".
    wait(&dev, &clock, arg(a::JOIN_TIMEOUT_MS), |d| d.rd(RX_LEN) > 0)?;
    dev.command(C_DISCARD_RX);
    set_result(results::SHM_START_TSC, arch::rdtsc());
    let timeout = arg(a::TIMEOUT_MS);
    let (mut sent, mut msgs, mut stream, mut waits, mut pos) = (0u64, 0u64, 0u64, 0u64, 0usize);
    while sent < bytes {
        let n = (msg_len.min(bytes - sent) as usize).min(src.len() - pos);
        let msg = &src[pos..pos + n];
        let cmd = if desc {
            dev.set_desc(msg.as_ptr() as u64, n as u32);
            C_SEND_DESC
        } else {
            dev.put(msg, w, rep);
            C_SEND
        };
        let t0 = clock.now_ms();
        loop {
            match dev.command(cmd) {
                R_OK => break,
                R_WOULD_BLOCK => {
                    waits += 1;
                    if dev.rd(STATUS) & S_PEER_GONE != 0
                        || clock.now_ms() - t0 > timeout.max(1) * 30
                    {
                        return Err(port_fail(R_PEER_GONE, peer as u64));
                    }
                }
                r => return Err(port_fail(r, sent)),
            }
        }
        stream = fold(stream, checksum(msg));
        sent += n as u64;
        msgs += 1;
        pos = (pos + n) % src.len();
    }
    let end = arch::rdtsc();
    set_result(results::SHM_END_TSC, end);
    set_result(results::SHM_WAITS, waits);
    record(peer, sent, msgs, stream, end);
    Ok(())
}

/// [`intervm_protocol::probe::Workload::PortioRecv`].
pub fn recv() -> u32 {
    match try_recv() {
        Ok(()) => EXIT_OK,
        Err(code) => code,
    }
}

#[derive(Clone, Copy, Default)]
struct Inbound {
    bytes: u64,
    msgs: u64,
    stream: u64,
    last: u64,
}

/// How a receive moves bytes: descriptor mode, or port mode with this
/// width and `rep`.
#[derive(Clone, Copy)]
struct Access {
    desc: bool,
    width: usize,
    rep: bool,
}

impl Access {
    fn from_args() -> Self {
        Self {
            desc: arg(a::MODE) == PORTIO_MODE_DESCRIPTOR,
            width: width(),
            rep: arg(a::REP) == 1,
        }
    }
}

/// Why [`pump`] stopped early.
enum Stop {
    /// This sender is gone (or another incarnation replaced it).
    Gone(u32),
    /// Any other failure (a `fail` code, already recorded).
    Failed(u32),
}

fn try_recv() -> Result<(), u32> {
    let dev = Dev {
        base: arg(a::BASE) as u16,
    };
    let clock = Clock::new();
    let mask = arg(a::PEERS) as u32;
    let want = arg(a::BYTES);
    let max = dev.rd(MAX_MESSAGE) as u64;
    let how = Access::from_args();
    let dst = buffer(max.max(4096), max.max(1))?;
    dst.fill(0);
    if arg(a::TRANSFERS) > 0 {
        return serve(&dev, &clock, mask, dst, how);
    }
    let mut peers = [None::<Inbound>; MAX_MEMBERS as usize];
    for (m, p) in peers.iter_mut().enumerate() {
        if mask & (1 << m) != 0 {
            *p = Some(Inbound::default());
        }
    }
    // Wait for every sender to be present, then start the clock and send
    // each its "go".
    for m in 0..MAX_MEMBERS {
        if peers[m as usize].is_some() {
            dev.select(m)?;
            wait(&dev, &clock, arg(a::JOIN_TIMEOUT_MS), |d| {
                d.rd(STATUS) & S_PEER_PRESENT != 0
            })?;
        }
    }
    set_state(State::Ready);
    let start = arch::rdtsc();
    set_result(results::SHM_START_TSC, start);
    for m in 0..MAX_MEMBERS {
        if peers[m as usize].is_some() {
            dev.select(m)?;
            dev.put(&[1], 1, false);
            match dev.command(C_SEND) {
                R_OK => {}
                r => return Err(port_fail(r, m as u64)),
            }
        }
    }
    let outcome = pump(&dev, &clock, &mut peers, dst, want, how, false);
    for (m, p) in peers.iter().enumerate() {
        if let Some(p) = p {
            record(m as u32, p.bytes, p.msgs, p.stream, p.last);
        }
    }
    let waits = outcome.map_err(|s| match s {
        Stop::Gone(m) => port_fail(R_PEER_GONE, m as u64),
        Stop::Failed(code) => code,
    })?;
    let end = peers
        .iter()
        .flatten()
        .map(|p| p.last)
        .max()
        .unwrap_or(start);
    set_result(results::SHM_END_TSC, end);
    set_result(results::SHM_WAITS, waits);
    crate::println!(
        "probe: portio: received {} bytes from each of {} peers",
        want,
        peers.iter().flatten().count()
    );
    Ok(())
}

/// Receives `transfers` complete transfers from the one sender in `mask`,
/// which may be killed and restarted (a new VMM joining as the same member)
/// before, between or during them. Each starts afresh: the receiver
/// accepts the sender's incarnation that is there (`C_ACCEPT_PEER`, which
/// drops what an earlier one left), waits until it is present, and says
/// go. A transfer its sender leaves is counted as lost (never as received;
/// a sender that leaves before its first message cut nothing);
/// one with a checksum other than `EXPECT_STREAM` as bad. Fails if any was
/// bad, or if no sender is there within `JOIN_TIMEOUT_MS`.
fn serve(dev: &Dev, clock: &Clock, mask: u32, dst: &mut [u8], how: Access) -> Result<(), u32> {
    if mask.count_ones() != 1 {
        return Err(port_fail(R_BAD_PEER, mask as u64));
    }
    let from = mask.trailing_zeros();
    let (want, transfers) = (arg(a::BYTES), arg(a::TRANSFERS));
    let expect = arg(a::EXPECT_STREAM);
    let (mut ok, mut lost, mut bad) = (0u64, 0u64, 0u64);
    dev.select(from)?;
    set_state(State::Ready);
    while ok < transfers {
        wait(dev, clock, arg(a::JOIN_TIMEOUT_MS), |d| {
            let s = d.rd(STATUS);
            if s & S_PEER_NEW != 0 {
                d.command(C_ACCEPT_PEER);
            }
            s & S_PEER_PRESENT != 0
        })?;
        let mut peers = [None::<Inbound>; MAX_MEMBERS as usize];
        peers[from as usize] = Some(Inbound::default());
        set_result(results::SHM_START_TSC, arch::rdtsc());
        dev.put(&[1], 1, false);
        let outcome = match dev.command(C_SEND) {
            R_OK => pump(dev, clock, &mut peers, dst, want, how, true).map(|_| ()),
            R_PEER_GONE => Err(Stop::Gone(from)),
            r => return Err(port_fail(r, from as u64)),
        };
        let p = peers[from as usize].unwrap_or_default();
        record(from, p.bytes, p.msgs, p.stream, p.last);
        let n = ok + lost + bad + 1;
        match outcome {
            Ok(()) if p.stream == expect => {
                ok += 1;
                crate::println!(
                    "probe: portio: transfer {}: {} bytes, checksum ok",
                    n,
                    p.bytes
                );
            }
            Ok(()) => {
                bad += 1;
                crate::println!(
                    "probe: portio: transfer {}: {} bytes, CHECKSUM {:#x} != {:#x}",
                    n,
                    p.bytes,
                    p.stream,
                    expect
                );
            }
            Err(Stop::Gone(_)) if p.msgs == 0 => {
                // An incarnation that was there when the go went out but
                // left without sending (one that had finished the
                // transfer before): no transfer was cut.
                crate::println!("probe: portio: sender left before sending; waiting for the next");
            }
            Err(Stop::Gone(_)) => {
                lost += 1;
                crate::println!(
                    "probe: portio: transfer {}: sender gone after {} of {} bytes",
                    n,
                    p.bytes,
                    want
                );
            }
            Err(Stop::Failed(code)) => return Err(code),
        }
        set_result(results::SHM_TRANSFERS_OK, ok);
        set_result(results::SHM_TRANSFERS_LOST, lost);
        set_result(results::SHM_TRANSFERS_BAD, bad);
        set_result(results::SHM_END_TSC, p.last);
    }
    if bad > 0 {
        return Err(fail(FAIL_BASE + R_BROKEN as u64, bad));
    }
    Ok(())
}

/// Receives from every sender in `peers` until each delivered `want`
/// bytes. A sender is gone when the device says so after `TIMEOUT_MS`
/// without a message (its heartbeat may only be late), or at once when a
/// new incarnation replaced it and `restarts` (a serving receiver).
/// Returns the number of idle polls.
fn pump(
    dev: &Dev,
    clock: &Clock,
    peers: &mut [Option<Inbound>],
    dst: &mut [u8],
    want: u64,
    how: Access,
    restarts: bool,
) -> Result<u64, Stop> {
    let Access {
        desc,
        width: w,
        rep,
    } = how;
    let timeout = arg(a::TIMEOUT_MS).max(1);
    let mut pending = peers.iter().flatten().count();
    let (mut waits, mut idle_since) = (0u64, clock.now_ms());
    while pending > 0 {
        let n = dev.rd(RX_LEN) as usize;
        if n == 0 {
            waits += 1;
            let quiet = clock.now_ms() - idle_since > timeout;
            if waits.is_multiple_of(64) && (quiet || restarts) {
                // Nothing for a while (or, serving, a restart shows at
                // once): is a sender we still wait for gone?
                let mark = if quiet { S_PEER_GONE } else { S_PEER_NEW };
                for (m, p) in peers.iter().enumerate() {
                    if p.is_some_and(|p| p.bytes < want) {
                        dev.select(m as u32).map_err(Stop::Failed)?;
                        if dev.rd(STATUS) & (mark | S_RX_READY) == mark {
                            return Err(Stop::Gone(m as u32));
                        }
                    }
                }
                if quiet {
                    idle_since = clock.now_ms();
                }
            }
            continue;
        }
        let from = dev.rd(RX_FROM) as usize;
        if n > dst.len() {
            return Err(Stop::Failed(port_fail(R_TOO_LARGE, n as u64)));
        }
        let msg = &mut dst[..n];
        if desc {
            dev.set_desc(msg.as_ptr() as u64, n as u32);
            match dev.command(C_RECV_DESC) {
                R_OK => {}
                r => return Err(Stop::Failed(port_fail(r, from as u64))),
            }
        } else {
            dev.get(msg, w, rep);
        }
        let Some(Some(p)) = peers.get_mut(from) else {
            return Err(Stop::Failed(port_fail(R_BAD_PEER, from as u64)));
        };
        p.bytes += n as u64;
        p.msgs += 1;
        p.stream = fold(p.stream, checksum(msg));
        p.last = arch::rdtsc();
        if p.bytes == want {
            pending -= 1;
        } else if p.bytes > want {
            return Err(Stop::Failed(port_fail(R_TOO_LARGE, p.bytes)));
        }
        idle_since = clock.now_ms();
    }
    Ok(waits)
}

/// [`intervm_protocol::probe::Workload::PortioPingPong`].
pub fn ping_pong() -> u32 {
    match try_ping_pong() {
        Ok(()) => EXIT_OK,
        Err(code) => code,
    }
}

/// One buffer holds the message both ways, and its descriptor is written
/// once: a round trip costs each side a send (`CONTROL`, `RESULT`), the
/// `RX_LEN` polls until the message is there, and a receive (`CONTROL`,
/// `RESULT`), each an exit.
fn try_ping_pong() -> Result<(), u32> {
    let dev = Dev {
        base: arg(a::BASE) as u16,
    };
    let clock = Clock::new();
    let peer = arg(a::PEERS) as u32;
    let bytes = arg(a::BYTES).max(1);
    let rounds = arg(a::ROUNDS).max(1);
    let initiator = arg(a::INITIATOR) == 1;
    if bytes > dev.rd(MAX_MESSAGE) as u64 {
        return Err(port_fail(R_TOO_LARGE, bytes));
    }
    let buf = buffer(2 * bytes, bytes)?;
    let (msg, want) = buf.split_at_mut(bytes as usize);
    intervm_protocol::ring::fill_pattern(arg(a::SEED), 0, want);
    dev.select(peer)?;
    wait(&dev, &clock, arg(a::JOIN_TIMEOUT_MS), |d| {
        d.rd(STATUS) & S_PEER_PRESENT != 0
    })?;
    dev.set_desc(msg.as_ptr() as u64, bytes as u32);
    set_state(State::Ready);
    let mut times = RoundTimes::new();
    set_result(results::SHM_START_TSC, arch::rdtsc());
    for round in 1..=rounds {
        let t0 = arch::rdtsc();
        if initiator {
            msg.copy_from_slice(want);
            echo_send(&dev, peer)?;
        }
        echo_recv(&dev, &clock, peer, bytes)?;
        if !initiator {
            echo_send(&dev, peer)?;
        }
        // The round ends when the echo is in; its check is not timed
        // (see the shared-memory ping-pong).
        times.add(round, arch::rdtsc() - t0);
        if initiator && msg != &want[..] {
            return Err(port_fail(R_BROKEN, round));
        }
    }
    set_result(results::SHM_END_TSC, arch::rdtsc());
    times.publish(rounds);
    set_result(results::SHM_WAIT_CYCLES, times.total);
    Ok(())
}

/// Sends the descriptor buffer, again while the peer's queue is full.
fn echo_send(dev: &Dev, peer: u32) -> Result<(), u32> {
    loop {
        match dev.command(C_SEND_DESC) {
            R_OK => return Ok(()),
            R_WOULD_BLOCK => {
                if dev.rd(STATUS) & S_PEER_GONE != 0 {
                    return Err(port_fail(R_PEER_GONE, peer as u64));
                }
            }
            r => return Err(port_fail(r, peer as u64)),
        }
    }
}

/// Waits for a message of `bytes` and receives it into the descriptor
/// buffer; a peer gone for `TIMEOUT_MS` with nothing waiting fails.
fn echo_recv(dev: &Dev, clock: &Clock, peer: u32, bytes: u64) -> Result<(), u32> {
    let timeout = arg(a::TIMEOUT_MS).max(1);
    let (mut polls, mut since) = (0u64, clock.now_ms());
    loop {
        match dev.rd(RX_LEN) as u64 {
            0 => {
                polls += 1;
                if polls.is_multiple_of(64) && clock.now_ms() - since > timeout {
                    if dev.rd(STATUS) & (S_PEER_GONE | S_RX_READY) == S_PEER_GONE {
                        return Err(port_fail(R_PEER_GONE, peer as u64));
                    }
                    since = clock.now_ms();
                }
            }
            n if n == bytes => {
                return match dev.command(C_RECV_DESC) {
                    R_OK => Ok(()),
                    r => Err(port_fail(r, peer as u64)),
                }
            }
            n => return Err(port_fail(R_TOO_LARGE, n)),
        }
    }
}
