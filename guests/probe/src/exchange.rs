//! All pairs at once ([`Workload::ShmemExchange`]): this member sends to
//! every peer in the mask and receives from each of them, over the rings
//! of one region, in one loop that never blocks on a single peer (a member
//! that sent everything before receiving would deadlock on full rings).
//!
//! Start line: a member prepares its payload, empties its inbound rings of
//! anything an earlier, interrupted transfer left, sets its ready word to
//! [`READY_EXCHANGE`] and waits until every peer shows it too. No peer
//! sends to it before that, and none can have finished (and cleared its
//! word) before this member started, since each needs this member's bytes.
//!
//! Doorbells: with `VECTORS` > 1 each member rings peer `m` on vector
//! `me % VECTORS`, so the vector an interrupt arrives on names the ringer;
//! interrupts are counted per vector. The member sleeps on any of them
//! (`PROBE_IRQ_COUNTS[0]`, which counts them all, so no wake-up is lost
//! between the last look and the sleep).
//!
//! [`Workload::ShmemExchange`]: intervm_protocol::probe::Workload::ShmemExchange

use core::sync::atomic::Ordering;

use crate::shmem::{
    bell, listen_on, open_channel, ring_fail, spin_cycles, wait_for, Channel, CHECK_EVERY,
};
use crate::transfer::{buffer, record, record_at, scratch, Clock};
use crate::{arch, arg, set_result, set_state};
use intervm_protocol::ivshmem;
use intervm_protocol::notify::{Idle, Policy, Side};
use intervm_protocol::probe::{
    results, shmem_args as a, shmem_frame_bytes, State, EXCHANGE_MAX_VECTORS, EXIT_OK,
    IRQ_VECTOR_BASE, SHMEM_QUIET,
};
use intervm_protocol::ring::{self, fold, Liveness, MemberState, RingError, READY_EXCHANGE};

/// One peer of the exchange: the ring to it and the ring from it.
struct Pair {
    peer: u32,
    out: ring::Producer,
    inb: ring::Consumer,
    live: Liveness,
    sent: Tally,
    got: Tally,
    /// Where the next frame to this peer starts in the source buffer.
    pos: usize,
}

/// Bytes, frames, stream checksum and TSC of the last frame, one way.
#[derive(Default)]
struct Tally {
    bytes: u64,
    frames: u64,
    stream: u64,
    last: u64,
}

/// [`intervm_protocol::probe::Workload::ShmemExchange`].
pub fn run() -> u32 {
    let ch = match open_channel() {
        Ok(ch) => ch,
        Err(code) => return code,
    };
    let r = exchange(&ch);
    // Ends this member's start line (every peer has started by now).
    let _ = ch.region.set_ready(&ch.geo, ch.me, 0);
    match r {
        Ok(()) => EXIT_OK,
        Err(code) => code,
    }
}

/// Interrupts taken so far on MSI-X vector `v` of the device.
fn vector_irqs(v: u32) -> u64 {
    crate::cpl0::PROBE_IRQ_COUNTS[(IRQ_VECTOR_BASE as u32 + v) as usize].load(Ordering::SeqCst)
}

