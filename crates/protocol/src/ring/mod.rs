//! The intervm shared-memory transport: one region, one ring per ordered
//! pair of members, and every ring in the section of the member that
//! writes it.
//!
//! ```text
//! offset 0        RegionHeader (one 4 KiB page): magic, version, geometry
//!                 (written once, by the VMM that formats the region)
//! ring_base       section of member 0, section of member 1, ...
//!
//! section of member m (page aligned, as is each of its rings):
//!   +0            member entry: state u32 at +0, heartbeat u64 at +8,
//!                 ready word u64 at +16, doorbell ID + 1 at +24,
//!                 incarnation u64 at +32
//!   +256 + 128 p  m's end of the ring p -> m: the consumer's tail line
//!                 and its flag line
//!   +4096         ring m -> 0, ring m -> 1, ... (not m -> m): each a
//!                 128-byte producer header (head line, flag line), then
//!                 `ring_bytes` of data
//! ```
//!
//! So everything a member writes lies in its own section, and nothing in
//! another's: a VMM maps its guest's own section writable and the header
//! page and the other members' sections read-only
//! ([`Geometry::guest_read_only`]), and then no member can write a frame
//! into a ring it does not produce, move another member's indices or
//! speak for it in the member table. The pages the ring protocol does not
//! use (before the first section, after the last) stay writable.
//!
//! `ring_base` is 4096 when the rings fill the region ([`Geometry::fit`]).
//! Rings of a chosen size ([`Geometry::at_end`]) put the sections at the
//! region's end instead, and the pages between the header and them are
//! left to the application (writable by every member): a region of
//! several GiB with small rings, whose users map only its header and its
//! sections.
//!
//! A ring is a single-producer single-consumer byte stream. `head` and `tail`
//! are free-running byte counters (published with release, read with
//! acquire); data wraps around the end of the buffer. Each message is a
//! frame: `len: u32, seq: u32, checksum: u64`, then the payload padded to 8
//! bytes.
//!
//! The parts, a module each: this one holds the region (its header, the
//! member table and the [`Region`] accessors), `spsc` one ring (frames,
//! [`Producer`], [`Consumer`], sleep declarations), `zero_copy` frames
//! filled and read in place ([`Reserved`], [`Borrowed`]), `sync` a ring's
//! restart when one of its ends restarts, `checksum` the frame and stream
//! checksums, `liveness` whether a peer is still there, and `pattern` the
//! test payload.
//!
//! Nothing read from shared memory is trusted: each side keeps its own copy
//! of the index it owns, checks the peer's index against the ring capacity
//! and alignment, checks frame lengths, copies the payload out before
//! verifying its checksum and sequence number, and reports violations as
//! [`RingError`]s instead of reading or writing out of bounds.

use core::sync::atomic::{AtomicU32, AtomicU64, Ordering};

mod checksum;
mod liveness;
mod pattern;
mod spsc;
mod sync;
mod zero_copy;

pub use checksum::{checksum, fold};
pub use liveness::Liveness;
pub use pattern::{fill_pattern, seed_for};
pub use spsc::{frame_bytes, Consumer, Producer, RingState};
use spsc::{is_sleeping, RingRef};
pub use sync::{precedes, Follow, SyncPoint};
pub use zero_copy::{Borrowed, Reserved};

/// `RegionHeader::magic`: "IVMRING1".
pub const REGION_MAGIC: u64 = u64::from_le_bytes(*b"IVMRING1");
/// Layout version (3: each member's rings in its own section).
pub const REGION_VERSION: u32 = 3;
/// Most members a region can describe.
pub const MAX_MEMBERS: u32 = 16;
/// Size of the region header.
pub const HEADER_BYTES: u64 = 4096;
/// Size of the first part of a member's section: its member entry and its
/// ends of the rings towards it.
pub const SECTION_HEADER_BYTES: u64 = 4096;
/// Size of a ring's producer header (its head line and flag line); the
/// ring's data follows it.
pub const RING_HEADER_BYTES: u64 = 128;
/// Size of a frame header.
pub const FRAME_HEADER_BYTES: u64 = 16;
/// Smallest ring data size.
pub const MIN_RING_BYTES: u64 = 4096;

const OFF_MAGIC: u64 = 0;
const OFF_VERSION: u64 = 8;
const OFF_MEMBERS: u64 = 12;
const OFF_RING_BYTES: u64 = 16;
const OFF_RING_STRIDE: u64 = 24;
const OFF_REGION_SIZE: u64 = 32;
const OFF_RING_BASE: u64 = 40;
/// Offset of a member's state in its entry (the first bytes of its section).
const MEMBER_STATE: u64 = 0;
/// Offset of a member's heartbeat in its entry.
const MEMBER_HEARTBEAT: u64 = 8;
/// Offset of a member's ready word in its entry.
const MEMBER_READY: u64 = 16;
/// Offset of a member's doorbell ID + 1 in its entry.
const MEMBER_DOORBELL: u64 = 24;
/// Offset of a member's incarnation in its entry.
const MEMBER_INCARNATION: u64 = 32;
/// Offset, in a member's section, of its end of the ring from member 0.
const INBOUND_BASE: u64 = 256;
/// Distance between a member's ends of consecutive inbound rings.
const INBOUND_STRIDE: u64 = 128;

/// Offset of a ring's head index in its producer header (written by the
/// producer).
pub const RING_HEAD: u64 = 0;
/// Offset of the producer's flag line in its header (used by adaptive
/// notification).
pub const RING_PRODUCER_FLAGS: u64 = 64;
/// Offset of a ring's tail index at the consumer's end of it
/// ([`Region::consumer_offset`]; written by the consumer).
pub const RING_TAIL: u64 = 0;
/// Offset of the consumer's flag line at its end of the ring (used by
/// adaptive notification).
pub const RING_CONSUMER_FLAGS: u64 = 64;

/// Ready word of a sender whose payload is prepared (see
/// [`Region::set_ready`]). The start line of a timed transfer: senders set
/// this, the receiver waits for all of them, then sets [`ready_go`]`(1)`
/// and starts its clock; senders start sending when they see it.
///
/// Every member clears its ready word (to 0) when a transfer ends and when
/// it joins or leaves, and a sender publishes `READY_PREPARED` only once
/// its receiver's word is no "go" ([`is_go`]): so a go left from the
/// previous transfer of the same pair never starts the next one.
pub const READY_PREPARED: u64 = 2;

/// Ready word of a member of an all-pairs exchange
/// (`probe::Workload::ShmemExchange`) whose inbound rings are clean and
/// whose payload is prepared: its peers may send to it. Every member sets
/// it, waits until each peer shows it too, and clears its word (to 0) when
/// its exchange ends, which is after every peer has started.
pub const READY_EXCHANGE: u64 = 4;

/// Whether a ready word is a receiver's "go" ([`ready_go`]) of some round.
pub const fn is_go(v: u64) -> bool {
    v > 0x100
}

/// Ready word of a receiver that started round `round` (from 1) of a
/// transfer.
pub const fn ready_go(round: u64) -> u64 {
    0x100 + round
}

