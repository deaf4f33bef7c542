//! Shared memory without interrupts: polling send and receive at CPL3 on
//! BAR2 of an ivshmem device, with the ring transport of
//! `intervm_protocol::ring`.
//!
//! The payload lives in guest RAM at `SHMEM_BUF_GPA`: a sender fills a source
//! buffer with the seeded pattern once (untimed) and streams it, wrapping,
//! until it has sent the requested bytes; a receiver lands frames in a
//! destination buffer the same way. Both sides fold every frame checksum
//! into a stream checksum, and the host compares the two.
//!
//! Timing: each sender prepares its payload and sets its ready word to
//! "prepared"; the receiver waits for all of them, starts its clock and sets
//! its own ready word to "go"; senders start when they see it. So the receiver's start-to-last-byte time covers
//! the whole transfer, measured on one clock.

use crate::transfer::{buffer, record, Clock, RoundTimes};
use crate::{arch, arg, fail, pci, set_result, set_state};
use intervm_protocol::ivshmem;
use intervm_protocol::notify::{Idle, Notify, Policy, Side};
use intervm_protocol::probe::{
    results, shmem_args, shmem_frame_bytes, State, EXIT_OK, SHMEM_CORRUPT_HEAD, SHMEM_FORGE,
    SHMEM_HOLD, SHMEM_ZERO_COPY,
};
use intervm_protocol::ring::{
    self, fold, ready_go, Geometry, Liveness, MemberState, RingError, READY_PREPARED,
};

/// Idle polls between liveness checks.
pub(crate) const CHECK_EVERY: u64 = 4096;
/// Failure reason base: `FAIL_BASE + RingError::code()`.
const FAIL_BASE: u64 = 100;

pub(crate) struct Channel {
    pub(crate) dev: pci::Bdf,
    pub(crate) bar0: u64,
    pub(crate) notify: Notify,
    base: u64,
    pub(crate) region: ring::Region,
    pub(crate) geo: Geometry,
    pub(crate) me: u32,
}

impl Channel {
    /// Adaptive notification: poll first, ring only a side that sleeps.
    fn adaptive(&self) -> bool {
        self.notify == Notify::Adaptive
    }
}

/// Finds the device, enables memory decode, and checks the region header.
pub(crate) fn open_channel() -> Result<Channel, u32> {
    let nth = arg(shmem_args::DEVICE_INDEX) as usize;
    let id = ((ivshmem::VENDOR as u32) << 16) | ivshmem::DEVICE as u32;
    let Some(dev) = pci::find_nth(id, nth) else {
        return Err(fail(1, nth as u64));
    };
    let bar = pci::size_bar(dev, ivshmem::SHM_BAR as u8);
    if bar.size < 4096 || bar.addr == 0 {
        return Err(fail(2, bar.size));
    }
    dev.write(0x04, (dev.read(0x04) & 0xffff) | 0x2);
    // SAFETY: BAR2 is decoded at `addr` for `size` bytes and identity
    // mapped by the boot page tables (both MMIO windows are).
    let region = unsafe { ring::Region::new(bar.addr as *mut u8, bar.size) };
    let geo = match region.geometry() {
        Ok(g) => g,
        Err(e) => return Err(ring_fail(e)),
    };
    let me = arg(shmem_args::ME) as u32;
    if me >= geo.members {
        return Err(ring_fail(RingError::BadMember(me)));
    }
    Ok(Channel {
        dev,
        bar0: pci::bar_addr(dev, ivshmem::REGS_BAR as u8),
        notify: Notify::from_probe_flags(arg(shmem_args::FLAGS)),
        base: bar.addr,
        region,
        geo,
        me,
    })
}

pub(crate) fn ring_fail(e: RingError) -> u32 {
    let detail = match e {
        RingError::BadMember(m) | RingError::PeerGone(m) => m as u64,
        RingError::CorruptIndex(v) | RingError::TooLarge(v) => v,
        RingError::CorruptLength(l) => l as u64,
        RingError::BadChecksum { seq } => seq as u64,
        RingError::BadSequence { found, .. } => found as u64,
        RingError::RegionTooSmall { needed, .. } => needed,
        RingError::BadGeometry | RingError::NotInitialized | RingError::NotWritable => 0,
    };
    set_result(results::SHM_ERROR, e.code());
    set_result(results::SHM_ERROR_DETAIL, detail);
    fail(FAIL_BASE + e.code(), detail)
}

/// Waits until `peer` satisfies `ok`, or fails after `JOIN_TIMEOUT_MS`.
/// A peer that is gone ends the wait at once.
pub(crate) fn wait_for(
    ch: &Channel,
    clock: &Clock,
    peer: u32,
    ok: impl Fn(&Channel) -> bool,
) -> Result<(), u32> {
    wait_while_may_return(ch, clock, peer, false, ok)
}

/// Like [`wait_for`], but `peer` may be gone for now (a sender that
/// crashed and is being restarted): only `JOIN_TIMEOUT_MS` ends the wait
/// when `may_return`.
fn wait_while_may_return(
    ch: &Channel,
    clock: &Clock,
    peer: u32,
    may_return: bool,
    ok: impl Fn(&Channel) -> bool,
) -> Result<(), u32> {
    let limit = arg(shmem_args::JOIN_TIMEOUT_MS).max(1);
    let t0 = clock.now_ms();
    loop {
        if ok(ch) {
            return Ok(());
        }
        if (!may_return && ch.region.member_state(&ch.geo, peer) == Ok(MemberState::Gone))
            || clock.now_ms() - t0 > limit
        {
            return Err(ring_fail(RingError::PeerGone(peer)));
        }
        core::hint::spin_loop();
    }
}