fn exchange(ch: &Channel) -> Result<(), u32> {
    let clock = Clock::new();
    let mask = arg(a::PEERS) as u32;
    let bytes = arg(a::BYTES);
    let timeout = arg(a::TIMEOUT_MS);
    if mask == 0 || mask & (1 << ch.me) != 0 || mask >> ch.geo.members != 0 {
        return Err(ring_fail(RingError::BadMember(ch.me)));
    }
    let vectors = arg(a::VECTORS).clamp(1, EXCHANGE_MAX_VECTORS) as u32;
    let mut pairs: [Option<Pair>; ring::MAX_MEMBERS as usize] =
        [const { None }; ring::MAX_MEMBERS as usize];
    for (m, slot) in pairs.iter_mut().enumerate() {
        let m = m as u32;
        if mask & (1 << m) == 0 {
            continue;
        }
        let out = ch.region.producer(ch.geo, ch.me, m).map_err(ring_fail)?;
        let mut inb = ch.region.consumer(ch.geo, m, ch.me).map_err(ring_fail)?;
        // Nobody sends to this member before its READY_EXCHANGE below:
        // whatever is in the ring now an interrupted transfer left.
        inb.drop_stale().map_err(ring_fail)?;
        *slot = Some(Pair {
            peer: m,
            out,
            inb,
            live: Liveness::new(&ch.region, &ch.geo, m, timeout, 0),
            sent: Tally::default(),
            got: Tally::default(),
            pos: 0,
        });
    }
    let chunk = shmem_frame_bytes(arg(a::CHUNK), bytes, ch.geo.max_payload());
    let src = buffer(bytes, chunk)?;
    ring::fill_pattern(arg(a::SEED), 0, src);
    let largest = ch
        .geo
        .max_payload()
        .min(intervm_protocol::probe::SHMEM_BUF_MAX);
    let dst = scratch(src.len(), largest, chunk)?;
    let rings = ch.notify.rings();
    if rings {
        listen_on(ch, vectors)?;
    }
    ch.region
        .set_ready(&ch.geo, ch.me, READY_EXCHANGE)
        .map_err(ring_fail)?;
    set_state(State::Ready);
    for p in pairs.iter().flatten() {
        let m = p.peer;
        wait_for(ch, &clock, m, |c| {
            c.region.member_state(&c.geo, m) == Ok(MemberState::Alive)
                && c.region.ready(&c.geo, m) == Ok(READY_EXCHANGE)
                && (!rings || c.region.doorbell_id(&c.geo, m).is_ok_and(|id| id.is_some()))
        })?;
    }
    let now = clock.now_ms();
    for p in pairs.iter_mut().flatten() {
        p.live = Liveness::new(&ch.region, &ch.geo, p.peer, timeout, now);
    }
    let start = arch::rdtsc();
    set_result(results::SHM_START_TSC, start);
    let mut outcome = pump(
        ch,
        &clock,
        &mut pairs,
        src,
        dst,
        chunk as usize,
        bytes,
        vectors,
    );
    if outcome.is_ok() && rings {
        outcome = last_bells(ch, &clock, &pairs, vectors);
    }
    for p in pairs.iter().flatten() {
        record(p.peer, p.got.bytes, p.got.frames, p.got.stream, p.got.last);
        record_at(
            results::SHM_SENT_FIRST,
            p.peer,
            p.sent.bytes,
            p.sent.frames,
            p.sent.stream,
            p.sent.last,
        );
    }
    for v in 0..vectors {
        set_result(results::SHM_VECTOR_IRQS + v as usize, vector_irqs(v));
    }
    let end = pairs
        .iter()
        .flatten()
        .map(|p| p.got.last.max(p.sent.last))
        .max()
        .unwrap_or(start);
    set_result(results::SHM_END_TSC, end);
    outcome.map_err(ring_fail)?;
    if arg(a::FLAGS) & SHMEM_QUIET == 0 {
        crate::println!(
            "probe: exchange: {} bytes each way with each of {} peers",
            bytes,
            pairs.iter().flatten().count()
        );
    }
    Ok(())
}

/// Moves every byte both ways, polling every ring in turn; sleeps on a
/// doorbell when the policy says so and nothing can move.
#[allow(clippy::too_many_arguments)]
fn pump(
    ch: &Channel,
    clock: &Clock,
    pairs: &mut [Option<Pair>],
    src: &[u8],
    dst: &mut [u8],
    chunk: usize,
    bytes: u64,
    vectors: u32,
) -> Result<(), RingError> {
    let any = &crate::cpl0::PROBE_IRQ_COUNTS[0];
    let my_vector = ch.me % vectors;
    let budget = spin_cycles(clock);
    let mut tx = Policy::new(ch.notify, Side::Sender, budget);
    let mut rx = Policy::new(ch.notify, Side::Receiver, budget);
    let (mut rang, mut sleeps, mut declared, mut idle) = (0u64, 0u64, 0u64, 0u64);
    let ring = |m: u32, rang: &mut u64| -> Result<(), RingError> {
        arch::mmio_write32(ch.bar0 + ivshmem::DOORBELL, bell(ch, m, my_vector)?);
        *rang += 1;
        Ok(())
    };
    let outcome = loop {
        let sending = pairs.iter().flatten().any(|p| p.sent.bytes < bytes);
        let receiving = pairs.iter().flatten().any(|p| p.got.bytes < bytes);
        if !sending && !receiving {
            break Ok(());
        }
        // Read before the pass: a ring during it ends the sleep below.
        let seen = any.load(Ordering::SeqCst);
        let mut moved = false;
        for p in pairs.iter_mut().flatten() {
            if p.sent.bytes < bytes {
                let n = (chunk as u64).min(bytes - p.sent.bytes) as usize;
                let n = n.min(src.len() - p.pos);
                if let Some(sum) = p.out.try_send(&src[p.pos..p.pos + n])? {
                    p.sent.bytes += n as u64;
                    p.sent.frames += 1;
                    p.sent.stream = fold(p.sent.stream, sum);
                    p.sent.last = arch::rdtsc();
                    p.pos = (p.pos + n) % src.len();
                    moved = true;
                    if tx.ring_peer(|| p.out.take_consumer_sleep()) {
                        ring(p.peer, &mut rang)?;
                    }
                }
            }
            if p.got.bytes < bytes {
                if let Some((n, sum)) = p.inb.try_recv(dst)? {
                    p.got.bytes += n as u64;
                    p.got.frames += 1;
                    p.got.stream = fold(p.got.stream, sum);
                    p.got.last = arch::rdtsc();
                    moved = true;
                    if p.got.bytes > bytes {
                        return Err(RingError::TooLarge(p.got.bytes));
                    }
                    // Adaptive: the peer sleeps on its full ring to us.
                    if rx.ring_peer(|| p.inb.take_producer_sleep()) {
                        ring(p.peer, &mut rang)?;
                    }
                }
            }
        }
        if moved {
            idle = 0;
            tx.progress();
            rx.progress();
            continue;
        }
        idle += 1;
        let now = arch::rdtsc();
        // A member with bytes still to send polls while the send policy
        // says so (a full ring is never rung for under `always`); one that
        // only receives follows the receive policy.
        let sleep = (!sending || tx.idle(now) == Idle::Sleep)
            && (!receiving || rx.idle(now) == Idle::Sleep);
        if !sleep {
            if idle.is_multiple_of(CHECK_EVERY) {
                check_peers(ch, clock, pairs, bytes)?;
            }
            core::hint::spin_loop();
            continue;
        }
        // Before sleeping: a peer that left is seen here, or its VMM's
        // wake-up (sent after it marks the member gone) ends the sleep.
        check_peers(ch, clock, pairs, bytes)?;
        let mut ready = false;
        for p in pairs.iter().flatten() {
            if p.sent.bytes < bytes {
                p.out.declare_sleep();
                declared += 1;
            }
            if p.got.bytes < bytes {
                p.inb.declare_sleep();
                declared += 1;
            }
        }
        for p in pairs.iter_mut().flatten() {
            if p.sent.bytes < bytes {
                let next = (chunk as u64).min(bytes - p.sent.bytes);
                let next = next.min((src.len() - p.pos) as u64);
                ready |= p.out.free()? >= ring::frame_bytes(next);
            }
            ready |= p.got.bytes < bytes && p.inb.available()? > 0;
        }
        if !ready {
            sleeps += 1;
            set_result(results::SHM_SLEEPS, sleeps);
            arch::wait_for_interrupt(any, seen);
        }
        for p in pairs.iter().flatten() {
            p.out.awake();
            p.inb.awake();
        }
        tx.progress();
        rx.progress();
    };
    set_result(results::SHM_DOORBELLS, rang);
    set_result(results::SHM_SLEEPS, sleeps);
    set_result(results::SHM_DECLARED, declared);
    set_result(results::SHM_IRQS, any.load(Ordering::SeqCst));
    outcome
}

