//! Generations: starting one ring again when one of its ends restarts,
//! without a frame of one incarnation ever read as part of another's.
//!
//! A host-side user of the rings whose two ends live in different
//! processes (the port-I/O channel's VMMs) cannot use the guests' "go"
//! start line. It uses these instead. Each end is a *generation*: its
//! member's incarnation.
//!
//! - A producer that starts [announces](Producer::announce) itself: its
//!   frames' sequence numbers then carry its generation's *tag* (the low
//!   16 bits of the generation) in their top 16 bits, and count from 0 in
//!   the low 16. Every frame says which generation wrote it.
//! - A consumer [follows](Consumer::follow) its producer: it reads frames
//!   of the generation it reads; at the first frame of another one it
//!   switches if its user accepted that generation (sequence numbers
//!   restart there), and holds (reads nothing) otherwise. Accepting a
//!   generation drops the unread frames of the others before it
//!   ([`Consumer::drop_other_generations`]).
//! - A consumer that starts again cannot know which of the frames in the
//!   ring were sent to it rather than to the incarnation before it, nor
//!   their sequence numbers: it [requests](Consumer::request_sync) a *sync
//!   point*, which the producer [answers](Producer::answer_sync) once its
//!   user accepted the new consumer: its current head and sequence number.
//!   The consumer starts there; frames before it were for the one before.
//!   A consumer of a member's first incarnation starts at the ring's start
//!   and needs none.
//!
//! The sync point is written under a sequence counter (odd while being
//! written) in the producer's head line; the request is in the consumer's
//! tail line. Nothing read is trusted: a sync point off the frame grid, or
//! a frame of an accepted generation that does not start it, is an error.
//! Producers that never announce themselves (the guests') number frames
//! from 0 through all 32 bits, as before.

use core::sync::atomic::{fence, AtomicU64, Ordering};

use super::spsc::RingRef;
use super::{frame_bytes, Consumer, Producer, RingError, FRAME_HEADER_BYTES, RING_HEAD, RING_TAIL};

/// Sync point: write counter (odd while it is being written).
pub(super) const SYNC_COUNT: u64 = RING_HEAD + 8;
/// Sync point: stream position.
pub(super) const SYNC_AT: u64 = RING_HEAD + 16;
/// Sync point: sequence number of the frame there.
pub(super) const SYNC_SEQ: u64 = RING_HEAD + 24;
/// Sync point: the producer's generation.
pub(super) const SYNC_GEN: u64 = RING_HEAD + 32;
/// Sync point: the consumer request it answers.
pub(super) const SYNC_ACK: u64 = RING_HEAD + 40;
/// Consumer: its latest sync request (its generation), in its tail line.
pub(super) const SYNC_REQ: u64 = RING_TAIL + 8;

/// Reads of a sync point that found it being written before giving up for
/// now (a writer that died mid-write leaves the counter odd; the reader
/// then treats the point as not there yet, and the peer as not answering).
const SYNC_READ_TRIES: u32 = 64;

/// The tag generation `gen` puts in its frames' sequence numbers.
pub const fn tag(gen: u64) -> u32 {
    (gen as u32) << 16
}

/// The sequence number after `seq` for a producer or consumer of
/// generation `gen`: within the generation's tag, or through all 32 bits
/// without one (0).
pub(super) const fn next_seq(seq: u32, gen: u64) -> u32 {
    if gen == 0 {
        seq.wrapping_add(1)
    } else {
        (seq & 0xffff_0000) | (seq.wrapping_add(1) & 0xffff)
    }
}

/// Where a restarted consumer's frames begin.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyncPoint {
    /// Stream position of the first frame.
    pub at: u64,
    /// Its sequence number.
    pub seq: u32,
    /// The producer's generation.
    pub gen: u64,
    /// The consumer request it answers.
    pub ack: u64,
}

impl RingRef {
    /// A word of the producer's head line.
    fn word(&self, off: u64) -> &AtomicU64 {
        self.region.u64_at(self.off + off)
    }

    /// The consumer's sync request, in its tail line.
    fn request(&self) -> &AtomicU64 {
        self.region.u64_at(self.cons + SYNC_REQ)
    }

    fn publish_sync(&self, p: SyncPoint) {
        let count = self.word(SYNC_COUNT);
        let c = count.load(Ordering::Relaxed);
        count.store(c | 1, Ordering::Relaxed);
        fence(Ordering::Release);
        self.word(SYNC_AT).store(p.at, Ordering::Relaxed);
        self.word(SYNC_SEQ).store(p.seq as u64, Ordering::Relaxed);
        self.word(SYNC_GEN).store(p.gen, Ordering::Relaxed);
        self.word(SYNC_ACK).store(p.ack, Ordering::Relaxed);
        count.store((c | 1).wrapping_add(1), Ordering::Release);
    }