/// Waits until sender `peer` is alive and has prepared its payload
/// (`READY_PREPARED`), and returns a watch on the incarnation that did: the
/// watch starts before the wait, and if another incarnation joined during
/// it, the wait is done again for that one. With `may_return`, a sender
/// that is gone for now may come back (see [`wait_while_may_return`]).
fn await_prepared(
    ch: &Channel,
    clock: &Clock,
    peer: u32,
    timeout_ms: u64,
    may_return: bool,
) -> Result<Liveness, u32> {
    loop {
        let live = Liveness::new(&ch.region, &ch.geo, peer, timeout_ms, clock.now_ms());
        wait_while_may_return(ch, clock, peer, may_return, |c| {
            c.region.member_state(&c.geo, peer) == Ok(MemberState::Alive)
                && c.region.ready(&c.geo, peer) == Ok(READY_PREPARED)
        })?;
        // A watch begun before any sender joined follows no incarnation
        // yet: watch again, so that it is the one that prepared.
        if live.is_pinned() && !live.rejoined(&ch.region, &ch.geo) {
            return Ok(live);
        }
    }
}

fn ch_start_tsc() -> u64 {
    // SAFETY: the boot-info page is identity mapped.
    unsafe { core::ptr::read_volatile(&(*crate::info()).results[results::SHM_START_TSC]) }
}

/// Interrupts on MSI-X vector 0, where doorbells arrive.
fn bell_counter() -> &'static core::sync::atomic::AtomicU64 {
    &crate::cpl0::PROBE_IRQ_COUNTS[intervm_protocol::probe::IRQ_VECTOR_BASE as usize]
}

/// Enables MSI-X vector 0 and publishes this member's doorbell ID.
fn listen(ch: &Channel) -> Result<(), u32> {
    listen_on(ch, 1)
}

/// Enables MSI-X vectors `0..vectors` and publishes this member's doorbell
/// ID. Fails when the device has fewer vectors (peers would ring ones that
/// are not there).
pub(crate) fn listen_on(ch: &Channel, vectors: u32) -> Result<(), u32> {
    match pci::enable_msix(ch.dev, vectors, intervm_protocol::probe::IRQ_VECTOR_BASE) {
        None => return Err(fail(5, 0)),
        Some(have) if have < vectors => return Err(fail(10, have as u64)),
        Some(_) => {}
    }
    // Read again until it holds still: a host that rejoined a restarted
    // ivshmem server publishes the new ID itself, and an old one read just
    // before must not overwrite it.
    let mut id = arch::mmio_read32(ch.bar0 + ivshmem::IV_POSITION) as u16;
    loop {
        ch.region
            .set_doorbell_id(&ch.geo, ch.me, id)
            .map_err(ring_fail)?;
        let now = arch::mmio_read32(ch.bar0 + ivshmem::IV_POSITION) as u16;
        if now == id {
            return Ok(());
        }
        id = now;
    }
}

/// The doorbell value that rings member `m` on `vector`, from the ID it
/// published (read at every ring: a member whose ivshmem server restarted
/// has a new one). `PeerGone` when it published none.
pub(crate) fn bell(ch: &Channel, m: u32, vector: u32) -> Result<u32, RingError> {
    match ch.region.doorbell_id(&ch.geo, m) {
        Ok(Some(id)) => Ok(ivshmem::doorbell(id, vector as u16)),
        _ => Err(RingError::PeerGone(m)),
    }
}

/// [`bell`] on vector 0, failing the workload (reason 6) when `m`
/// published no ID.
fn bell_of(ch: &Channel, m: u32) -> Result<u32, u32> {
    bell(ch, m, 0).map_err(|_| fail(6, m as u64))
}

/// Polling budget of adaptive notification, in TSC cycles.
pub(crate) fn spin_cycles(clock: &Clock) -> u64 {
    arg(shmem_args::SPIN_US).max(1) * clock.khz() / 1000
}

/// A cheap pseudo-random delay of up to `JITTER_CYCLES` (stress tests).
fn jitter(state: &mut u64) {
    let max = arg(shmem_args::JITTER_CYCLES);
    if max == 0 {
        return;
    }
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    // Mostly short delays, now and then a long one so that sleeps happen.
    let d = if (*state).is_multiple_of(1024) {
        max
    } else {
        *state % (max / 16 + 1)
    };
    let t0 = arch::rdtsc();
    while arch::rdtsc() - t0 < d {
        core::hint::spin_loop();
    }
}

/// [`intervm_protocol::probe::Workload::ShmemSend`].
pub fn send() -> u32 {
    match try_send() {
        Ok(()) => EXIT_OK,
        Err(code) => code,
    }
}

fn try_send() -> Result<(), u32> {
    let ch = open_channel()?;
    if arg(shmem_args::FLAGS) & SHMEM_FORGE != 0 {
        forge(&ch);
        return Ok(());
    }
    let r = send_on(&ch);
    // The next transfer's start line must not see this one's word.
    let _ = ch.region.set_ready(&ch.geo, ch.me, 0);
    r
}

