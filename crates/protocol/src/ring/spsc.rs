//! One ring: a single-producer single-consumer stream of checksummed,
//! numbered frames, and the sleep declarations of adaptive notification.

use core::sync::atomic::{fence, AtomicU64, Ordering};

use super::checksum::Fletcher;
use super::{
    Geometry, Region, RingError, FRAME_HEADER_BYTES, RING_CONSUMER_FLAGS, RING_HEAD,
    RING_HEADER_BYTES, RING_PRODUCER_FLAGS, RING_TAIL,
};

/// One ring of a region: where its two halves lie (the producer's header
/// and data in the producer's section, the consumer's end in the
/// consumer's), and the geometry that bounds it.
#[derive(Clone, Copy, Debug)]
pub(super) struct RingRef {
    pub(super) region: Region,
    /// The producer's header, followed by the data.
    pub(super) off: u64,
    /// The consumer's end: tail line, flag line.
    pub(super) cons: u64,
    pub(super) geo: Geometry,
}

impl RingRef {
    pub(super) fn head(&self) -> &AtomicU64 {
        self.region.u64_at(self.off + RING_HEAD)
    }
    pub(super) fn tail(&self) -> &AtomicU64 {
        self.region.u64_at(self.cons + RING_TAIL)
    }
    pub(super) fn producer_flags(&self) -> &AtomicU64 {
        self.region.u64_at(self.off + RING_PRODUCER_FLAGS)
    }
    pub(super) fn consumer_flags(&self) -> &AtomicU64 {
        self.region.u64_at(self.cons + RING_CONSUMER_FLAGS)
    }
    fn data(&self) -> *mut u8 {
        // SAFETY: the ring lies inside the region (checked by `geometry`/`init`).
        unsafe {
            self.region
                .base
                .add((self.off + RING_HEADER_BYTES) as usize)
        }
    }

    /// Copies `src` into the ring at stream position `pos` (wrapping).
    fn write_at(&self, pos: u64, src: &[u8]) {
        let [(a, an), (b, bn)] = self.spans(pos, src.len());
        // SAFETY: the spans lie inside the data area (`spans`) and together
        // hold `src.len()` bytes. The peer may read concurrently; it
        // validates what it reads.
        unsafe {
            core::ptr::copy_nonoverlapping(src.as_ptr(), a, an);
            core::ptr::copy_nonoverlapping(src.as_ptr().add(an), b, bn);
        }
    }

    /// Copies `src` into the ring at stream position `pos` (wrapping) and
    /// returns its checksum, computed in the same pass. `pos` is a multiple
    /// of 8, so the wrap splits the message at a word boundary.
    fn write_summed(&self, pos: u64, src: &[u8]) -> u64 {
        let [(a, an), (b, bn)] = self.spans(pos, src.len());
        let mut f = Fletcher::new(src.len());
        // SAFETY: as for `write_at`.
        unsafe {
            f.copy(a, src.as_ptr(), an);
            f.copy(b, src.as_ptr().add(an), bn);
        }
        f.finish()
    }

    /// Copies from the ring at stream position `pos` (a multiple of 8) into
    /// `dst` and returns the checksum of the bytes copied.
    fn read_summed(&self, pos: u64, dst: &mut [u8]) -> u64 {
        let [(a, an), (b, bn)] = self.spans(pos, dst.len());
        let mut f = Fletcher::new(dst.len());
        // SAFETY: as for `write_at`.
        unsafe {
            f.copy(dst.as_mut_ptr(), a, an);
            f.copy(dst.as_mut_ptr().add(an), b, bn);
        }
        f.finish()
    }

    /// The one or two pieces of ring data that `len` bytes at stream
    /// position `pos` occupy (two when they wrap past the buffer's end;
    /// the second is then empty otherwise). `len` is at most the capacity.
    pub(super) fn spans(&self, pos: u64, len: usize) -> [(*mut u8, usize); 2] {
        let cap = self.geo.ring_bytes;
        let start = pos & (cap - 1);
        let first = (cap - start).min(len as u64) as usize;
        // SAFETY: start < cap, so the first piece starts inside the data
        // area; the rest (< cap) wraps to the area's start.
        let at = unsafe { self.data().add(start as usize) };
        [(at, first), (self.data(), len - first)]
    }