/// State of a member in the member table.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemberState {
    /// Nobody has joined in this slot.
    Absent = 0,
    /// Joined and running.
    Alive = 1,
    /// Left or died (written by its VMM, or by a peer that saw its
    /// heartbeat stop).
    Gone = 2,
    /// Left after finishing its transfers, and may join again (a guest
    /// tool that runs one command per process). A peer waiting for a new
    /// transfer keeps waiting; a transfer under way treats it as gone.
    Idle = 3,
}

impl MemberState {
    fn from_u32(v: u32) -> Option<Self> {
        match v {
            0 => Some(Self::Absent),
            1 => Some(Self::Alive),
            2 => Some(Self::Gone),
            3 => Some(Self::Idle),
            _ => None,
        }
    }
}

/// Everything that can go wrong with a region or a ring.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingError {
    /// The region is too small for the requested geometry.
    RegionTooSmall {
        /// Bytes needed.
        needed: u64,
        /// Bytes available.
        have: u64,
    },
    /// Bad geometry (members out of range, ring size not a power of two).
    BadGeometry,
    /// The header's magic or version does not match.
    NotInitialized,
    /// A member index out of range, or sending to oneself.
    BadMember(u32),
    /// The peer's index is impossible: ahead of ours by more than the
    /// capacity, or misaligned. Carries the value read.
    CorruptIndex(u64),
    /// A frame header announces a length that cannot be in the ring.
    CorruptLength(u32),
    /// The payload does not match its checksum.
    BadChecksum {
        /// Sequence number of the frame.
        seq: u32,
    },
    /// A frame arrived out of order (lost, duplicated or forged).
    BadSequence {
        /// Expected sequence number.
        expected: u32,
        /// Sequence number found.
        found: u32,
    },
    /// The message does not fit in an empty ring, or the receive buffer is
    /// too small for the next frame (needed bytes given).
    TooLarge(u64),
    /// The peer left or died.
    PeerGone(u32),
    /// The region header cannot be written here (a guest formatting a
    /// region whose VMM maps the header read-only).
    NotWritable,
}

impl core::fmt::Display for RingError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            RingError::RegionTooSmall { needed, have } => {
                write!(f, "region too small: {have} bytes, {needed} needed")
            }
            RingError::BadGeometry => write!(f, "bad ring geometry in the region header"),
            RingError::NotInitialized => write!(f, "region not formatted (no intervm ring header)"),
            RingError::BadMember(m) => write!(f, "no member {m} in this region"),
            RingError::CorruptIndex(v) => write!(f, "corrupt ring index {v:#x} (peer misbehaves)"),
            RingError::CorruptLength(l) => write!(f, "corrupt frame length {l} (peer misbehaves)"),
            RingError::BadChecksum { seq } => write!(f, "frame {seq} fails its checksum"),
            RingError::BadSequence { expected, found } => {
                write!(f, "frame {found} arrived where {expected} was expected")
            }
            RingError::TooLarge(n) => write!(f, "message of {n} bytes does not fit"),
            RingError::PeerGone(m) => write!(f, "peer {m} is gone"),
            RingError::NotWritable => write!(
                f,
                "the region header is read-only here (its VMM formats the region itself)"
            ),
        }
    }
}

impl core::error::Error for RingError {}

impl RingError {
    /// A small stable number for reporting errors through a port or exit code.
    pub fn code(&self) -> u64 {
        match self {
            RingError::RegionTooSmall { .. } => 1,
            RingError::BadGeometry => 2,
            RingError::NotInitialized => 3,
            RingError::BadMember(_) => 4,
            RingError::CorruptIndex(_) => 5,
            RingError::CorruptLength(_) => 6,
            RingError::BadChecksum { .. } => 7,
            RingError::BadSequence { .. } => 8,
            RingError::TooLarge(_) => 9,
            RingError::PeerGone(_) => 10,
            RingError::NotWritable => 11,
        }
    }
}

/// The geometry of a region, as read from (or written to) its header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// Number of member slots.
    pub members: u32,
    /// Data bytes per ring (power of two).
    pub ring_bytes: u64,
    /// Offset of the first member's section (page aligned, at least
    /// [`HEADER_BYTES`]).
    pub ring_base: u64,
}

impl Geometry {
    /// Distance between consecutive rings of a section.
    pub const fn ring_stride(&self) -> u64 {
        (RING_HEADER_BYTES + self.ring_bytes).next_multiple_of(4096)
    }

    /// Number of rings (one per ordered pair).
    pub const fn ring_count(&self) -> u64 {
        self.members as u64 * (self.members as u64).saturating_sub(1)
    }

    /// Size of one member's section: its entry, its ends of the rings
    /// towards it, and the rings it produces.
    pub const fn section_bytes(&self) -> u64 {
        SECTION_HEADER_BYTES + (self.members as u64).saturating_sub(1) * self.ring_stride()
    }

    /// Region bytes this geometry needs: up to the end of its last section.
    pub const fn region_bytes(&self) -> u64 {
        self.ring_base + self.members as u64 * self.section_bytes()
    }

    /// Where member `m`'s section lies in the region (`None` for a member
    /// out of range): everything `m` writes, and nothing another member
    /// writes.
    pub fn section(&self, m: u32) -> Option<core::ops::Range<u64>> {
        (m < self.members).then(|| {
            let start = self.ring_base + m as u64 * self.section_bytes();
            start..start + self.section_bytes()
        })
    }

    /// The parts of the region member `m`'s guest must only read: the
    /// header page and every other member's section (page aligned, in
    /// order; some may be empty). A VMM maps them read-only into `m`'s
    /// guest and the rest (`m`'s section, and the application pages
    /// between the header and the sections) writable. All of it, for a
    /// member out of range.
    pub fn guest_read_only(&self, m: u32) -> [core::ops::Range<u64>; 3] {
        let end = self.region_bytes();
        match self.section(m) {
            Some(own) => [0..HEADER_BYTES, self.ring_base..own.start, own.end..end],
            None => [0..end, 0..0, 0..0],
        }
    }

    /// Rings of `ring_bytes` data bytes each (a power of two, at least
    /// [`MIN_RING_BYTES`]) for `members`, their sections ending at the
    /// last page of a region of `region_bytes`; the pages between the
    /// header and the first section are not used by the ring protocol.
    pub fn at_end(members: u32, region_bytes: u64, ring_bytes: u64) -> Result<Self, RingError> {
        if !(2..=MAX_MEMBERS).contains(&members)
            || !ring_bytes.is_power_of_two()
            || ring_bytes < MIN_RING_BYTES
        {
            return Err(RingError::BadGeometry);
        }
        let mut geo = Geometry {
            members,
            ring_bytes,
            ring_base: HEADER_BYTES,
        };
        let sections = geo.checked_sections().ok_or(RingError::BadGeometry)?;
        let needed = HEADER_BYTES.saturating_add(sections);
        if needed > region_bytes {
            return Err(RingError::RegionTooSmall {
                needed,
                have: region_bytes,
            });
        }
        geo.ring_base = (region_bytes - sections) / 4096 * 4096;
        Ok(geo)
    }