fn send_on(ch: &Channel) -> Result<(), u32> {
    let clock = Clock::new();
    let peer = arg(shmem_args::PEERS) as u32;
    let bytes = arg(shmem_args::BYTES);
    let mut p = ch.region.producer(ch.geo, ch.me, peer).map_err(ring_fail)?;
    let chunk = shmem_frame_bytes(arg(shmem_args::CHUNK), bytes, p.max_message());
    let src = buffer(bytes, chunk)?;
    let t0 = arch::rdtsc();
    ring::fill_pattern(arg(shmem_args::SEED), 0, src);
    set_result(results::SHM_PREPARE_TSC, arch::rdtsc() - t0);
    let counter = bell_counter();
    let mut seen = counter.load(core::sync::atomic::Ordering::SeqCst);
    if ch.adaptive() {
        // The receiver rings this side when it frees space we sleep for.
        listen(ch)?;
    }
    // A "go" still up from the receiver's previous transfer is not ours:
    // wait until it ended (or the receiver is not there yet).
    wait_for(ch, &clock, peer, |c| c.region.may_prepare_for(&c.geo, peer))?;
    set_state(State::Ready);
    ch.region
        .set_ready(&ch.geo, ch.me, READY_PREPARED)
        .map_err(ring_fail)?;

    let rounds = arg(shmem_args::ROUNDS).max(1);
    let mut policy = Policy::new(ch.notify, Side::Sender, spin_cycles(&clock));
    let (mut rang, mut sleeps, mut rng) = (0u64, 0u64, 0x9e37_79b9_7f4a_7c15u64 ^ ch.me as u64);
    let mut declared = 0u64;
    let mut copy_cycles = 0u64;
    let go = |round| move |c: &Channel| c.region.ready(&c.geo, peer) == Ok(ready_go(round));
    // Watch the receiver incarnation that gave the first start line (a
    // receiver that re-joins per command, like the Linux tool, may join
    // after this sender started).
    wait_for(ch, &clock, peer, go(1))?;
    let mut live = Liveness::new(
        &ch.region,
        &ch.geo,
        peer,
        arg(shmem_args::TIMEOUT_MS),
        clock.now_ms(),
    );
    let (mut total, mut frames, mut stream, mut waits, mut pos) = (0u64, 0u64, 0u64, 0u64, 0usize);
    let corrupt = arg(shmem_args::FLAGS) & SHMEM_CORRUPT_HEAD != 0;
    let zero_copy = arg(shmem_args::FLAGS) & SHMEM_ZERO_COPY != 0;
    for round in 1..=rounds {
        // Start line: the receiver's ready word (seen above for round 1).
        wait_for(ch, &clock, peer, go(round))?;
        if round == 1 {
            let delay = arg(shmem_args::START_DELAY_MS);
            if delay > 0 {
                let t0 = clock.now_ms();
                while clock.now_ms() - t0 < delay {
                    core::hint::spin_loop();
                }
            }
            if arg(shmem_args::FLAGS) & SHMEM_HOLD != 0 {
                // Nothing is sent until the host says so (e.g. once the
                // receiver went to sleep).
                wait_for(ch, &clock, peer, |_| arg(shmem_args::RELEASE) != 0)?;
            }
            set_result(results::SHM_START_TSC, arch::rdtsc());
            if ch.notify.rings() {
                // The receiver published its doorbell ID before its "go"
                // (checked here; read again at every ring).
                bell_of(ch, peer)?;
            }
        }
        let mut sent = 0u64;
        policy.progress();
        while sent < bytes {
            jitter(&mut rng);
            if corrupt && sent >= bytes / 2 {
                return Err(corrupt_head(ch, peer));
            }
            let n = (chunk.min(bytes - sent) as usize).min(src.len() - pos);
            let c0 = arch::rdtsc();
            let attempt = if zero_copy {
                send_in_place(&mut p, &src[pos..pos + n])
            } else {
                p.try_send(&src[pos..pos + n])
            }
            .map_err(ring_fail)?;
            let c1 = arch::rdtsc();
            match attempt {
                Some(sum) => {
                    copy_cycles += c1 - c0;
                    stream = fold(stream, sum);
                    sent += n as u64;
                    frames += 1;
                    pos = (pos + n) % src.len();
                    policy.progress();
                    // Doorbell: peer ID in the high half, vector 0 (adaptive:
                    // only when the receiver declared that it sleeps).
                    if policy.ring_peer(|| p.take_consumer_sleep()) {
                        // Read again at every ring: a receiver whose
                        // ivshmem server restarted has a new ID.
                        let bell = bell_of(ch, peer)?;
                        arch::mmio_write32(ch.bar0 + ivshmem::DOORBELL, bell);
                        rang += 1;
                    }
                }
                None => {
                    waits += 1;
                    if policy.idle(arch::rdtsc()) == Idle::Sleep {
                        // Full for longer than the budget: declare, look
                        // again, then sleep until the receiver frees space
                        // and rings.
                        p.declare_sleep();
                        declared += 1;
                        if p.free().map_err(ring_fail)? < (chunk + 16).next_multiple_of(8) {
                            sleeps += 1;
                            arch::wait_for_interrupt(counter, seen);
                        }
                        seen = counter.load(core::sync::atomic::Ordering::SeqCst);
                        p.awake();
                        policy.progress();
                        live.check(&ch.region, &ch.geo, clock.now_ms())
                            .map_err(ring_fail)?;
                        continue;
                    }
                    if waits.is_multiple_of(CHECK_EVERY) {
                        live.check(&ch.region, &ch.geo, clock.now_ms())
                            .map_err(ring_fail)?;
                    }
                    core::hint::spin_loop();
                }
            }
        }
        total += sent;
    }
    let sent = total;
    let end = arch::rdtsc();
    set_result(results::SHM_END_TSC, end);
    set_result(results::SHM_WAITS, waits);
    set_result(results::SHM_DOORBELLS, rang);
    set_result(results::SHM_SLEEPS, sleeps);
    set_result(results::SHM_DECLARED, declared);
    set_result(
        results::SHM_IRQS,
        counter.load(core::sync::atomic::Ordering::SeqCst),
    );
    set_result(results::SHM_COPY_CYCLES, copy_cycles);
    let start = ch_start_tsc();
    set_result(
        results::SHM_WAIT_CYCLES,
        (end - start).saturating_sub(copy_cycles),
    );
    record(peer, sent, frames, stream, end);
    Ok(())
}