    /// The checksum of `len` bytes at stream position `pos` (a multiple of
    /// 8), summed where they lie.
    pub(super) fn sum_at(&self, pos: u64, len: usize) -> u64 {
        let mut f = Fletcher::new(len);
        for (at, n) in self.spans(pos, len) {
            // SAFETY: each span lies inside the data area (`spans`).
            unsafe { f.sum(at, n) };
        }
        f.finish()
    }

    /// Copies from the ring at stream position `pos` into `dst` (wrapping).
    pub(super) fn read_at(&self, pos: u64, dst: &mut [u8]) {
        let [(a, an), (b, bn)] = self.spans(pos, dst.len());
        // SAFETY: as for `write_at`; the copy is validated by the caller.
        unsafe {
            core::ptr::copy_nonoverlapping(a, dst.as_mut_ptr(), an);
            core::ptr::copy_nonoverlapping(b, dst.as_mut_ptr().add(an), bn);
        }
    }
}

/// A snapshot of one ring, see [`Region::ring_state`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RingState {
    /// Bytes the producer has published (free-running).
    pub head: u64,
    /// Bytes the consumer has taken (free-running).
    pub tail: u64,
    /// The producer declared that it sleeps on a full ring.
    pub producer_sleeping: bool,
    /// The consumer declared that it sleeps on an empty ring.
    pub consumer_sleeping: bool,
}

/// Ring bytes a frame with `len` payload bytes takes (header and padding).
pub fn frame_bytes(len: u64) -> u64 {
    FRAME_HEADER_BYTES + len.next_multiple_of(8)
}

/// The sending end of one ring.
#[derive(Debug)]
pub struct Producer {
    pub(super) ring: RingRef,
    pub(super) head: u64,
    /// The consumer's tail as last read. The tail only grows, so space
    /// known free from it is free: a send that fits reads no line the
    /// consumer writes (one cache-line transfer less per message).
    pub(super) tail_seen: u64,
    pub(super) seq: u32,
    pub(super) peer: u32,
    /// Generation announced (`sync`); 0: never announced.
    pub(super) gen: u64,
    /// The consumer's sync request last answered.
    pub(super) answered: u64,
    /// The consumer's sleep declaration last rung for.
    pub(super) sleep_taken: u64,
}

/// Whether a flag line holds a sleep declaration: its low bit. The rest
/// counts the declarations, so that a waker can tell a new one from one
/// it already answered without writing to the sleeper's line.
pub(super) fn is_sleeping(flag: &AtomicU64) -> bool {
    flag.load(Ordering::SeqCst) & 1 == 1
}

/// Adaptive notification (event suppression): each side declares in its
/// flag line that it is about to sleep; the other side rings only then.
///
/// The lost-wake-up race is closed the way a Dekker lock closes it: the
/// sleeper stores its declaration, fences, and looks at the ring once more
/// before sleeping; the waker publishes its index, fences, and then looks
/// at the declaration. At least one of the two sees the other's store.
/// Each declaration carries a new number (the flag line counts them), and
/// the waker remembers the last one it rang for: one sleep costs one
/// doorbell, and each side writes only its own line.
impl RingRef {
    fn declare(flag: &AtomicU64) {
        // Our own line: nobody else writes it.
        let declared = (flag.load(Ordering::Relaxed) | 1).wrapping_add(2);
        flag.store(declared, Ordering::SeqCst);
        fence(Ordering::SeqCst);
    }
    fn awake(flag: &AtomicU64) {
        let v = flag.load(Ordering::Relaxed);
        flag.store(v & !1, Ordering::SeqCst);
    }
    fn take(flag: &AtomicU64, taken: &mut u64) -> bool {
        fence(Ordering::SeqCst);
        let v = flag.load(Ordering::SeqCst);
        if v & 1 == 1 && v != *taken {
            *taken = v;
            return true;
        }
        false
    }
}

impl Producer {
    /// After publishing: true when the consumer had declared that it
    /// sleeps (the caller rings it), once per declaration.
    pub fn take_consumer_sleep(&mut self) -> bool {
        RingRef::take(self.ring.consumer_flags(), &mut self.sleep_taken)
    }