    fn read_sync(&self) -> Option<SyncPoint> {
        let count = self.word(SYNC_COUNT);
        for _ in 0..SYNC_READ_TRIES {
            let c0 = count.load(Ordering::Acquire);
            if c0 & 1 == 1 {
                core::hint::spin_loop();
                continue;
            }
            let p = SyncPoint {
                at: self.word(SYNC_AT).load(Ordering::Relaxed),
                seq: self.word(SYNC_SEQ).load(Ordering::Relaxed) as u32,
                gen: self.word(SYNC_GEN).load(Ordering::Relaxed),
                ack: self.word(SYNC_ACK).load(Ordering::Relaxed),
            };
            fence(Ordering::Acquire);
            if count.load(Ordering::Relaxed) == c0 {
                return Some(p);
            }
        }
        None
    }
}

impl Producer {
    /// Starts this producer as generation `gen` (non-zero; its member's
    /// incarnation): its frames carry the generation's tag from now on,
    /// counting from 0, and a sync point at its head answers a consumer
    /// request pending from before (a fresh producer has nothing in
    /// flight that a new consumer could mistake for its own).
    pub fn announce(&mut self, gen: u64) {
        self.gen = gen.max(1);
        self.seq = tag(self.gen);
        self.answered = self.ring.request().load(Ordering::Acquire);
        self.publish_sync_point();
    }

    fn publish_sync_point(&self) {
        self.ring.publish_sync(SyncPoint {
            at: self.head,
            seq: self.seq,
            gen: self.gen,
            ack: self.answered,
        });
    }

    /// Answers the consumer's sync request if one came since the last
    /// answer (a consumer that started again, as generation `id`) and
    /// `accept(id)` says yes: frames sent before the answer are not that
    /// consumer's. Returns whether it answered. Call it before sending; a
    /// producer that never announced itself answers nothing.
    pub fn answer_sync(&mut self, accept: impl FnOnce(u64) -> bool) -> bool {
        if self.gen == 0 {
            return false;
        }
        let req = self.ring.request().load(Ordering::Acquire);
        if req == self.answered || req == 0 || !accept(req) {
            return false;
        }
        self.answered = req;
        self.publish_sync_point();
        true
    }
}

/// Whether a frame tagged `held` (a [`Follow::Held`] value: the low 16
/// bits of its generation) was written by an incarnation before `gen`.
/// Incarnations count up by one per join, so the tags compare modulo
/// 2^16: up to 32,767 incarnations back count as before.
pub fn precedes(held: u32, gen: u64) -> bool {
    let behind = (gen as u16).wrapping_sub(held as u16);
    behind != 0 && behind < 0x8000
}

/// What [`Consumer::follow`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Follow {
    /// The next frame, if any, is of the generation being read.
    Ready,
    /// The consumer now reads generation `.0` (its first, or a new one).
    Switched(u64),
    /// The next frame starts a generation (its tag `.0`) not accepted:
    /// nothing is read.
    Held(u32),
    /// This consumer's sync request has no answer yet: nothing is read.
    Waiting,
}

impl Consumer {
    /// Starts this consumer again, as generation `id` (non-zero; its
    /// member's incarnation), from a point the producer names: until the
    /// producer answers ([`Producer::answer_sync`]), [`Consumer::follow`]
    /// says [`Follow::Waiting`] and nothing may be read.
    pub fn request_sync(&mut self, id: u64) {
        let id = id.max(1);
        self.ring.request().store(id, Ordering::Release);
        self.waiting = Some(id);
    }

    /// The producer generation this consumer reads (0: none yet).
    pub fn generation(&self) -> u64 {
        self.gen
    }