/// Sends `msg` as one frame written straight into the ring
/// ([`SHMEM_ZERO_COPY`]): the payload is stored in the reserved frame and
/// summed there at the commit, instead of summed while the ring copies it.
fn send_in_place(p: &mut ring::Producer, msg: &[u8]) -> Result<Option<u64>, RingError> {
    let Some(mut frame) = p.try_reserve(msg.len())? else {
        return Ok(None);
    };
    // SAFETY: the probe holds the ring's only producer; only stored into.
    let (a, b) = unsafe { frame.pieces_mut() };
    let (m0, m1) = msg.split_at(a.len());
    a.copy_from_slice(m0);
    b.copy_from_slice(m1);
    frame.commit(msg.len()).map(Some)
}

/// Takes the next frame (at most `chunk` bytes) off `c` where it lies,
/// summed in place ([`SHMEM_ZERO_COPY`]): what `try_recv` returns, without
/// the copy.
fn recv_in_place(c: &mut ring::Consumer, chunk: usize) -> Result<Option<(usize, u64)>, RingError> {
    let Some(frame) = c.try_borrow()? else {
        return Ok(None);
    };
    let n = frame.len();
    if n > chunk {
        return Err(RingError::TooLarge(n as u64));
    }
    frame.release().map(|sum| Some((n, sum)))
}

/// What a hostile guest would do: publish a head index the consumer can
/// never have been given.
fn corrupt_head(ch: &Channel, peer: u32) -> u32 {
    let Ok(off) = ch.region.ring_offset(&ch.geo, ch.me, peer) else {
        return fail(4, peer as u64);
    };
    let bad = 0x1234_5670_0000_0008u64;
    // SAFETY: the head word of our own ring, inside the mapped BAR.
    unsafe {
        let p = (ch.base + off + ring::RING_HEAD) as *mut u64;
        core::ptr::write_volatile(p, bad);
    }
    crate::println!("probe: shmem: wrote a corrupt head index {:#x}", bad);
    EXIT_OK
}