    /// Declares that this producer will sleep until the consumer frees
    /// space. Call [`Producer::free`] again afterwards, and only sleep if
    /// the ring is still full; call [`Producer::awake`] on waking.
    pub fn declare_sleep(&self) {
        RingRef::declare(self.ring.producer_flags());
    }

    /// Withdraws a sleep declaration.
    pub fn awake(&self) {
        RingRef::awake(self.ring.producer_flags());
    }

    /// Member this producer sends to.
    pub fn peer(&self) -> u32 {
        self.peer
    }

    /// Largest message this ring takes.
    pub fn max_message(&self) -> u64 {
        self.ring.geo.max_payload()
    }

    /// Free bytes in the ring (for frames, including their headers), as
    /// the consumer's tail says now.
    pub fn free(&mut self) -> Result<u64, RingError> {
        let tail = self.ring.tail().load(Ordering::Acquire);
        let used = self.head.wrapping_sub(tail);
        if used > self.ring.geo.ring_bytes || !used.is_multiple_of(8) {
            return Err(RingError::CorruptIndex(tail));
        }
        self.tail_seen = tail;
        Ok(self.ring.geo.ring_bytes - used)
    }

    /// Free bytes known from the tail last read (never more than
    /// [`Producer::free`]; no access to the consumer's line).
    fn known_free(&self) -> u64 {
        let used = self.head.wrapping_sub(self.tail_seen);
        self.ring.geo.ring_bytes.saturating_sub(used)
    }

    /// Sends `msg` as one frame if there is room; `Ok(None)` when full.
    /// Returns the frame's checksum, for stream accounting.
    pub fn try_send(&mut self, msg: &[u8]) -> Result<Option<u64>, RingError> {
        if !self.room_for(msg.len())? {
            return Ok(None);
        }
        // Payload first (summed while copied), then the header that carries
        // the sum; neither is visible before the head store in `publish`.
        let sum = self
            .ring
            .write_summed(self.head.wrapping_add(FRAME_HEADER_BYTES), msg);
        self.publish(msg.len(), sum);
        Ok(Some(sum))
    }

    /// Whether a frame of `len` payload bytes fits now (`TooLarge` if it
    /// never can).
    pub(super) fn room_for(&mut self, len: usize) -> Result<bool, RingError> {
        if len as u64 > self.max_message() {
            return Err(RingError::TooLarge(len as u64));
        }
        let need = frame_bytes(len as u64);
        Ok(self.known_free() >= need || self.free()? >= need)
    }

    /// Publishes the frame whose `len` payload bytes (summing to `sum`)
    /// are already in the ring after the head: writes its header, then
    /// moves the head past it.
    pub(super) fn publish(&mut self, len: usize, sum: u64) {
        let mut hdr = [0u8; 16];
        hdr[..4].copy_from_slice(&(len as u32).to_le_bytes());
        hdr[4..8].copy_from_slice(&self.seq.to_le_bytes());
        hdr[8..].copy_from_slice(&sum.to_le_bytes());
        self.ring.write_at(self.head, &hdr);
        self.head = self.head.wrapping_add(frame_bytes(len as u64));
        self.seq = super::sync::next_seq(self.seq, self.gen);
        self.ring.head().store(self.head, Ordering::Release);
    }
}

/// The receiving end of one ring.
#[derive(Debug)]
pub struct Consumer {
    pub(super) ring: RingRef,
    pub(super) tail: u64,
    pub(super) seq: u32,
    pub(super) peer: u32,
    /// Producer generation read (`sync`); 0: none yet.
    pub(super) gen: u64,
    /// A sync request not answered yet.
    pub(super) waiting: Option<u64>,
    /// The producer's sleep declaration last rung for.
    pub(super) sleep_taken: u64,
}

impl Consumer {
    /// Declares that this consumer will sleep until a doorbell. Call
    /// [`Consumer::available`] again afterwards, and only sleep if the ring
    /// is still empty; call [`Consumer::awake`] on waking.
    pub fn declare_sleep(&self) {
        RingRef::declare(self.ring.consumer_flags());
    }

    /// Withdraws a sleep declaration.
    pub fn awake(&self) {
        RingRef::awake(self.ring.consumer_flags());
    }

    /// After consuming: true when the producer had declared that it sleeps
    /// on a full ring (the caller rings it), once per declaration.
    pub fn take_producer_sleep(&mut self) -> bool {
        RingRef::take(self.ring.producer_flags(), &mut self.sleep_taken)
    }