    /// The sequence number of the next frame, if one is there.
    fn next_frame_seq(&self) -> Result<Option<u32>, RingError> {
        if self.available()? < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let mut hdr = [0u8; 8];
        self.ring.read_at(self.tail, &mut hdr);
        Ok(Some(u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]])))
    }

    /// Looks before reading, for a user that accepted producer generation
    /// `accepted` (0: none yet): takes the answer to a sync request, and
    /// switches to `accepted` at its first frame. Read with
    /// [`Consumer::try_recv`] only after `Ready` or `Switched`.
    pub fn follow(&mut self, accepted: u64) -> Result<Follow, RingError> {
        if let Some(req) = self.waiting {
            let Some(p) = self.ring.read_sync() else {
                return Ok(Follow::Waiting);
            };
            if p.ack != req || p.gen == 0 {
                return Ok(Follow::Waiting);
            }
            if !p.at.is_multiple_of(8) {
                return Err(RingError::CorruptIndex(p.at));
            }
            self.tail = p.at;
            self.seq = p.seq;
            self.gen = p.gen;
            self.waiting = None;
            self.ring.tail().store(self.tail, Ordering::Release);
            return Ok(Follow::Switched(p.gen));
        }
        let Some(seq) = self.next_frame_seq()? else {
            return Ok(Follow::Ready);
        };
        let t = seq & 0xffff_0000;
        if self.gen != 0 && t == tag(self.gen) {
            return Ok(Follow::Ready);
        }
        if accepted == 0 || t != tag(accepted) {
            return Ok(Follow::Held(t >> 16));
        }
        if seq != t {
            // An accepted generation's frames start at 0.
            return Err(RingError::BadSequence {
                expected: t,
                found: seq,
            });
        }
        self.seq = seq;
        self.gen = accepted;
        Ok(Follow::Switched(accepted))
    }

    /// Drops the unread frames of generations other than `accepted` up to
    /// the first of `accepted` (its user accepted that the producers
    /// before it are gone for good). Frame lengths are checked as when
    /// reading. Returns the bytes dropped.
    pub fn drop_other_generations(&mut self, accepted: u64) -> Result<u64, RingError> {
        self.drop_frames_while(|t| t != tag(accepted))
    }

    /// Drops the unread frames of generations before `accepted` (older
    /// incarnations of the same producer: gone for good, and never to be
    /// accepted again), up to the first frame of `accepted` or of a later
    /// generation, which stays to be followed or accepted. For a consumer
    /// that first sees its producer after it restarted: the frames of the
    /// incarnations before were never for it. Returns the bytes dropped.
    pub fn drop_older_generations(&mut self, accepted: u64) -> Result<u64, RingError> {
        self.drop_frames_while(|t| precedes(t >> 16, accepted))
    }

    /// Drops frames from the tail while their sequence number's tag
    /// (`seq & 0xffff_0000`) satisfies `drop`.
    fn drop_frames_while(&mut self, drop: impl Fn(u32) -> bool) -> Result<u64, RingError> {
        if self.waiting.is_some() {
            return Ok(0);
        }
        let start = self.tail;
        let mut avail = self.available()?;
        while avail >= FRAME_HEADER_BYTES {
            let mut hdr = [0u8; 8];
            self.ring.read_at(self.tail, &mut hdr);
            let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
            let seq = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
            if !drop(seq & 0xffff_0000) {
                break;
            }
            let need = frame_bytes(len as u64);
            if len as u64 > self.ring.geo.max_payload() || need > avail {
                return Err(RingError::CorruptLength(len));
            }
            self.tail = self.tail.wrapping_add(need);
            avail -= need;
        }
        self.ring.tail().store(self.tail, Ordering::Release);
        Ok(self.tail.wrapping_sub(start))
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::ring::{Geometry, Region};
    use std::vec;
    use std::vec::Vec;

    fn setup(mem: &mut Vec<u64>) -> (Region, Geometry) {
        // SAFETY: the Vec outlives the region in each test; u64 storage
        // gives the 8-byte alignment the ring code relies on.
        let r = unsafe { Region::new(mem.as_mut_ptr() as *mut u8, (mem.len() * 8) as u64) };
        let geo = Geometry::fit(2, (mem.len() * 8) as u64).unwrap();
        r.init(geo).unwrap();
        (r, geo)
    }

    fn recv(c: &mut Consumer) -> Option<Vec<u8>> {
        let mut out = [0u8; 256];
        let (n, _) = c.try_recv(&mut out).unwrap()?;
        Some(out[..n].to_vec())
    }

    #[test]
    fn a_first_generation_is_read_from_the_start_once_accepted() {
        let mut mem = vec![0u64; 8192];
        let (r, geo) = setup(&mut mem);
        let mut p = r.producer(geo, 0, 1).unwrap();
        p.announce(1);
        // Sent before the consumer even exists: still its (first) one.
        p.try_send(b"early").unwrap().unwrap();
        let mut c = r.consumer(geo, 0, 1).unwrap();
        assert_eq!(c.follow(0), Ok(Follow::Held(1)));
        assert_eq!(c.follow(1), Ok(Follow::Switched(1)));
        assert_eq!(recv(&mut c).as_deref(), Some(&b"early"[..]));
        assert_eq!(c.follow(1), Ok(Follow::Ready));
    }

    #[test]
    fn a_restarted_producer_is_held_after_the_old_frames_until_accepted() {
        let mut mem = vec![0u64; 8192];
        let (r, geo) = setup(&mut mem);
        let mut c = r.consumer(geo, 0, 1).unwrap();
        let mut p1 = r.producer(geo, 0, 1).unwrap();
        p1.announce(1);
        for m in [b"a", b"b"] {
            p1.try_send(m).unwrap().unwrap();
        }
        assert_eq!(c.follow(1), Ok(Follow::Switched(1)));
        assert_eq!(recv(&mut c).as_deref(), Some(&b"a"[..]));
        // Incarnation 2 starts where the first left; its sequence numbers
        // restart, which the consumer would refuse as a bad sequence
        // without the generation in them.
        let mut p2 = r.producer(geo, 0, 1).unwrap();
        p2.announce(2);
        p2.try_send(b"new").unwrap().unwrap();
        // The old generation's last frame is still read...
        assert_eq!(c.follow(1), Ok(Follow::Ready));
        assert_eq!(recv(&mut c).as_deref(), Some(&b"b"[..]));
        // ...then the new one is held until accepted.
        assert_eq!(c.follow(1), Ok(Follow::Held(2)));
        assert_eq!(c.follow(2), Ok(Follow::Switched(2)));
        assert_eq!(recv(&mut c).as_deref(), Some(&b"new"[..]));
    }

    #[test]
    fn accepting_a_restart_drops_every_older_generation_left_unread() {
        let mut mem = vec![0u64; 8192];
        let (r, geo) = setup(&mut mem);
        let mut c = r.consumer(geo, 0, 1).unwrap();
        let mut p1 = r.producer(geo, 0, 1).unwrap();
        p1.announce(1);
        p1.try_send(b"stale").unwrap().unwrap();
        // Incarnation 2 sends and dies unaccepted; 3 comes.
        let mut p2 = r.producer(geo, 0, 1).unwrap();
        p2.announce(2);
        p2.try_send(b"dead").unwrap().unwrap();
        let mut p3 = r.producer(geo, 0, 1).unwrap();
        p3.announce(3);
        p3.try_send(b"live").unwrap().unwrap();
        assert_eq!(
            c.drop_other_generations(3),
            Ok(frame_bytes(5) + frame_bytes(4))
        );
        assert_eq!(c.follow(3), Ok(Follow::Switched(3)));
        assert_eq!(recv(&mut c).as_deref(), Some(&b"live"[..]));
    }

    #[test]
    fn a_consumer_that_first_sees_a_restarted_producer_drops_only_older_frames() {
        let mut mem = vec![0u64; 8192];
        let (r, geo) = setup(&mut mem);
        let mut c = r.consumer(geo, 0, 1).unwrap();
        let mut p1 = r.producer(geo, 0, 1).unwrap();
        p1.announce(1);
        p1.try_send(b"old").unwrap().unwrap();
        let mut p2 = r.producer(geo, 0, 1).unwrap();
        p2.announce(2);
        p2.try_send(b"now").unwrap().unwrap();
        let mut p3 = r.producer(geo, 0, 1).unwrap();
        p3.announce(3);
        p3.try_send(b"next").unwrap().unwrap();
        // First sight at incarnation 2: 1's frame is dropped, 2's is read,
        // and 3's waits to be accepted.
        assert_eq!(c.follow(2), Ok(Follow::Held(1)));
        assert_eq!(c.drop_older_generations(2), Ok(frame_bytes(3)));
        assert_eq!(c.follow(2), Ok(Follow::Switched(2)));
        assert_eq!(recv(&mut c).as_deref(), Some(&b"now"[..]));
        assert_eq!(c.drop_older_generations(2), Ok(0), "3 is after 2");
        assert_eq!(c.follow(2), Ok(Follow::Held(3)));
        assert_eq!(c.follow(3), Ok(Follow::Switched(3)));
        assert_eq!(recv(&mut c).as_deref(), Some(&b"next"[..]));
    }

    #[test]
    fn generation_tags_compare_modulo_their_sixteen_bits() {
        assert!(precedes(1, 2));
        assert!(!precedes(2, 2));
        assert!(!precedes(3, 2));
        assert!(precedes(0xffff, 0x1_0000), "across the wrap");
        assert!(precedes(0xffff, 0x1_0003));
        assert!(
            !precedes(1, 0xffff),
            "32,768 or more behind counts as ahead"
        );
        assert!(!precedes(1, 0), "nothing precedes no incarnation");
    }

    #[test]
    fn a_restarted_consumer_starts_where_the_producer_says() {
        let mut mem = vec![0u64; 8192];
        let (r, geo) = setup(&mut mem);
        let mut c1 = r.consumer(geo, 0, 1).unwrap();
        let mut p = r.producer(geo, 0, 1).unwrap();
        p.announce(1);
        for m in [b"a", b"b", b"c"] {
            p.try_send(m).unwrap().unwrap();
        }
        c1.follow(1).unwrap();
        assert_eq!(recv(&mut c1).as_deref(), Some(&b"a"[..]));
        // A new consumer cannot know which frames were for it, nor their
        // sequence numbers: it asks, and reads nothing until answered.
        let mut c2 = r.consumer(geo, 0, 1).unwrap();
        c2.request_sync(2);
        assert_eq!(c2.follow(1), Ok(Follow::Waiting));
        // Not before its user accepts that consumer generation: what it
        // sends until then was for the one before.
        assert!(!p.answer_sync(|_| false));
        p.try_send(b"x").unwrap().unwrap();
        assert_eq!(c2.follow(1), Ok(Follow::Waiting));
        assert!(p.answer_sync(|id| id == 2));
        assert!(!p.answer_sync(|_| true), "answered once");
        p.try_send(b"d").unwrap().unwrap();
        assert_eq!(c2.follow(1), Ok(Follow::Switched(1)));
        assert_eq!(recv(&mut c2).as_deref(), Some(&b"d"[..]));
        assert_eq!(c2.generation(), 1);
    }

    #[test]
    fn tagged_sequence_numbers_wrap_inside_their_generation() {
        let mut mem = vec![0u64; 8192];
        let (r, geo) = setup(&mut mem);
        let mut p = r.producer(geo, 0, 1).unwrap();
        p.announce(7);
        let mut c = r.consumer(geo, 0, 1).unwrap();
        assert_eq!(c.follow(7), Ok(Follow::Ready), "nothing to read yet");
        p.try_send(b"0").unwrap().unwrap();
        assert_eq!(c.follow(7), Ok(Follow::Switched(7)));
        for i in 0..70_000u32 {
            p.try_send(&i.to_le_bytes()).unwrap().unwrap();
            assert!(recv(&mut c).is_some());
        }
        assert_eq!(next_seq(tag(7) | 0xffff, 7), tag(7));
        assert_eq!(next_seq(u32::MAX, 0), 0);
    }

    #[test]
    fn hostile_or_half_written_points_and_frames_are_refused_or_waited_out() {
        let mut mem = vec![0u64; 8192];
        let (r, geo) = setup(&mut mem);
        let off = r.ring_offset(&geo, 0, 1).unwrap();
        let mut c = r.consumer(geo, 0, 1).unwrap();
        // A writer that died mid-write: the point is not there (no hang).
        r.u64_at(off + SYNC_COUNT).store(1, Ordering::SeqCst);
        c.request_sync(2);
        assert_eq!(c.follow(1), Ok(Follow::Waiting));
        // An answer off the frame grid.
        r.u64_at(off + SYNC_COUNT).store(2, Ordering::SeqCst);
        r.u64_at(off + SYNC_GEN).store(5, Ordering::SeqCst);
        r.u64_at(off + SYNC_ACK).store(2, Ordering::SeqCst);
        r.u64_at(off + SYNC_AT).store(12, Ordering::SeqCst);
        assert_eq!(c.follow(1), Err(RingError::CorruptIndex(12)));
        // An accepted generation whose first frame is not its first.
        let mut p = r.producer(geo, 0, 1).unwrap();
        p.announce(3);
        p.try_send(b"a").unwrap().unwrap();
        let mut c = r.consumer(geo, 0, 1).unwrap();
        c.drop_other_generations(3).unwrap();
        recv_skip(&mut c, &mut p);
        // A frame length past what is published.
        let mut c = r.consumer(geo, 0, 1).unwrap();
        let data = off + crate::ring::RING_HEADER_BYTES;
        r.u64_at(data).store(u64::from(u32::MAX), Ordering::SeqCst);
        assert!(matches!(
            c.drop_other_generations(9),
            Err(RingError::CorruptLength(_))
        ));
    }

    /// Sends a second frame of `p` and has `c` (at the first) skip the
    /// first: the second is no generation's start.
    fn recv_skip(c: &mut Consumer, p: &mut Producer) {
        p.try_send(b"b").unwrap().unwrap();
        c.tail = c.tail.wrapping_add(frame_bytes(1));
        assert_eq!(
            c.follow(3),
            Err(RingError::BadSequence {
                expected: tag(3),
                found: tag(3) | 1
            })
        );
    }
}