/// Doorbell channels, once everything moved: rings every peer once more,
/// then waits until each peer's vector (`peer % vectors`) has taken an
/// interrupt, so every member knows its peers' doorbells reach it on their
/// own vectors. Every member rings before it waits, so none waits for one
/// that already left. Polls rather than sleeps: the probe has no timer,
/// and a doorbell on the wrong vector would leave every member asleep, so
/// only polling keeps the deadline (`JOIN_TIMEOUT_MS`). Fails with
/// `PeerGone` naming a peer whose vector did not fire by the deadline.
fn last_bells(
    ch: &Channel,
    clock: &Clock,
    pairs: &[Option<Pair>],
    vectors: u32,
) -> Result<(), RingError> {
    let fired = |m: u32| vector_irqs(m % vectors) > 0;
    for p in pairs.iter().flatten() {
        let v = bell(ch, p.peer, ch.me % vectors)?;
        arch::mmio_write32(ch.bar0 + ivshmem::DOORBELL, v);
    }
    let t0 = clock.now_ms();
    let mut polls = 0u64;
    loop {
        let Some(p) = pairs.iter().flatten().find(|p| !fired(p.peer)) else {
            return Ok(());
        };
        polls += 1;
        // Not ended by the peer leaving: it leaves once it has our last
        // doorbell, maybe before its own reached us.
        if polls.is_multiple_of(CHECK_EVERY) && clock.now_ms() - t0 > arg(a::JOIN_TIMEOUT_MS).max(1)
        {
            crate::println!(
                "probe: exchange: no doorbell from member {} on vector {}",
                p.peer,
                p.peer % vectors
            );
            return Err(RingError::PeerGone(p.peer));
        }
        core::hint::spin_loop();
    }
}

/// Fails with `PeerGone` for a peer that left with bytes still to come
/// from it (and none in its ring) or still to go to it.
fn check_peers(
    ch: &Channel,
    clock: &Clock,
    pairs: &mut [Option<Pair>],
    bytes: u64,
) -> Result<(), RingError> {
    let now = clock.now_ms();
    for p in pairs.iter_mut().flatten() {
        if p.sent.bytes >= bytes && p.got.bytes >= bytes {
            continue;
        }
        if let Err(e) = p.live.check(&ch.region, &ch.geo, now) {
            // Frames the peer published before it left still count.
            if p.sent.bytes < bytes || p.inb.available()? == 0 {
                return Err(e);
            }
        }
    }
    Ok(())
}
