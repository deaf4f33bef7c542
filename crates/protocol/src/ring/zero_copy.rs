//! Frames written and read where they lie in the ring: no copy between the
//! ring and a private buffer.
//!
//! A producer [reserves](Producer::try_reserve) room for a frame, fills
//! its payload in place (generating it there, or `read(2)` from a file
//! straight into it) and [commits](Reserved::commit) it: the commit sums
//! the payload where it lies, writes the frame header and publishes. A
//! reservation dropped without a commit sends nothing.
//!
//! A consumer [borrows](Consumer::try_borrow) the next frame: its header
//! is read and checked as [`Consumer::try_recv`] checks it, and its
//! payload is handed out in place. [Releasing](Borrowed::release) it sums
//! the payload where it lies, compares the sum with the header's, and only
//! then takes the frame off the ring. A borrowed frame dropped without a
//! release stays the next frame.
//!
//! What a borrower may trust is documented on [`Borrowed`].

use core::sync::atomic::{fence, Ordering};

use super::spsc::FrameHead;
use super::{Consumer, Producer, RingError, FRAME_HEADER_BYTES};

/// Room for one frame, reserved in the ring by [`Producer::try_reserve`]:
/// fill its payload through [`Reserved::pieces_mut`], then
/// [`Reserved::commit`] it.
#[derive(Debug)]
pub struct Reserved<'a> {
    p: &'a mut Producer,
    len: usize,
}

impl Producer {
    /// Reserves room for a frame of up to `len` payload bytes, or `Ok(None)`
    /// while the ring is too full for it. Fails with `TooLarge` for a
    /// frame no empty ring can hold.
    pub fn try_reserve(&mut self, len: usize) -> Result<Option<Reserved<'_>>, RingError> {
        if !self.room_for(len)? {
            return Ok(None);
        }
        Ok(Some(Reserved { p: self, len }))
    }
}

impl Reserved<'_> {
    /// Payload bytes reserved.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True for a reservation of no bytes (an empty frame).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The reserved payload, in place: one piece, or two when it wraps
    /// past the ring's end (the second is empty otherwise). Byte `i` of the
    /// payload is `first[i]` for `i < first.len()`, else
    /// `second[i - first.len()]`. It holds whatever the ring held before.
    ///
    /// # Safety
    /// The slices are memory of a region other VMs map. The caller must
    /// make sure that this is the only [`Producer`] of the ring in this
    /// process (a ring has one producer; [`Region::producer`](super::Region::producer)
    /// does not stop a second), and must only store into the slices, or
    /// read back what it stored without building on it anything whose
    /// validity depends on the bytes (a `str`, an enum): a hostile peer may
    /// write them too. What such a peer changes reaches only the frame's
    /// receiver, whose checksum then fails.
    pub unsafe fn pieces_mut(&mut self) -> (&mut [u8], &mut [u8]) {
        let pos = self.p.head.wrapping_add(FRAME_HEADER_BYTES);
        let [(a, an), (b, bn)] = self.p.ring.spans(pos, self.len);
        // SAFETY: the two spans lie inside the ring's data area (`spans`)
        // and do not overlap (together they are at most the capacity).
        // They lie past the published head, where no consumer reads before
        // the commit, and the caller guarantees no other producer of this
        // ring in this process; the mutable borrow of `self` keeps them
        // unique among this producer's reservations.
        unsafe {
            (
                core::slice::from_raw_parts_mut(a, an),
                core::slice::from_raw_parts_mut(b, bn),
            )
        }
    }

    /// Sends the first `len` bytes of the reservation (at most what was
    /// reserved; fewer, e.g. for a short read of a file) as one frame.
    /// Returns the frame's checksum, for stream accounting.
    pub fn commit(self, len: usize) -> Result<u64, RingError> {
        if len > self.len {
            return Err(RingError::TooLarge(len as u64));
        }
        let pos = self.p.head.wrapping_add(FRAME_HEADER_BYTES);
        let sum = self.p.ring.sum_at(pos, len);
        self.p.publish(len, sum);
        Ok(sum)
    }
}