    /// Largest payload one frame can carry.
    pub const fn max_payload(&self) -> u64 {
        self.ring_bytes - FRAME_HEADER_BYTES
    }

    /// The largest ring size that fits `members` into `region_bytes`.
    pub fn fit(members: u32, region_bytes: u64) -> Result<Self, RingError> {
        if !(2..=MAX_MEMBERS).contains(&members) {
            return Err(RingError::BadGeometry);
        }
        let rings = members as u64 * (members as u64 - 1);
        let per = region_bytes.saturating_sub(HEADER_BYTES) / rings;
        let mut ring_bytes = 1u64 << (63 - per.max(1).leading_zeros());
        let with = |ring_bytes| Geometry {
            members,
            ring_bytes,
            ring_base: HEADER_BYTES,
        };
        while ring_bytes >= MIN_RING_BYTES && with(ring_bytes).region_bytes() > region_bytes {
            ring_bytes /= 2;
        }
        if ring_bytes < MIN_RING_BYTES {
            return Err(RingError::RegionTooSmall {
                needed: with(MIN_RING_BYTES).region_bytes(),
                have: region_bytes,
            });
        }
        Ok(with(ring_bytes))
    }

    /// Bytes of all sections together, `None` on overflow (a header's
    /// values are not trusted).
    fn checked_sections(&self) -> Option<u64> {
        (self.members as u64 - 1)
            .checked_mul(self.ring_bytes.checked_add(RING_HEADER_BYTES + 4095)? / 4096 * 4096)
            .and_then(|r| r.checked_add(SECTION_HEADER_BYTES))
            .and_then(|s| s.checked_mul(self.members as u64))
    }

    /// [`Geometry::region_bytes`], `None` on overflow.
    fn checked_region_bytes(&self) -> Option<u64> {
        self.checked_sections()
            .and_then(|s| s.checked_add(self.ring_base))
    }

    /// Which of `from`'s rings goes to `to` (rings to every member but
    /// itself, in member order).
    fn ring_slot(&self, from: u32, to: u32) -> Result<u64, RingError> {
        if from >= self.members {
            return Err(RingError::BadMember(from));
        }
        if to >= self.members || to == from {
            return Err(RingError::BadMember(to));
        }
        Ok(if to < from { to } else { to - 1 } as u64)
    }
}

/// A mapped region. All accesses go through raw pointers; the region may be
/// written concurrently by other VMs.
#[derive(Clone, Copy, Debug)]
pub struct Region {
    base: *mut u8,
    len: u64,
}

// SAFETY: Region is a pointer to shared memory accessed only with atomics
// and raw copies; moving it between threads is as safe as the mapping.
unsafe impl Send for Region {}
// SAFETY: as above; all shared state is accessed atomically or copied.
unsafe impl Sync for Region {}

impl Region {
    /// Wraps `len` bytes at `base`.
    ///
    /// # Safety
    /// `base..base+len` must be mapped readable and writable, `base` 8-byte
    /// aligned (a mapping's page alignment is more than enough), for as long as the `Region` (and anything made from it) is used.
    pub unsafe fn new(base: *mut u8, len: u64) -> Self {
        Self { base, len }
    }