/// What a hostile member would do to pairs it is not part of
/// ([`SHMEM_FORGE`]): write a frame a receiver accepts (the next
/// sequence number of a fresh transfer, a right checksum) at the head of
/// every ring between two other members, and publish it. Counts the rings
/// whose head then moved: none where its VMM maps the others' sections
/// read-only.
fn forge(ch: &Channel) {
    let payload = *b"forged!!";
    let mut frame = [0u8; 24];
    frame[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    frame[8..16].copy_from_slice(&ring::checksum(&payload).to_le_bytes());
    frame[16..].copy_from_slice(&payload);
    let (mut tried, mut forged) = (0u64, 0u64);
    for from in (0..ch.geo.members).filter(|&m| m != ch.me) {
        for to in (0..ch.geo.members).filter(|&m| m != ch.me && m != from) {
            let Ok(off) = ch.region.ring_offset(&ch.geo, from, to) else {
                continue;
            };
            let head_at = ch.base + off + ring::RING_HEAD;
            let head = arch::read64(head_at);
            let pos = head & (ch.geo.ring_bytes - 1);
            if pos + frame.len() as u64 > ch.geo.ring_bytes {
                continue;
            }
            let at = ch.base + off + ring::RING_HEADER_BYTES + pos;
            for (i, word) in frame.chunks_exact(8).enumerate() {
                let mut w = [0u8; 8];
                w.copy_from_slice(word);
                arch::write64(at + 8 * i as u64, u64::from_le_bytes(w));
            }
            arch::write64(head_at, head + frame.len() as u64);
            tried += 1;
            if arch::read64(head_at) != head {
                forged += 1;
            }
        }
    }
    set_result(results::SHM_FORGED, forged);
    crate::println!(
        "probe: shmem: forged frames on {} of {} rings of other pairs",
        forged,
        tried
    );
    // Last, the bluntest: format the region afresh, every ring reset.
    match ch.region.init(ch.geo) {
        Ok(()) => crate::println!("probe: shmem: formatting the region: done"),
        Err(e) => {
            set_result(results::SHM_ERROR, e.code());
            crate::println!(
                "probe: shmem: formatting the region: refused (error {})",
                e.code()
            );
        }
    }
}

/// [`intervm_protocol::probe::Workload::ShmemRecv`].
pub fn recv() -> u32 {
    match try_recv() {
        Ok(()) => EXIT_OK,
        Err(code) => code,
    }
}

struct Inbound {
    c: ring::Consumer,
    live: Liveness,
    bytes: u64,
    frames: u64,
    stream: u64,
    last: u64,
}

fn try_recv() -> Result<(), u32> {
    let ch = open_channel()?;
    let r = match arg(shmem_args::TRANSFERS) {
        0 => recv_on(&ch),
        n => serve(&ch, n),
    };
    // The next transfer's start line must not see this one's "go".
    let _ = ch.region.set_ready(&ch.geo, ch.me, 0);
    r
}

fn recv_on(ch: &Channel) -> Result<(), u32> {
    let clock = Clock::new();
    let mask = arg(shmem_args::PEERS) as u32;
    let want = arg(shmem_args::BYTES);
    let timeout = arg(shmem_args::TIMEOUT_MS);
    let mut peers: [Option<Inbound>; ring::MAX_MEMBERS as usize] =
        [const { None }; ring::MAX_MEMBERS as usize];
    for (m, slot) in peers.iter_mut().enumerate() {
        if mask & (1 << m) == 0 {
            continue;
        }
        let c = ch
            .region
            .consumer(ch.geo, m as u32, ch.me)
            .map_err(ring_fail)?;
        *slot = Some(Inbound {
            c,
            live: Liveness::new(&ch.region, &ch.geo, m as u32, timeout, 0),
            bytes: 0,
            frames: 0,
            stream: 0,
            last: 0,
        });
    }
    if ch.notify.rings() {
        listen(ch)?;
    }
    let (chunk, dst) = receive_buffer(ch, want)?;
    for (m, slot) in peers.iter_mut().enumerate() {
        let (m, Some(p)) = (m as u32, slot) else {
            continue;
        };
        // Wait until the sender has prepared its payload, so that only the
        // transfer is timed (a sender that re-joins per command, like the
        // Linux tool, may join after this receiver started).
        p.live = await_prepared(ch, &clock, m, timeout, false)?;
    }
    set_state(State::Ready);
    let now = clock.now_ms();
    for p in peers.iter_mut().flatten() {
        p.live.progressed(now);
        // No sender sends before the "go" below: whatever is in the ring
        // now was left by an earlier, interrupted transfer.
        p.c.drop_stale().map_err(ring_fail)?;
    }
    let rounds = arg(shmem_args::ROUNDS).max(1);
    let start = arch::rdtsc();
    set_result(results::SHM_START_TSC, start);
    let (mut waits, mut times) = (0u64, RoundTimes::new());
    for round in 1..=rounds {
        let t0 = arch::rdtsc();
        ch.region
            .set_ready(&ch.geo, ch.me, ready_go(round))
            .map_err(ring_fail)?;
        let pumped = pump(ch, &clock, &mut peers, dst, chunk, want * round);
        if pumped.is_err() || round == rounds {
            for (m, p) in peers.iter().enumerate() {
                if let Some(p) = p {
                    record(m as u32, p.bytes, p.frames, p.stream, p.last);
                }
            }
        }
        waits += pumped.map_err(ring_fail)?;
        let t1 = peers.iter().flatten().map(|p| p.last).max().unwrap_or(t0);
        times.add(round, t1.saturating_sub(t0));
    }
    times.publish(rounds);
    let end = peers
        .iter()
        .flatten()
        .map(|p| p.last)
        .max()
        .unwrap_or(start);
    set_result(results::SHM_END_TSC, end);
    set_result(results::SHM_WAITS, waits);
    if arg(shmem_args::FLAGS) & intervm_protocol::probe::SHMEM_QUIET == 0 {
        crate::println!(
            "probe: shmem: received {} bytes from each of {} peers",
            want,
            peers.iter().flatten().count()
        );
    }
    Ok(())
}

/// The receive buffer of a transfer of up to `want` bytes a frame: the
/// largest frame accepted (`CHUNK`, but never more than the ring's largest
/// or the probe's buffer: a region of 1 GiB has rings of 512 MiB), and the
/// destination, touched once so that first-touch faults are not timed.
fn receive_buffer(ch: &Channel, want: u64) -> Result<(usize, &'static mut [u8]), u32> {
    let largest = ch
        .geo
        .max_payload()
        .min(intervm_protocol::probe::SHMEM_BUF_MAX);
    let chunk = match arg(shmem_args::CHUNK) {
        0 => largest,
        c => c.clamp(8, largest),
    };
    let dst = buffer(want.max(chunk), chunk)?;
    dst.fill(0);
    Ok((chunk as usize, dst))
}

/// Receives `transfers` complete transfers from the one sender in `PEERS`,
/// which may leave, crash or be restarted (a new VMM joining as the same
/// member) before, between or during them. Each transfer starts afresh:
/// the receiver watches the sender incarnation that is there, waits for
/// its "prepared", drops what an interrupted transfer left in the ring,
/// and says go. A transfer the sender leaves is counted as lost (never as
/// received); one with a ring error or a checksum other than
/// `EXPECT_STREAM` as bad. Fails if any was bad, or if no sender comes
/// back within `JOIN_TIMEOUT_MS`.
fn serve(ch: &Channel, transfers: u64) -> Result<(), u32> {
    let clock = Clock::new();
    let mask = arg(shmem_args::PEERS) as u32;
    if mask.count_ones() != 1 {
        return Err(fail(7, mask as u64));
    }
    let from = mask.trailing_zeros();
    let (want, timeout) = (arg(shmem_args::BYTES), arg(shmem_args::TIMEOUT_MS));
    let expect = arg(shmem_args::EXPECT_STREAM);
    if ch.notify.rings() {
        listen(ch)?;
    }
    let (chunk, dst) = receive_buffer(ch, want)?;
    let mut peers: [Option<Inbound>; ring::MAX_MEMBERS as usize] =
        [const { None }; ring::MAX_MEMBERS as usize];
    let (mut ok, mut lost, mut bad, mut stale) = (0u64, 0u64, 0u64, 0u64);
    set_state(State::Ready);
    while ok < transfers {
        let mut live = await_prepared(ch, &clock, from, timeout, true)?;
        let mut c = ch.region.consumer(ch.geo, from, ch.me).map_err(ring_fail)?;
        stale += c.drop_stale().map_err(ring_fail)?;
        live.progressed(clock.now_ms());
        peers[from as usize] = Some(Inbound {
            c,
            live,
            bytes: 0,
            frames: 0,
            stream: 0,
            last: 0,
        });
        set_result(results::SHM_START_TSC, arch::rdtsc());
        ch.region
            .set_ready(&ch.geo, ch.me, ready_go(1))
            .map_err(ring_fail)?;
        let pumped = pump(ch, &clock, &mut peers, dst, chunk, want);
        let Some(p) = peers[from as usize].take() else {
            return Err(fail(8, from as u64));
        };
        record(from, p.bytes, p.frames, p.stream, p.last);
        let n = ok + lost + bad + 1;
        match pumped {
            Ok(_) if p.bytes == want && p.stream == expect => {
                ok += 1;
                crate::println!(
                    "probe: shmem: transfer {}: {} bytes, checksum ok",
                    n,
                    p.bytes
                );
            }
            Ok(_) => {
                bad += 1;
                crate::println!(
                    "probe: shmem: transfer {}: {} bytes, CHECKSUM {:#x} != {:#x}",
                    n,
                    p.bytes,
                    p.stream,
                    expect
                );
            }
            Err(RingError::PeerGone(_)) => {
                lost += 1;
                crate::println!(
                    "probe: shmem: transfer {}: sender gone after {} of {} bytes",
                    n,
                    p.bytes,
                    want
                );
            }
            Err(e) => {
                bad += 1;
                crate::println!("probe: shmem: transfer {}: ring error {}", n, e.code());
            }
        }
        set_result(results::SHM_TRANSFERS_OK, ok);
        set_result(results::SHM_TRANSFERS_LOST, lost);
        set_result(results::SHM_TRANSFERS_BAD, bad);
        set_result(results::SHM_STALE_BYTES, stale);
        set_result(results::SHM_END_TSC, p.last);
        // End our side of this transfer. A sender that finished ends its
        // side too (or leaves) before the next start line counts. One that
        // died left its "prepared" up (its word is in its section, which
        // only it writes): that lasts until its next incarnation begins,
        // which clears the word before its number changes
        // (`Region::begin_incarnation`), so waiting for the change is
        // waiting for the word to be the new incarnation's.
        ch.region.set_ready(&ch.geo, ch.me, 0).map_err(ring_fail)?;
        let watched = p.live;
        wait_while_may_return(ch, &clock, from, true, |c| {
            c.region.ready(&c.geo, from) != Ok(READY_PREPARED)
                || watched.rejoined(&c.region, &c.geo)
        })?;
    }
    if bad > 0 {
        return Err(fail(9, bad));
    }
    Ok(())
}

/// Polls every inbound ring until each peer delivered `want` bytes.
/// Returns the number of idle polls.
fn pump(
    ch: &Channel,
    clock: &Clock,
    peers: &mut [Option<Inbound>],
    dst: &mut [u8],
    chunk: usize,
    want: u64,
) -> Result<u64, RingError> {
    let (mut pos, mut waits, mut idle) = (0usize, 0u64, 0u64);
    let mut pending = peers.iter().flatten().filter(|p| p.bytes < want).count();
    let counter = bell_counter();
    let mut policy = Policy::new(ch.notify, Side::Receiver, spin_cycles(clock));
    let (mut rang, mut sleeps, mut declared) = (0u64, 0u64, 0u64);
    let mut copy_cycles = 0u64;
    let pump_start = arch::rdtsc();
    let mut rng = 0x2545_f491_4f6c_dd1du64 ^ ch.me as u64;
    let zero_copy = arg(shmem_args::FLAGS) & SHMEM_ZERO_COPY != 0;
    let outcome = loop {
        if pending == 0 {
            break Ok(waits);
        }
        // Interrupts seen before this pass: a doorbell that rings during
        // the pass makes the sleep below return at once (no lost wake-up).
        let seen = counter.load(core::sync::atomic::Ordering::SeqCst);
        let mut got_any = false;
        for p in peers.iter_mut().flatten() {
            if p.bytes >= want {
                continue;
            }
            let out = &mut dst[pos..pos + chunk];
            let c0 = arch::rdtsc();
            let got = if zero_copy {
                recv_in_place(&mut p.c, chunk)?
            } else {
                p.c.try_recv(out)?
            };
            if got.is_some() {
                copy_cycles += arch::rdtsc() - c0;
            }
            match got {
                Some((n, sum)) => {
                    p.bytes += n as u64;
                    p.frames += 1;
                    p.stream = fold(p.stream, sum);
                    p.last = arch::rdtsc();
                    got_any = true;
                    pos += n.next_multiple_of(64);
                    if pos + chunk > dst.len() {
                        pos = 0;
                    }
                    if p.bytes > want {
                        return Err(RingError::TooLarge(p.bytes));
                    }
                    if p.bytes == want {
                        pending -= 1;
                    }
                    // Adaptive: a producer asleep on a full ring has room now.
                    if policy.ring_peer(|| p.c.take_producer_sleep()) {
                        let v = bell(ch, p.c.peer(), 0)?;
                        arch::mmio_write32(ch.bar0 + ivshmem::DOORBELL, v);
                        rang += 1;
                    }
                    jitter(&mut rng);
                }
                None if idle % CHECK_EVERY == CHECK_EVERY - 1 => {
                    if let Err(e) = p.live.check(&ch.region, &ch.geo, clock.now_ms()) {
                        // Frames published before the peer went away still
                        // count: only an empty ring means the data is lost.
                        if p.c.available()? == 0 {
                            return Err(e);
                        }
                    }
                }
                None => {}
            }
        }
        if got_any {
            idle = 0;
            policy.progress();
            continue;
        }
        waits += 1;
        if policy.idle(arch::rdtsc()) == Idle::Poll {
            idle += 1;
            core::hint::spin_loop();
            continue;
        }
        // Look for departed senders before sleeping, not after: `seen`
        // was read before this, and a VMM marks its member gone before
        // it wakes the peers, so a sender that left is either seen gone
        // here or its wake-up ends the sleep below. (Looking only after
        // waking misses a departure that lands between that look and
        // the next pass, and then sleeps for ever.)
        for p in peers.iter_mut().flatten() {
            if p.bytes < want {
                if let Err(e) = p.live.check(&ch.region, &ch.geo, clock.now_ms()) {
                    if p.c.available()? == 0 {
                        return Err(e);
                    }
                }
            }
        }
        // Declare on every ring still expected, look once more, then
        // sleep until a producer rings (an adaptive one only because of
        // the declaration; others ring after every frame).
        if policy.declares() {
            for p in peers.iter().flatten().filter(|p| p.bytes < want) {
                p.c.declare_sleep();
                declared += 1;
            }
        }
        let mut any = false;
        for p in peers.iter().flatten().filter(|p| p.bytes < want) {
            any |= p.c.available()? > 0;
        }
        if !any {
            sleeps += 1;
            // Published before sleeping, for a host waiting for a sleep.
            set_result(results::SHM_SLEEPS, sleeps);
            arch::wait_for_interrupt(counter, seen);
        }
        for p in peers.iter().flatten() {
            p.c.awake();
        }
        policy.progress();
    };
    set_result(results::SHM_DOORBELLS, rang);
    set_result(results::SHM_SLEEPS, sleeps);
    set_result(results::SHM_DECLARED, declared);
    set_result(
        results::SHM_IRQS,
        counter.load(core::sync::atomic::Ordering::SeqCst),
    );
    // Accumulated over the rounds (pump runs once per round).
    set_result(
        results::SHM_COPY_CYCLES,
        crate::result(results::SHM_COPY_CYCLES) + copy_cycles,
    );
    set_result(
        results::SHM_WAIT_CYCLES,
        crate::result(results::SHM_WAIT_CYCLES)
            + (arch::rdtsc() - pump_start).saturating_sub(copy_cycles),
    );
    outcome
}

/// The value a ping-pong side publishes in its ready word for round `n`.
const fn pp_word(n: u64) -> u64 {
    (0x7070 << 48) | n
}

/// [`intervm_protocol::probe::Workload::ShmemPingPong`].
pub fn ping_pong() -> u32 {
    let r = open_channel().and_then(|ch| {
        let r = try_ping_pong(&ch);
        let _ = ch.region.set_ready(&ch.geo, ch.me, 0);
        r
    });
    match r {
        Ok(()) => EXIT_OK,
        Err(code) => code,
    }
}

fn try_ping_pong(ch: &Channel) -> Result<(), u32> {
    use intervm_protocol::probe::{
        SHMEM_PP_COPY, SHMEM_PP_FLOOR_FIRST, SHMEM_PP_INITIATOR, SHMEM_PP_LINE,
    };
    let clock = Clock::new();
    let peer = arg(shmem_args::PEERS) as u32;
    let flags = arg(shmem_args::FLAGS);
    let initiator = flags & SHMEM_PP_INITIATOR != 0;
    let rounds = arg(shmem_args::ROUNDS).max(1);
    let bytes = arg(shmem_args::BYTES).max(1);
    let timeout = arg(shmem_args::TIMEOUT_MS);
    let mut p = ch.region.producer(ch.geo, ch.me, peer).map_err(ring_fail)?;
    let mut c = ch.region.consumer(ch.geo, peer, ch.me).map_err(ring_fail)?;
    if bytes > p.max_message() || bytes > intervm_protocol::probe::SHMEM_BUF_MAX / 2 {
        return Err(ring_fail(RingError::TooLarge(bytes)));
    }
    if ch.notify.rings() {
        listen(ch)?;
    }
    let mut pace = Pace {
        send: Policy::new(ch.notify, Side::Sender, spin_cycles(&clock)),
        wait: Policy::new(ch.notify, Side::Receiver, spin_cycles(&clock)),
        counter: bell_counter(),
        rang: 0,
        sleeps: 0,
    };
    // Two message buffers: what goes out and what comes back.
    let buf = buffer(2 * bytes, bytes)?;
    let (out, back) = buf.split_at_mut(bytes as usize);
    ring::fill_pattern(arg(shmem_args::SEED), 0, out);
    back.fill(0);
    // Start line: each side publishes round 0 once it is ready; nothing
    // is sent before both are, so whatever is in a ring then is stale.
    wait_for(ch, &clock, peer, |c| {
        c.region.member_state(&c.geo, peer) == Ok(MemberState::Alive)
    })?;
    c.drop_stale().map_err(ring_fail)?;
    ch.region
        .set_ready(&ch.geo, ch.me, pp_word(0))
        .map_err(ring_fail)?;
    wait_for(ch, &clock, peer, |c| {
        c.region.ready(&c.geo, peer).is_ok_and(|w| w >= pp_word(0))
    })?;
    let mut live = Liveness::new(&ch.region, &ch.geo, peer, timeout, clock.now_ms());
    // The copy floor's message areas: the start of each side's own ring
    // (unused by the ring protocol until the ring rounds, which overwrite
    // it). Ours is in our section, the peer's readable in its.
    let copy = flags & SHMEM_PP_COPY != 0;
    let data = |from: u32, to: u32| {
        ch.region
            .ring_offset(&ch.geo, from, to)
            .map(|off| (ch.base + off + ring::RING_HEADER_BYTES) as *mut u8)
            .map_err(ring_fail)
    };
    let (mine, theirs) = (data(ch.me, peer)?, data(peer, ch.me)? as *const u8);
    set_state(State::Ready);
    // With SHMEM_PP_FLOOR_FIRST: `rounds` of the floor, then `rounds` of
    // ring messages, in one boot (the host may move the vCPU threads
    // between boots, and the floor moves with them).
    let both = flags & SHMEM_PP_FLOOR_FIRST != 0;
    let all = if both { 2 * rounds } else { rounds };
    let mut times = RoundTimes::new();
    let start = arch::rdtsc();
    set_result(results::SHM_START_TSC, start);
    for round in 1..=all {
        let line = if both {
            round <= rounds
        } else {
            flags & SHMEM_PP_LINE != 0
        };
        let t0 = arch::rdtsc();
        if line {
            // The floor: one word each way, no ring protocol; with `copy`,
            // the message copied out beside it and in after it.
            let put = |msg: &[u8]| {
                // SAFETY: `bytes` fits in a ring (checked above), so the
                // area lies inside our ring's data; `msg` is `out` or
                // `back`, of `bytes` each.
                unsafe { core::ptr::copy_nonoverlapping(msg.as_ptr(), mine, msg.len()) }
            };
            if initiator {
                if copy {
                    put(out);
                }
                ch.region
                    .set_ready(&ch.geo, ch.me, pp_word(round))
                    .map_err(ring_fail)?;
            }
            let mut idle = 0u64;
            while ch.region.ready(&ch.geo, peer) != Ok(pp_word(round)) {
                idle += 1;
                if idle.is_multiple_of(CHECK_EVERY) {
                    live.check(&ch.region, &ch.geo, clock.now_ms())
                        .map_err(ring_fail)?;
                }
                core::hint::spin_loop();
            }
            if copy {
                // SAFETY: as for `put`, in the peer's ring. The peer may
                // write its area meanwhile: these bytes are only timed.
                unsafe { core::ptr::copy_nonoverlapping(theirs, back.as_mut_ptr(), back.len()) };
            }
            if !initiator {
                if copy {
                    put(back);
                }
                ch.region
                    .set_ready(&ch.geo, ch.me, pp_word(round))
                    .map_err(ring_fail)?;
            }
        } else {
            if initiator {
                send_one(ch, &clock, &mut p, &mut live, out, &mut pace)?;
            }
            let (n, _) = recv_one(ch, &clock, &mut c, &mut live, back, &mut pace)?;
            if n != bytes as usize {
                return Err(ring_fail(RingError::CorruptLength(n as u32)));
            }
            if !initiator {
                send_one(ch, &clock, &mut p, &mut live, back, &mut pace)?;
            }
        }
        // The round ends when the echo is in; checking it is not timed,
        // as the floor's check is not: the probe compares byte by byte
        // (`compiler_builtins`), and a 4 KiB compare and clear added
        // about 4 µs to each round (one way 3.6-4.3 µs, now 1.7-1.8 µs).
        times.add(round, arch::rdtsc() - t0);
        // Every ring echo must be what went out, byte for byte; of the
        // copy floor's, the last of its run (the peer may write its area
        // while an earlier one is copied).
        let check = if line {
            copy && (round == rounds || round == all)
        } else {
            true
        };
        if initiator && check {
            if back != &out[..] {
                return Err(ring_fail(RingError::BadChecksum { seq: round as u32 }));
            }
            back.fill(0);
        }
    }
    set_result(results::SHM_END_TSC, arch::rdtsc());
    times.publish(all);
    set_result(results::SHM_WAIT_CYCLES, times.total);
    set_result(results::SHM_DOORBELLS, pace.rang);
    set_result(results::SHM_SLEEPS, pace.sleeps);
    set_result(
        results::SHM_IRQS,
        pace.counter.load(core::sync::atomic::Ordering::SeqCst),
    );
    Ok(())
}

/// How a ping-pong side paces itself on a doorbell channel: when it rings
/// the peer after a message, and when it sleeps instead of polling.
struct Pace {
    send: Policy,
    wait: Policy,
    counter: &'static core::sync::atomic::AtomicU64,
    rang: u64,
    sleeps: u64,
}

/// Sends `msg` as one frame, polling while the ring is full, then rings
/// the peer if `pace` says so.
fn send_one(
    ch: &Channel,
    clock: &Clock,
    p: &mut ring::Producer,
    live: &mut Liveness,
    msg: &[u8],
    pace: &mut Pace,
) -> Result<(), u32> {
    let mut idle = 0u64;
    while p.try_send(msg).map_err(ring_fail)?.is_none() {
        idle += 1;
        if idle.is_multiple_of(CHECK_EVERY) {
            live.check(&ch.region, &ch.geo, clock.now_ms())
                .map_err(ring_fail)?;
        }
        core::hint::spin_loop();
    }
    if pace.send.ring_peer(|| p.take_consumer_sleep()) {
        let v = bell(ch, p.peer(), 0).map_err(ring_fail)?;
        arch::mmio_write32(ch.bar0 + ivshmem::DOORBELL, v);
        pace.rang += 1;
    }
    Ok(())
}

/// Receives one frame into `out`: polls while the ring is empty, and on a
/// doorbell channel, once `pace` says so, declares that it sleeps, looks
/// once more and sleeps until an interrupt (one since the look wakes it at
/// once: no lost wake-up).
fn recv_one(
    ch: &Channel,
    clock: &Clock,
    c: &mut ring::Consumer,
    live: &mut Liveness,
    out: &mut [u8],
    pace: &mut Pace,
) -> Result<(usize, u64), u32> {
    let mut idle = 0u64;
    loop {
        let seen = pace.counter.load(core::sync::atomic::Ordering::SeqCst);
        if let Some(got) = c.try_recv(out).map_err(ring_fail)? {
            pace.wait.progress();
            return Ok(got);
        }
        idle += 1;
        if pace.wait.idle(arch::rdtsc()) == Idle::Poll {
            if idle.is_multiple_of(CHECK_EVERY) {
                live.check(&ch.region, &ch.geo, clock.now_ms())
                    .map_err(ring_fail)?;
            }
            core::hint::spin_loop();
            continue;
        }
        // A peer that left wakes this side after marking itself gone, so
        // looking before the sleep is enough.
        live.check(&ch.region, &ch.geo, clock.now_ms())
            .map_err(ring_fail)?;
        if pace.wait.declares() {
            c.declare_sleep();
        }
        if c.available().map_err(ring_fail)? == 0 {
            pace.sleeps += 1;
            arch::wait_for_interrupt(pace.counter, seen);
        }
        if pace.wait.declares() {
            c.awake();
        }
        pace.wait.progress();
    }
}