/// The next frame of a ring, borrowed in place by [`Consumer::try_borrow`]:
/// read it through [`Borrowed::pieces`], then [`Borrowed::release`] it.
///
/// # What a borrower may trust
///
/// The payload lives in memory other VMs can write. A well-behaved
/// producer never touches a frame it published, but a hostile member may
/// rewrite it at any time, also while it is borrowed. A borrower therefore
/// treats what it reads as **unverified until [`Borrowed::release`]
/// returns `Ok`**: the release sums the bytes after the borrower used them,
/// so results computed from them (a file written, a pattern compared, a
/// message parsed) stand only if it succeeds, and are discarded when it
/// fails with [`RingError::BadChecksum`]. Lengths and offsets come from
/// the header read once at the borrow and checked against the ring, never
/// from shared memory again, so a rewrite can change the bytes seen but
/// never make the borrower read or write outside the frame. A borrower
/// that needs bytes that cannot change under it copies them out
/// ([`Consumer::try_recv`]); the copy is what is checked.
///
/// The checksum is not keyed: it catches bytes that changed by accident,
/// or by a writer that does not also rewrite the header's sum, or changed
/// back before the release. Who can write the frame is the mapping's
/// business: under intervm a ring lies in its producer's section, which
/// only that member's guest (and the VMM processes) can write, so the
/// rewriter of a borrowed frame can only be its producer.
#[derive(Debug)]
pub struct Borrowed<'a> {
    c: &'a mut Consumer,
    head: FrameHead,
}

impl Consumer {
    /// Borrows the next frame in place if one is there. Its header is
    /// checked (length within the ring and what was published, sequence
    /// number); its payload is checked by [`Borrowed::release`].
    pub fn try_borrow(&mut self) -> Result<Option<Borrowed<'_>>, RingError> {
        let Some(head) = self.next_frame()? else {
            return Ok(None);
        };
        // The payload's loads come after the header's (and the head's).
        fence(Ordering::Acquire);
        Ok(Some(Borrowed { c: self, head }))
    }
}