    /// Region size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for a zero-sized region.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn u64_at(&self, off: u64) -> &AtomicU64 {
        debug_assert!(off + 8 <= self.len && off.is_multiple_of(8));
        // SAFETY: every caller passes an offset checked against the
        // geometry, which was checked against `len` (`holds`); alignment
        // holds since the base is 8-byte aligned and offsets are multiples
        // of 8.
        unsafe { &*(self.base.add(off as usize) as *const AtomicU64) }
    }

    fn u32_at(&self, off: u64) -> &AtomicU32 {
        debug_assert!(off + 4 <= self.len && off.is_multiple_of(4));
        // SAFETY: as for `u64_at`.
        unsafe { &*(self.base.add(off as usize) as *const AtomicU32) }
    }

    /// Stores 0 in the `len` bytes at `off` (multiples of 8, inside the
    /// region: the callers' offsets come from a checked geometry).
    fn zero(&self, off: u64, len: u64) {
        for word in (off..off + len).step_by(8) {
            self.u64_at(word).store(0, Ordering::Relaxed);
        }
    }

    /// Writes a fresh header for `geo` (host side, before any member runs).
    /// Rings start empty and every member slot `Absent`.
    pub fn init(&self, geo: Geometry) -> Result<(), RingError> {
        self.holds(&geo)?;
        self.u64_at(OFF_MAGIC).store(0, Ordering::SeqCst);
        if self.u64_at(OFF_MAGIC).load(Ordering::SeqCst) != 0 {
            // The store was dropped: a guest whose VMM maps the header
            // read-only. Nothing else is touched (its own section would
            // be, and its peers would see its rings reset).
            return Err(RingError::NotWritable);
        }
        self.u32_at(OFF_VERSION)
            .store(REGION_VERSION, Ordering::Relaxed);
        self.u32_at(OFF_MEMBERS)
            .store(geo.members, Ordering::Relaxed);
        self.u64_at(OFF_RING_BYTES)
            .store(geo.ring_bytes, Ordering::Relaxed);
        self.u64_at(OFF_RING_STRIDE)
            .store(geo.ring_stride(), Ordering::Relaxed);
        self.u64_at(OFF_REGION_SIZE)
            .store(self.len, Ordering::Relaxed);
        self.u64_at(OFF_RING_BASE)
            .store(geo.ring_base, Ordering::Relaxed);
        // Each member's entry and ends of its inbound rings, and the
        // producer header of each of its rings: all zero (absent, empty).
        for m in 0..geo.members {
            let Some(section) = geo.section(m) else {
                continue;
            };
            self.zero(section.start, SECTION_HEADER_BYTES);
            for slot in 0..geo.members as u64 - 1 {
                let ring = section.start + SECTION_HEADER_BYTES + slot * geo.ring_stride();
                self.zero(ring, RING_HEADER_BYTES);
            }
        }
        self.u64_at(OFF_MAGIC)
            .store(REGION_MAGIC, Ordering::Release);
        Ok(())
    }

    /// The layout version of an intervm header, whatever it is (`None`
    /// without the magic), e.g. to name the version of a region that
    /// [`Region::geometry`] refuses as not formatted.
    pub fn formatted_version(&self) -> Option<u32> {
        (self.len >= HEADER_BYTES && self.u64_at(OFF_MAGIC).load(Ordering::Acquire) == REGION_MAGIC)
            .then(|| self.u32_at(OFF_VERSION).load(Ordering::Relaxed))
    }

    /// Reads and checks the header (guest side). Never trusts it beyond
    /// what fits in this mapping.
    pub fn geometry(&self) -> Result<Geometry, RingError> {
        if self.len < HEADER_BYTES {
            return Err(RingError::RegionTooSmall {
                needed: HEADER_BYTES,
                have: self.len,
            });
        }
        if self.u64_at(OFF_MAGIC).load(Ordering::Acquire) != REGION_MAGIC
            || self.u32_at(OFF_VERSION).load(Ordering::Relaxed) != REGION_VERSION
        {
            return Err(RingError::NotInitialized);
        }
        let geo = Geometry {
            members: self.u32_at(OFF_MEMBERS).load(Ordering::Relaxed),
            ring_bytes: self.u64_at(OFF_RING_BYTES).load(Ordering::Relaxed),
            ring_base: self.u64_at(OFF_RING_BASE).load(Ordering::Relaxed),
        };
        if geo.ring_bytes > self.len {
            return Err(RingError::BadGeometry);
        }
        self.holds(&geo)?;
        Ok(geo)
    }

    /// Checks that this region can hold `geo`, so that every offset the
    /// accessors compute from it lies inside the mapping. Every method
    /// taking a [`Geometry`] checks it: its fields are public, and a wrong
    /// one must be an error, never an access outside the region.
    fn holds(&self, geo: &Geometry) -> Result<(), RingError> {
        if !(2..=MAX_MEMBERS).contains(&geo.members)
            || !geo.ring_bytes.is_power_of_two()
            || geo.ring_bytes < MIN_RING_BYTES
            || geo.ring_base < HEADER_BYTES
            || !geo.ring_base.is_multiple_of(4096)
        {
            return Err(RingError::BadGeometry);
        }
        match geo.checked_region_bytes() {
            Some(n) if n <= self.len => Ok(()),
            n => Err(RingError::RegionTooSmall {
                needed: n.unwrap_or(u64::MAX),
                have: self.len,
            }),
        }
    }

    fn member_off(&self, geo: &Geometry, m: u32) -> Result<u64, RingError> {
        self.holds(geo)?;
        if m >= geo.members {
            return Err(RingError::BadMember(m));
        }
        Ok(geo.ring_base + m as u64 * geo.section_bytes())
    }

    /// Sets member `m`'s state.
    pub fn set_member_state(
        &self,
        geo: &Geometry,
        m: u32,
        s: MemberState,
    ) -> Result<(), RingError> {
        let off = self.member_off(geo, m)?;
        self.u32_at(off + MEMBER_STATE)
            .store(s as u32, Ordering::SeqCst);
        Ok(())
    }

    /// Member `m`'s state (an unknown value reads as `Gone`).
    pub fn member_state(&self, geo: &Geometry, m: u32) -> Result<MemberState, RingError> {
        let off = self.member_off(geo, m)?;
        Ok(
            MemberState::from_u32(self.u32_at(off + MEMBER_STATE).load(Ordering::SeqCst))
                .unwrap_or(MemberState::Gone),
        )
    }

    /// Stores member `m`'s heartbeat (its VMM writes a clock value).
    pub fn set_heartbeat(&self, geo: &Geometry, m: u32, v: u64) -> Result<(), RingError> {
        let off = self.member_off(geo, m)?;
        self.u64_at(off + MEMBER_HEARTBEAT)
            .store(v, Ordering::Release);
        Ok(())
    }

    /// Member `m`'s heartbeat.
    pub fn heartbeat(&self, geo: &Geometry, m: u32) -> Result<u64, RingError> {
        let off = self.member_off(geo, m)?;
        Ok(self.u64_at(off + MEMBER_HEARTBEAT).load(Ordering::Acquire))
    }

    /// Sets member `m`'s ready word: a guest-defined value its peers can
    /// wait for (the probe uses it as a start line for timed transfers).
    pub fn set_ready(&self, geo: &Geometry, m: u32, v: u64) -> Result<(), RingError> {
        let off = self.member_off(geo, m)?;
        self.u64_at(off + MEMBER_READY).store(v, Ordering::SeqCst);
        Ok(())
    }

    /// Member `m`'s ready word.
    pub fn ready(&self, geo: &Geometry, m: u32) -> Result<u64, RingError> {
        let off = self.member_off(geo, m)?;
        Ok(self.u64_at(off + MEMBER_READY).load(Ordering::SeqCst))
    }

    /// Whether a sender may publish [`READY_PREPARED`] to receiver `m`:
    /// `m` shows no "go" left from an earlier transfer, or is not (yet)
    /// alive and will clear its word when it joins.
    pub fn may_prepare_for(&self, geo: &Geometry, m: u32) -> bool {
        !self.ready(geo, m).is_ok_and(is_go) || self.member_state(geo, m) != Ok(MemberState::Alive)
    }

    /// Starts a new incarnation of member `m` (its VMM joins, again or for
    /// the first time) and returns its number. Peers watching the member
    /// with a [`Liveness`] see an incarnation change as "the one they
    /// talked to is gone", even when the new one is alive and beating:
    /// a member killed and restarted is never taken for the same member
    /// resuming.
    ///
    /// Clears the member's ready word first: a "prepared" the previous
    /// incarnation left (it was killed mid-transfer) is gone before the
    /// new number shows, so a peer that saw the number change never takes
    /// that leftover for the new incarnation's.
    pub fn begin_incarnation(&self, geo: &Geometry, m: u32) -> Result<u64, RingError> {
        let off = self.member_off(geo, m)?;
        self.u64_at(off + MEMBER_READY).store(0, Ordering::SeqCst);
        Ok(self
            .u64_at(off + MEMBER_INCARNATION)
            .fetch_add(1, Ordering::SeqCst)
            .wrapping_add(1))
    }

    /// Member `m`'s incarnation: how many times it joined since the region
    /// was formatted.
    pub fn incarnation(&self, geo: &Geometry, m: u32) -> Result<u64, RingError> {
        let off = self.member_off(geo, m)?;
        Ok(self.u64_at(off + MEMBER_INCARNATION).load(Ordering::SeqCst))
    }

    /// Publishes member `m`'s doorbell peer ID (its ivshmem IVPosition), so
    /// peers can ring it even when an ivshmem server picked the IDs.
    pub fn set_doorbell_id(&self, geo: &Geometry, m: u32, id: u16) -> Result<(), RingError> {
        let off = self.member_off(geo, m)?;
        self.u64_at(off + MEMBER_DOORBELL)
            .store(id as u64 + 1, Ordering::SeqCst);
        Ok(())
    }

    /// Member `m`'s doorbell peer ID, once it published one.
    pub fn doorbell_id(&self, geo: &Geometry, m: u32) -> Result<Option<u16>, RingError> {
        let off = self.member_off(geo, m)?;
        let v = self.u64_at(off + MEMBER_DOORBELL).load(Ordering::SeqCst);
        Ok((1..=0x1_0000).contains(&v).then(|| (v - 1) as u16))
    }

    /// Byte offset of the ring `from -> to`: its producer header, followed
    /// by its data, in `from`'s section.
    pub fn ring_offset(&self, geo: &Geometry, from: u32, to: u32) -> Result<u64, RingError> {
        let slot = geo.ring_slot(from, to)?;
        Ok(self.member_off(geo, from)? + SECTION_HEADER_BYTES + slot * geo.ring_stride())
    }

    /// Byte offset of the consumer's end of the ring `from -> to` (its
    /// tail line, then its flag line), in `to`'s section.
    pub fn consumer_offset(&self, geo: &Geometry, from: u32, to: u32) -> Result<u64, RingError> {
        geo.ring_slot(from, to)?;
        Ok(self.member_off(geo, to)? + INBOUND_BASE + from as u64 * INBOUND_STRIDE)
    }

    /// Ring `from -> to` as an onlooker sees it (a monitor, a test waiting
    /// for a transfer to reach some point): its indices and sleep
    /// declarations, read from shared memory as they are, unchecked.
    pub fn ring_state(&self, geo: &Geometry, from: u32, to: u32) -> Result<RingState, RingError> {
        let ring = self.ring_ref(*geo, from, to)?;
        Ok(RingState {
            head: ring.head().load(Ordering::Acquire),
            tail: ring.tail().load(Ordering::Acquire),
            producer_sleeping: is_sleeping(ring.producer_flags()),
            consumer_sleeping: is_sleeping(ring.consumer_flags()),
        })
    }

    /// The sending end of ring `from -> to`. Resumes from the ring's current
    /// head (the producer's own index).
    pub fn producer(&self, geo: Geometry, from: u32, to: u32) -> Result<Producer, RingError> {
        let ring = self.ring_ref(geo, from, to)?;
        let head = ring.head().load(Ordering::Acquire);
        Ok(Producer {
            ring,
            head,
            // Nothing known free yet: the first send looks at the tail.
            tail_seen: head.wrapping_sub(geo.ring_bytes),
            seq: 0,
            peer: to,
            gen: 0,
            answered: 0,
            sleep_taken: 0,
        })
    }

    /// The receiving end of ring `from -> to`.
    pub fn consumer(&self, geo: Geometry, from: u32, to: u32) -> Result<Consumer, RingError> {
        let ring = self.ring_ref(geo, from, to)?;
        let tail = ring.tail().load(Ordering::Acquire);
        Ok(Consumer {
            ring,
            tail,
            seq: 0,
            peer: from,
            gen: 0,
            waiting: None,
            sleep_taken: 0,
        })
    }

    /// Where the two halves of ring `from -> to` lie.
    fn ring_ref(&self, geo: Geometry, from: u32, to: u32) -> Result<RingRef, RingError> {
        Ok(RingRef {
            region: *self,
            off: self.ring_offset(&geo, from, to)?,
            cons: self.consumer_offset(&geo, from, to)?,
            geo,
        })
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::vec;
    use std::vec::Vec;

    struct Mem(Vec<u64>);
    impl Mem {
        fn new(bytes: usize) -> Self {
            Mem(vec![0u64; bytes / 8])
        }
        fn region(&mut self) -> Region {
            // SAFETY: the Vec outlives the region in each test; u64 storage
            // gives 8-byte alignment, which is all the ring code relies on here.
            unsafe { Region::new(self.0.as_mut_ptr() as *mut u8, (self.0.len() * 8) as u64) }
        }
    }

    fn setup(members: u32, bytes: usize) -> (Mem, Region, Geometry) {
        let mut m = Mem::new(bytes);
        let r = m.region();
        let geo = Geometry::fit(members, bytes as u64).unwrap();
        r.init(geo).unwrap();
        (m, r, geo)
    }

    #[test]
    fn indices_near_the_top_of_u64_wrap_instead_of_overflowing() {
        // A peer may leave any index in shared memory; a ring resumed from
        // one just below 2^64 must wrap (no overflow panic in debug builds).
        let (_m, r, geo) = setup(2, 1 << 16);
        let off = r.ring_offset(&geo, 0, 1).unwrap();
        let cons = r.consumer_offset(&geo, 0, 1).unwrap();
        let top = u64::MAX - 7;
        r.u64_at(off + RING_HEAD).store(top, Ordering::SeqCst);
        r.u64_at(cons + RING_TAIL).store(top, Ordering::SeqCst);
        let mut p = r.producer(geo, 0, 1).unwrap();
        let mut c = r.consumer(geo, 0, 1).unwrap();
        for i in 0..4u8 {
            let msg = [i; 40];
            p.try_send(&msg).unwrap().unwrap();
            let mut out = [0u8; 64];
            let (n, _) = c.try_recv(&mut out).unwrap().unwrap();
            assert_eq!(&out[..n], &msg[..]);
        }
    }

    #[test]
    fn a_restarted_producer_carries_on_after_the_consumer_drops_what_its_last_life_left() {
        let (_m, r, geo) = setup(2, 1 << 16);
        // A first life of member 0 sends three frames and dies; the
        // consumer took one.
        assert_eq!(r.begin_incarnation(&geo, 0), Ok(1));
        let mut live = Liveness::new(&r, &geo, 0, 1000, 0);
        let mut old = r.producer(geo, 0, 1).unwrap();
        let mut c = r.consumer(geo, 0, 1).unwrap();
        for i in 0..3u8 {
            old.try_send(&[i; 24]).unwrap().unwrap();
        }
        let mut out = [0u8; 64];
        assert_eq!(c.try_recv(&mut out).unwrap().map(|x| x.0), Some(24));
        assert_eq!(live.check(&r, &geo, 1), Ok(()));
        // Its next life joins: alive, beating, but not the one watched.
        r.set_member_state(&geo, 0, MemberState::Alive).unwrap();
        assert_eq!(r.begin_incarnation(&geo, 0), Ok(2));
        r.set_heartbeat(&geo, 0, 77).unwrap();
        assert!(live.rejoined(&r, &geo));
        assert_eq!(live.check(&r, &geo, 2), Err(RingError::PeerGone(0)));
        // Without dropping, the new life's first frame (sequence 0) would
        // follow the old life's leftovers.
        let mut new = r.producer(geo, 0, 1).unwrap();
        assert_eq!(c.drop_stale(), Ok(2 * frame_bytes(24)));
        assert_eq!(c.available(), Ok(0));
        let live = Liveness::new(&r, &geo, 0, 1000, 3);
        assert_eq!(live.incarnation(), 2);
        new.try_send(&[9; 40]).unwrap().unwrap();
        let (n, _) = c.try_recv(&mut out).unwrap().unwrap();
        assert_eq!(&out[..n], &[9; 40][..]);
        // A head a crashed producer left unaligned is refused, any aligned
        // one taken (the ring starts clean from there).
        let off = r.ring_offset(&geo, 0, 1).unwrap();
        r.u64_at(off + RING_HEAD).store(12_345, Ordering::SeqCst);
        assert_eq!(c.drop_stale(), Err(RingError::CorruptIndex(12_345)));
        r.u64_at(off + RING_HEAD).store(1 << 40, Ordering::SeqCst);
        assert!(c.drop_stale().is_ok());
        assert_eq!(c.available(), Ok(0));
    }

    #[test]
    fn a_watch_begun_before_the_peer_joined_follows_its_first_incarnation() {
        let (_m, r, geo) = setup(2, 1 << 16);
        let mut live = Liveness::new(&r, &geo, 0, 1000, 0);
        assert!(!live.rejoined(&r, &geo));
        assert!(!live.is_pinned());
        r.begin_incarnation(&geo, 0).unwrap();
        r.set_member_state(&geo, 0, MemberState::Alive).unwrap();
        r.set_heartbeat(&geo, 0, 5).unwrap();
        assert!(!live.rejoined(&r, &geo), "its first join is no rejoin");
        // Not pinned yet: had the first incarnation died and a second
        // joined before the check below, the check would adopt the second.
        assert!(!live.is_pinned());
        assert!(Liveness::new(&r, &geo, 0, 1000, 0).is_pinned());
        assert_eq!(live.check(&r, &geo, 1), Ok(()));
        assert_eq!(live.incarnation(), 1);
        r.begin_incarnation(&geo, 0).unwrap();
        assert!(live.rejoined(&r, &geo));
        assert_eq!(live.check(&r, &geo, 2), Err(RingError::PeerGone(0)));
    }

    #[test]
    fn geometry_fits_the_region() {
        let g = Geometry::fit(2, 1 << 20).unwrap();
        assert!(g.region_bytes() <= 1 << 20);
        assert!(g.ring_bytes >= 256 << 10);
        let g4 = Geometry::fit(4, 1 << 20).unwrap();
        assert_eq!(g4.ring_count(), 12);
        assert!(g4.region_bytes() <= 1 << 20);
        assert!(matches!(
            Geometry::fit(16, 64 << 10),
            Err(RingError::RegionTooSmall { .. })
        ));
        assert_eq!(Geometry::fit(1, 1 << 20), Err(RingError::BadGeometry));
        assert_eq!(g4.ring_slot(1, 1), Err(RingError::BadMember(1)));
        assert_eq!(g4.ring_slot(3, 2).unwrap(), 2);
        assert_eq!(g4.ring_slot(1, 3).unwrap(), 2);
    }

    #[test]
    fn a_geometry_the_region_cannot_hold_is_an_error_not_an_access_outside_it() {
        let (_m, r, good) = setup(2, 1 << 16);
        let too_big = Geometry {
            ring_bytes: 1 << 20,
            ..good
        };
        let none = Geometry { members: 0, ..good };
        let odd = Geometry {
            ring_base: HEADER_BYTES + 8,
            ..good
        };
        for (geo, want) in [
            (too_big, "region too small"),
            (none, "no member"),
            (odd, "geometry"),
        ] {
            let e = std::string::ToString::to_string(&r.producer(geo, 0, 1).err().unwrap());
            assert!(e.contains(want), "{geo:?}: {e}");
            assert!(r.consumer(geo, 0, 1).is_err());
            assert!(r.ring_state(&geo, 0, 1).is_err());
            assert!(r.set_heartbeat(&geo, 1, 7).is_err());
            assert!(r.begin_incarnation(&geo, 1).is_err());
        }
        assert_eq!(none.ring_count(), 0);
        assert!(r.producer(good, 0, 1).is_ok());
    }

    #[test]
    fn each_member_writes_only_inside_its_own_section() {
        let (_m, r, geo) = setup(4, 1 << 20);
        let sections: Vec<_> = (0..4).map(|m| geo.section(m).unwrap()).collect();
        assert_eq!(sections[0].start, HEADER_BYTES);
        assert_eq!(sections[3].end, geo.region_bytes());
        assert!(sections.windows(2).all(|w| w[0].end == w[1].start));
        assert_eq!(geo.section(4), None);
        for from in 0..4 {
            for to in (0..4).filter(|&t| t != from) {
                // The producer's header and data lie in its section, the
                // consumer's end in the consumer's.
                let ring = r.ring_offset(&geo, from, to).unwrap();
                assert!(sections[from as usize].contains(&ring));
                assert!(sections[from as usize].contains(&(ring + geo.ring_stride() - 1)));
                let cons = r.consumer_offset(&geo, from, to).unwrap();
                assert!(sections[to as usize].contains(&cons));
                assert!(cons + 128 <= sections[to as usize].start + SECTION_HEADER_BYTES);
            }
            // What the member's guest may not write is everything but its
            // section (and nothing of the region beyond its sections).
            let ro = geo.guest_read_only(from);
            let own = &sections[from as usize];
            for off in (0..geo.region_bytes()).step_by(4096) {
                let protected = ro.iter().any(|p| p.contains(&off));
                assert_eq!(
                    protected,
                    !own.contains(&off),
                    "member {from}, page {off:#x}"
                );
            }
            assert!(ro.iter().all(|p| p.start % 4096 == 0 && p.end % 4096 == 0));
        }
        assert_eq!(geo.guest_read_only(9)[0], 0..geo.region_bytes());
        // A ring from 1 to 2 written by 1 and read by 2 touches nothing in
        // the sections of 0 and 3.
        let before: Vec<u64> = (sections[0].clone())
            .chain(sections[3].clone())
            .step_by(8)
            .map(|o| r.u64_at(o).load(Ordering::SeqCst))
            .collect();
        let mut p = r.producer(geo, 1, 2).unwrap();
        let mut c = r.consumer(geo, 1, 2).unwrap();
        let mut out = [0u8; 512];
        for i in 0..200u32 {
            p.try_send(&[i as u8; 300]).unwrap().unwrap();
            c.declare_sleep();
            assert!(p.take_consumer_sleep());
            c.awake();
            c.try_recv(&mut out).unwrap().unwrap();
        }
        let after: Vec<u64> = (sections[0].clone())
            .chain(sections[3].clone())
            .step_by(8)
            .map(|o| r.u64_at(o).load(Ordering::SeqCst))
            .collect();
        assert!(before == after);
    }

    #[test]
    fn rings_of_a_chosen_size_end_at_the_region_end_and_carry_data() {
        let len = 1u64 << 20;
        let geo = Geometry::at_end(3, len, 16 << 10).unwrap();
        assert_eq!(geo.region_bytes(), len, "the last ring ends at the end");
        // Three sections of a page and two rings of 16 KiB + 128 bytes.
        let section = 4096 + 2 * (20 << 10);
        assert_eq!(geo.section_bytes(), section);
        assert_eq!(geo.ring_base, len - 3 * section);
        assert_eq!(
            Geometry::at_end(3, len, 256 << 10),
            Err(RingError::RegionTooSmall {
                needed: HEADER_BYTES + 3 * (4096 + 2 * (260 << 10)),
                have: len
            })
        );
        assert_eq!(Geometry::at_end(3, len, 3000), Err(RingError::BadGeometry));
        let mut m = Mem::new(len as usize);
        let r = m.region();
        r.init(geo).unwrap();
        assert_eq!(r.geometry(), Ok(geo));
        // The last ring, 2 -> 1, is the region's last bytes.
        assert_eq!(r.ring_offset(&geo, 2, 1).unwrap() + geo.ring_stride(), len);
        let mut p = r.producer(geo, 2, 1).unwrap();
        let mut c = r.consumer(geo, 2, 1).unwrap();
        let (mut out, msg) = ([0u8; 4096], [7u8; 4000]);
        for _ in 0..20 {
            p.try_send(&msg).unwrap().unwrap();
            let (n, _) = c.try_recv(&mut out).unwrap().unwrap();
            assert_eq!(&out[..n], &msg[..]);
        }
        // A header that puts its rings where they cannot be is refused.
        for (base, e) in [
            (4096 + 8, RingError::BadGeometry),
            (0, RingError::BadGeometry),
            (
                len,
                RingError::RegionTooSmall {
                    needed: len + 3 * section,
                    have: len,
                },
            ),
            (
                u64::MAX / 4096 * 4096,
                RingError::RegionTooSmall {
                    needed: u64::MAX,
                    have: len,
                },
            ),
        ] {
            r.u64_at(OFF_RING_BASE).store(base, Ordering::SeqCst);
            assert_eq!(r.geometry(), Err(e), "ring base {base:#x}");
        }
    }

    #[test]
    fn uninitialised_or_lying_headers_are_refused() {
        let mut m = Mem::new(1 << 16);
        let r = m.region();
        assert_eq!(r.geometry(), Err(RingError::NotInitialized));
        assert_eq!(r.formatted_version(), None);
        let geo = Geometry::fit(2, 1 << 16).unwrap();
        r.init(geo).unwrap();
        assert_eq!(r.geometry(), Ok(geo));
        assert_eq!(r.formatted_version(), Some(REGION_VERSION));
        // Another layout version is not read as this one.
        r.u32_at(OFF_VERSION).store(2, Ordering::SeqCst);
        assert_eq!(r.geometry(), Err(RingError::NotInitialized));
        assert_eq!(r.formatted_version(), Some(2));
        r.u32_at(OFF_VERSION)
            .store(REGION_VERSION, Ordering::SeqCst);
        // A member claims rings far larger than the mapping.
        r.u64_at(OFF_RING_BYTES).store(1 << 40, Ordering::SeqCst);
        assert_eq!(r.geometry(), Err(RingError::BadGeometry));
        r.u64_at(OFF_RING_BYTES).store(3 << 12, Ordering::SeqCst);
        assert_eq!(r.geometry(), Err(RingError::BadGeometry));
    }

    #[test]
    fn frames_round_trip_across_the_wrap() {
        let (_m, r, geo) = setup(2, 64 << 10);
        let mut p = r.producer(geo, 0, 1).unwrap();
        let mut c = r.consumer(geo, 0, 1).unwrap();
        let mut out = vec![0u8; geo.max_payload() as usize];
        let mut pos = 0u64;
        for i in 0..500u64 {
            let len = (i * 7919 % 9000 + 1) as usize;
            let mut msg = vec![0u8; len];
            fill_pattern(42, pos, &mut msg);
            let sent = p.try_send(&msg).unwrap().expect("room after draining");
            let (n, sum) = c.try_recv(&mut out).unwrap().expect("frame");
            assert_eq!((n, sum), (len, sent));
            assert_eq!(&out[..n], &msg[..]);
            pos += len as u64;
        }
        assert_eq!(c.try_recv(&mut out).unwrap(), None);
    }

    #[test]
    fn full_ring_applies_backpressure() {
        let (_m, r, geo) = setup(2, 7 * 4096);
        let mut p = r.producer(geo, 0, 1).unwrap();
        let msg = vec![1u8; 1000];
        let mut sent = 0;
        while p.try_send(&msg).unwrap().is_some() {
            sent += 1;
        }
        assert_eq!(sent, geo.ring_bytes / frame_bytes(1000));
        let mut c = r.consumer(geo, 0, 1).unwrap();
        let mut out = vec![0u8; 1000];
        c.try_recv(&mut out).unwrap().unwrap();
        assert!(
            p.try_send(&msg).unwrap().is_some(),
            "room again after one receive"
        );
        assert_eq!(
            p.try_send(&vec![0; geo.ring_bytes as usize]),
            Err(RingError::TooLarge(geo.ring_bytes))
        );
    }

    #[test]
    fn hostile_indices_lengths_and_payloads_are_detected() {
        let (_m, r, geo) = setup(2, 64 << 10);
        let off = r.ring_offset(&geo, 0, 1).unwrap();
        let mut c = r.consumer(geo, 0, 1).unwrap();
        let mut out = vec![0u8; 4096];
        // Head far ahead of tail.
        r.u64_at(off + RING_HEAD).store(1 << 40, Ordering::SeqCst);
        assert_eq!(c.try_recv(&mut out), Err(RingError::CorruptIndex(1 << 40)));
        // Misaligned head.
        r.u64_at(off + RING_HEAD).store(20, Ordering::SeqCst);
        assert_eq!(c.try_recv(&mut out), Err(RingError::CorruptIndex(20)));
        // A frame announcing more than is published.
        r.u64_at(off + RING_HEAD).store(0, Ordering::SeqCst);
        let mut p = r.producer(geo, 0, 1).unwrap();
        p.try_send(b"hello, peer").unwrap().unwrap();
        let data = off + RING_HEADER_BYTES;
        r.u32_at(data).store(60_000, Ordering::SeqCst);
        assert_eq!(c.try_recv(&mut out), Err(RingError::CorruptLength(60_000)));
        // Right length, flipped payload byte.
        r.u32_at(data).store(11, Ordering::SeqCst);
        let w = r.u64_at(data + 16);
        w.store(w.load(Ordering::SeqCst) ^ 1, Ordering::SeqCst);
        assert_eq!(c.try_recv(&mut out), Err(RingError::BadChecksum { seq: 0 }));
        // The producer refuses a tail that runs ahead of its head as soon
        // as it reads it: when the space it knows free runs out.
        r.u64_at(r.consumer_offset(&geo, 0, 1).unwrap() + RING_TAIL)
            .store(4096 * 1024, Ordering::SeqCst);
        let refused = (0..geo.ring_bytes).find_map(|_| p.try_send(b"x").err());
        assert!(
            matches!(refused, Some(RingError::CorruptIndex(_))),
            "{refused:?}"
        );
    }

    #[test]
    fn a_stale_go_holds_back_the_next_prepare() {
        let (_m, r, geo) = setup(2, 64 << 10);
        assert!(r.may_prepare_for(&geo, 1), "receiver not there yet");
        r.set_member_state(&geo, 1, MemberState::Alive).unwrap();
        r.set_ready(&geo, 1, ready_go(1)).unwrap();
        assert!(
            !r.may_prepare_for(&geo, 1),
            "its go is from the last transfer"
        );
        r.set_ready(&geo, 1, 0).unwrap();
        assert!(r.may_prepare_for(&geo, 1), "transfer over");
        r.set_ready(&geo, 1, ready_go(1)).unwrap();
        r.set_member_state(&geo, 1, MemberState::Idle).unwrap();
        assert!(
            r.may_prepare_for(&geo, 1),
            "left: clears its word on rejoin"
        );
    }

    #[test]
    fn sleep_declarations_are_taken_once() {
        let (_m, r, geo) = setup(2, 64 << 10);
        let mut p = r.producer(geo, 0, 1).unwrap();
        let mut c = r.consumer(geo, 0, 1).unwrap();
        assert!(!p.take_consumer_sleep(), "nobody sleeps yet");
        c.declare_sleep();
        p.try_send(b"x").unwrap().unwrap();
        let seen = r.ring_state(&geo, 0, 1).unwrap();
        assert!(seen.consumer_sleeping && !seen.producer_sleeping);
        assert_eq!((seen.head, seen.tail), (frame_bytes(1), 0));
        assert!(p.take_consumer_sleep(), "ring once");
        assert!(!p.take_consumer_sleep(), "and only once");
        // The declaration stays until the consumer wakes (the producer
        // writes nothing in the consumer's line); a new one rings again.
        assert!(r.ring_state(&geo, 0, 1).unwrap().consumer_sleeping);
        c.awake();
        assert!(!r.ring_state(&geo, 0, 1).unwrap().consumer_sleeping);
        c.declare_sleep();
        assert!(p.take_consumer_sleep(), "a new sleep, a new ring");
        c.awake();
        c.declare_sleep();
        c.awake();
        assert!(!p.take_consumer_sleep(), "withdrawn");
        p.declare_sleep();
        assert!(r.ring_state(&geo, 0, 1).unwrap().producer_sleeping);
        assert!(c.take_producer_sleep());
        assert!(!c.take_producer_sleep());
        assert_eq!(r.ring_state(&geo, 1, 1), Err(RingError::BadMember(1)));
    }

    #[test]
    fn no_wake_up_is_lost_between_two_threads() {
        // A consumer that sleeps (spins on a "doorbell" counter) only after
        // declaring and re-checking, against a producer that rings only
        // when it takes a declaration: every message arrives, no hang.
        use std::sync::atomic::AtomicU64 as Bell;
        use std::sync::Arc;
        let mut mem = Mem::new(64 << 10);
        let r = mem.region();
        let geo = Geometry::fit(2, 64 << 10).unwrap();
        r.init(geo).unwrap();
        let bell = Arc::new(Bell::new(0));
        const N: u64 = 200_000;
        let b2 = bell.clone();
        let consumer = std::thread::spawn(move || {
            let mut c = r.consumer(geo, 0, 1).unwrap();
            let mut out = [0u8; 64];
            let (mut got, mut seen, mut declared) = (0u64, 0u64, 0u64);
            while got < N {
                if c.try_recv(&mut out).unwrap().is_some() {
                    got += 1;
                    continue;
                }
                c.declare_sleep();
                declared += 1;
                if c.available().unwrap() > 0 {
                    c.awake();
                    continue;
                }
                let t0 = std::time::Instant::now();
                while b2.load(Ordering::SeqCst) == seen {
                    // Only a hang fails this (the producer thread may be
                    // descheduled for a while on a loaded host).
                    assert!(
                        t0.elapsed().as_secs() < 60,
                        "lost wake-up after {got} messages"
                    );
                    std::hint::spin_loop();
                }
                seen = b2.load(Ordering::SeqCst);
                c.awake();
            }
            declared
        });
        let mut p = r.producer(geo, 0, 1).unwrap();
        let mut rings = 0;
        for i in 0..N {
            while p.try_send(&i.to_le_bytes()).unwrap().is_none() {
                std::hint::spin_loop();
            }
            if p.take_consumer_sleep() {
                rings += 1;
                bell.fetch_add(1, Ordering::SeqCst);
            }
        }
        let declared = consumer.join().unwrap();
        assert!(rings <= declared, "a doorbell per declaration at most");
        drop(mem);
    }

    #[test]
    fn replayed_frames_break_the_sequence() {
        let (_m, r, geo) = setup(2, 64 << 10);
        let mut p = r.producer(geo, 0, 1).unwrap();
        let mut c = r.consumer(geo, 0, 1).unwrap();
        let mut out = vec![0u8; 64];
        p.try_send(b"first").unwrap().unwrap();
        c.try_recv(&mut out).unwrap().unwrap();
        // Rewind the tail by one frame: the same frame shows up again.
        let off = r.consumer_offset(&geo, 0, 1).unwrap();
        let mut c2 = r.consumer(geo, 0, 1).unwrap();
        c2.seq = 1;
        c2.tail = 0;
        r.u64_at(off + RING_TAIL).store(0, Ordering::SeqCst);
        assert_eq!(
            c2.try_recv(&mut out),
            Err(RingError::BadSequence {
                expected: 1,
                found: 0
            })
        );
    }

    #[test]
    fn liveness_reports_gone_and_stalled_peers() {
        let (_m, r, geo) = setup(3, 64 << 10);
        r.set_member_state(&geo, 1, MemberState::Alive).unwrap();
        let mut l = Liveness::new(&r, &geo, 1, 100, 0);
        assert_eq!(l.check(&r, &geo, 50), Ok(()));
        r.set_heartbeat(&geo, 1, 7).unwrap();
        assert_eq!(l.check(&r, &geo, 120), Ok(()), "heartbeat moved");
        assert_eq!(l.check(&r, &geo, 200), Ok(()));
        assert_eq!(
            l.check(&r, &geo, 221),
            Err(RingError::PeerGone(1)),
            "stalled 101 ms"
        );
        let mut l2 = Liveness::new(&r, &geo, 2, 1000, 0);
        r.set_member_state(&geo, 2, MemberState::Gone).unwrap();
        assert_eq!(l2.check(&r, &geo, 1), Err(RingError::PeerGone(2)));
        assert_eq!(r.member_state(&geo, 9), Err(RingError::BadMember(9)));
        // A member that finished and left is gone for a transfer under way,
        // and may come back: its state reads as Idle, not Gone.
        r.set_member_state(&geo, 2, MemberState::Idle).unwrap();
        assert_eq!(r.member_state(&geo, 2), Ok(MemberState::Idle));
        assert_eq!(l2.check(&r, &geo, 2), Err(RingError::PeerGone(2)));
    }

    #[test]
    fn threads_stream_a_checksummed_payload() {
        let (m, r, geo) = setup(2, 256 << 10);
        const TOTAL: u64 = 16 << 20;
        let sender = std::thread::spawn(move || {
            let mut p = r.producer(geo, 0, 1).unwrap();
            let mut buf = vec![0u8; 16 << 10];
            let (mut pos, mut stream) = (0u64, 0u64);
            while pos < TOTAL {
                let n = buf.len().min((TOTAL - pos) as usize);
                fill_pattern(7, pos, &mut buf[..n]);
                loop {
                    if let Some(sum) = p.try_send(&buf[..n]).unwrap() {
                        stream = fold(stream, sum);
                        break;
                    }
                    std::hint::spin_loop();
                }
                pos += n as u64;
            }
            stream
        });
        let mut c = r.consumer(geo, 0, 1).unwrap();
        let mut out = vec![0u8; 64 << 10];
        let mut expect = vec![0u8; 64 << 10];
        let (mut pos, mut stream) = (0u64, 0u64);
        while pos < TOTAL {
            if let Some((n, sum)) = c.try_recv(&mut out).unwrap() {
                fill_pattern(7, pos, &mut expect[..n]);
                assert_eq!(out[..n], expect[..n], "payload at {pos}");
                stream = fold(stream, sum);
                pos += n as u64;
            }
        }
        assert_eq!(sender.join().unwrap(), stream);
        drop(m);
    }
}