    /// Member this consumer receives from.
    pub fn peer(&self) -> u32 {
        self.peer
    }

    /// Starts this consumer afresh at the producer's current head: drops
    /// every frame published so far and expects sequence number 0 next.
    /// A receiver calls it before it tells a producer to start (the
    /// probe's and the Linux tool's "go"), when nothing of the coming
    /// transfer can be in the ring yet, so that what an interrupted
    /// transfer left behind (a producer killed mid-transfer, then
    /// restarted) is never read as part of the new one. A head that is
    /// not frame aligned is refused; any aligned one is taken, so even a
    /// ring a crashed producer left corrupt starts clean. Returns the
    /// bytes dropped.
    pub fn drop_stale(&mut self) -> Result<u64, RingError> {
        let head = self.ring.head().load(Ordering::Acquire);
        if !head.is_multiple_of(8) {
            return Err(RingError::CorruptIndex(head));
        }
        let dropped = head.wrapping_sub(self.tail);
        self.tail = head;
        self.seq = 0;
        self.ring.tail().store(self.tail, Ordering::Release);
        Ok(dropped)
    }

    /// Bytes published by the producer and not yet consumed.
    pub fn available(&self) -> Result<u64, RingError> {
        let head = self.ring.head().load(Ordering::Acquire);
        let avail = head.wrapping_sub(self.tail);
        if avail > self.ring.geo.ring_bytes || !avail.is_multiple_of(8) {
            return Err(RingError::CorruptIndex(head));
        }
        Ok(avail)
    }

    /// Receives the next frame into `out` if one is there. Returns the
    /// payload length and checksum. The payload is checked after it was
    /// copied, so the peer cannot change it between check and use.
    pub fn try_recv(&mut self, out: &mut [u8]) -> Result<Option<(usize, u64)>, RingError> {
        let Some(f) = self.next_frame()? else {
            return Ok(None);
        };
        if f.len > out.len() {
            return Err(RingError::TooLarge(f.len as u64));
        }
        let dst = &mut out[..f.len];
        // The sum is of the bytes as copied out, so the peer cannot change
        // them between the check and their use.
        let got = self
            .ring
            .read_summed(self.tail.wrapping_add(FRAME_HEADER_BYTES), dst);
        fence(Ordering::Acquire);
        if got != f.sum {
            return Err(RingError::BadChecksum { seq: f.seq });
        }
        self.consume(f.len);
        Ok(Some((f.len, f.sum)))
    }

    /// The header of the next frame, if one is published: its length
    /// checked against the ring and what was published, its sequence
    /// number against the one expected. The payload is not read.
    pub(super) fn next_frame(&self) -> Result<Option<FrameHead>, RingError> {
        let avail = self.available()?;
        if avail < FRAME_HEADER_BYTES {
            return Ok(None);
        }
        let mut hdr = [0u8; 16];
        self.ring.read_at(self.tail, &mut hdr);
        let len = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let seq = u32::from_le_bytes([hdr[4], hdr[5], hdr[6], hdr[7]]);
        let sum = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        if len as u64 > self.ring.geo.max_payload() || frame_bytes(len as u64) > avail {
            return Err(RingError::CorruptLength(len));
        }
        if seq != self.seq {
            return Err(RingError::BadSequence {
                expected: self.seq,
                found: seq,
            });
        }
        Ok(Some(FrameHead {
            len: len as usize,
            seq,
            sum,
        }))
    }

    /// Takes the next frame, of `len` payload bytes, off the ring: the
    /// producer may write over it from now on.
    pub(super) fn consume(&mut self, len: usize) {
        self.tail = self.tail.wrapping_add(frame_bytes(len as u64));
        self.seq = super::sync::next_seq(self.seq, self.gen);
        self.ring.tail().store(self.tail, Ordering::Release);
    }
}

/// A frame header as read and checked by [`Consumer::next_frame`].
#[derive(Clone, Copy, Debug)]
pub(super) struct FrameHead {
    /// Payload bytes.
    pub(super) len: usize,
    /// Sequence number.
    pub(super) seq: u32,
    /// Checksum of the payload, as the producer wrote it.
    pub(super) sum: u64,
}