impl Borrowed<'_> {
    /// Payload bytes.
    pub fn len(&self) -> usize {
        self.head.len
    }

    /// True for an empty frame (the Linux tool's end of stream).
    pub fn is_empty(&self) -> bool {
        self.head.len == 0
    }

    /// Sequence number of the frame.
    pub fn seq(&self) -> u32 {
        self.head.seq
    }

    /// The payload, in place: one piece, or two when it wraps past the
    /// ring's end (the second is empty otherwise). Unverified until
    /// [`Borrowed::release`] returns `Ok`.
    ///
    /// # Safety
    /// The slices are memory a peer may rewrite while they are borrowed.
    /// The caller must only copy, compare or sum the bytes, or hand them
    /// to the kernel (`write(2)`), never build on them anything whose
    /// validity depends on them (a `str` from a UTF-8 check, an enum, a
    /// length used later without another check), and must take what it
    /// computed from them as final only once [`Borrowed::release`]
    /// returned `Ok`.
    pub unsafe fn pieces(&self) -> (&[u8], &[u8]) {
        let pos = self.c.tail.wrapping_add(FRAME_HEADER_BYTES);
        let [(a, an), (b, bn)] = self.c.ring.spans(pos, self.head.len);
        // SAFETY: the spans lie inside the ring's data area (`spans`), with
        // a length checked against the ring when the header was read; they
        // belong to a published frame a well-behaved producer does not
        // write again until the release. That a hostile one may is the
        // caller's contract above.
        unsafe {
            (
                core::slice::from_raw_parts(a, an),
                core::slice::from_raw_parts(b, bn),
            )
        }
    }

    /// Sums the payload where it lies and, if the sum is the producer's,
    /// takes the frame off the ring and returns the sum (for stream
    /// accounting). Otherwise fails with `BadChecksum` and leaves the
    /// frame where it is, as [`Consumer::try_recv`] does: what was computed
    /// from the borrowed bytes must then be thrown away.
    pub fn release(self) -> Result<u64, RingError> {
        let pos = self.c.tail.wrapping_add(FRAME_HEADER_BYTES);
        let got = self.c.ring.sum_at(pos, self.head.len);
        fence(Ordering::Acquire);
        if got != self.head.sum {
            return Err(RingError::BadChecksum { seq: self.head.seq });
        }
        self.c.consume(self.head.len);
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::super::{checksum, fill_pattern, Geometry, Region, RING_HEADER_BYTES};
    use super::*;
    use std::vec;
    use std::vec::Vec;

    /// The smallest region for two members: the header, and two sections
    /// of a page and one 4 KiB ring (with its header, two pages).
    const SMALL: usize = 4096 + 2 * (4096 + 8192);

    fn region(bytes: usize) -> (Vec<u64>, Region, Geometry) {
        let mut mem = vec![0u64; bytes / 8];
        // SAFETY: the vector outlives every use in the test that owns it,
        // and is 8-byte aligned (all the ring code needs off the guest).
        let r = unsafe { Region::new(mem.as_mut_ptr() as *mut u8, bytes as u64) };
        let geo = Geometry::fit(2, bytes as u64).expect("geometry");
        r.init(geo).expect("init");
        (mem, r, geo)
    }

    fn joined(p: (&[u8], &[u8])) -> Vec<u8> {
        [p.0, p.1].concat()
    }

    #[test]
    fn frames_in_place_cross_the_ring_end_and_mix_with_copied_ones() {
        let (_mem, r, geo) = region(SMALL);
        let mut p = r.producer(geo, 0, 1).expect("producer");
        let mut c = r.consumer(geo, 0, 1).expect("consumer");
        let mut out = vec![0u8; geo.max_payload() as usize];
        let mut wrapped = 0;
        for i in 0..200u64 {
            let len = (i * 37 % 1500) as usize + 1;
            let mut msg = vec![0u8; len];
            fill_pattern(i, 0, &mut msg);
            if i % 3 == 0 {
                p.try_send(&msg).expect("send").expect("room");
            } else {
                let mut res = p.try_reserve(len + 100).expect("reserve").expect("room");
                // SAFETY: the ring's only producer; only stored into.
                let (a, b) = unsafe { res.pieces_mut() };
                wrapped += usize::from(!b.is_empty());
                let n = a.len().min(len);
                a[..n].copy_from_slice(&msg[..n]);
                b[..len - n].copy_from_slice(&msg[n..]);
                assert_eq!(res.commit(len).expect("commit"), checksum(&msg));
            }
            if i % 2 == 0 {
                let (n, sum) = c.try_recv(&mut out).expect("recv").expect("frame");
                assert_eq!((&out[..n], sum), (&msg[..], checksum(&msg)));
            } else {
                let b = c.try_borrow().expect("borrow").expect("frame");
                // SAFETY: only compared.
                assert_eq!(joined(unsafe { b.pieces() }), msg);
                assert_eq!(b.release().expect("release"), checksum(&msg));
            }
        }
        assert!(wrapped > 0, "no frame wrapped past the ring's end");
        assert!(c.try_borrow().expect("borrow").is_none());
    }

    #[test]
    fn a_dropped_reservation_sends_nothing_and_a_dropped_borrow_keeps_the_frame() {
        let (_mem, r, geo) = region(SMALL);
        let mut p = r.producer(geo, 0, 1).expect("producer");
        let mut c = r.consumer(geo, 0, 1).expect("consumer");
        {
            let mut res = p.try_reserve(64).expect("reserve").expect("room");
            // SAFETY: the ring's only producer; only stored into.
            unsafe { res.pieces_mut() }.0.fill(7);
        }
        assert!(c.try_borrow().expect("borrow").is_none());
        let res = p.try_reserve(64).expect("reserve").expect("room");
        assert_eq!(
            res.commit(65).err(),
            Some(RingError::TooLarge(65)),
            "a commit longer than the reservation"
        );
        p.try_send(b"kept").expect("send").expect("room");
        // Borrowed, and dropped at the end of the statement.
        assert!(c.try_borrow().expect("borrow").is_some());
        let b = c.try_borrow().expect("borrow").expect("frame");
        // SAFETY: only compared.
        assert_eq!(joined(unsafe { b.pieces() }), b"kept");
        b.release().expect("release");
        assert_eq!(
            p.try_reserve(geo.ring_bytes as usize).err(),
            Some(RingError::TooLarge(geo.ring_bytes))
        );
    }

    #[test]
    fn a_full_ring_refuses_a_reservation_until_the_consumer_frees_room() {
        let (_mem, r, geo) = region(SMALL);
        let mut p = r.producer(geo, 0, 1).expect("producer");
        let mut c = r.consumer(geo, 0, 1).expect("consumer");
        let mut sent = 0;
        while let Some(res) = p.try_reserve(1000).expect("reserve") {
            res.commit(1000).expect("commit");
            sent += 1;
        }
        assert!(sent > 0);
        c.try_borrow()
            .expect("borrow")
            .expect("frame")
            .release()
            .expect("release");
        assert!(p.try_reserve(1000).expect("reserve").is_some());
    }

    #[test]
    fn a_payload_rewritten_while_borrowed_fails_its_release_and_stays() {
        let (mut mem, r, geo) = region(SMALL);
        let mut p = r.producer(geo, 0, 1).expect("producer");
        let mut c = r.consumer(geo, 0, 1).expect("consumer");
        p.try_send(&[1u8; 40]).expect("send").expect("room");
        let b = c.try_borrow().expect("borrow").expect("frame");
        // SAFETY: only compared.
        assert_eq!(unsafe { b.pieces() }.0, &[1u8; 40]);
        // A hostile member writes the published payload (first data word
        // after the frame header).
        let data = r.ring_offset(&geo, 0, 1).expect("ring") + RING_HEADER_BYTES;
        let word = (data + FRAME_HEADER_BYTES) as usize / 8;
        // SAFETY: a word inside the vector that backs the region, written
        // the way another VM would write it.
        unsafe { core::ptr::write_volatile(mem.as_mut_ptr().add(word), 0) };
        assert_eq!(b.release(), Err(RingError::BadChecksum { seq: 0 }));
        // Still the next frame, and still failing.
        let mut out = [0u8; 64];
        assert_eq!(c.try_recv(&mut out), Err(RingError::BadChecksum { seq: 0 }));
    }

    #[test]
    fn a_borrow_checks_the_header_as_a_copy_does() {
        let (mut mem, r, geo) = region(SMALL);
        let mut p = r.producer(geo, 0, 1).expect("producer");
        let mut c = r.consumer(geo, 0, 1).expect("consumer");
        p.try_send(b"hello, peer").expect("send").expect("room");
        let data = r.ring_offset(&geo, 0, 1).expect("ring") + RING_HEADER_BYTES;
        let len = data as usize / 8;
        // SAFETY: the frame header's first word (length, sequence number)
        // in the vector backing the region, written as a hostile VM would.
        unsafe { core::ptr::write_volatile(mem.as_mut_ptr().add(len), 60_000) };
        assert_eq!(c.try_borrow().err(), Some(RingError::CorruptLength(60_000)));
        // SAFETY: as above: length 8, sequence number 5.
        unsafe { core::ptr::write_volatile(mem.as_mut_ptr().add(len), 8 | 5 << 32) };
        assert_eq!(
            c.try_borrow().err(),
            Some(RingError::BadSequence {
                expected: 0,
                found: 5
            })
        );
    }
}
