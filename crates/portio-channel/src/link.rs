//! Where a device's messages go: a [`Link`] to the other members.
//!
//! [`RingLink`] is the real one: the intervm ring protocol over a shared
//! region (a memfd when every member is in one process, a `/dev/shm` object
//! across processes), one bounded queue per ordered pair of members, so
//! backpressure and message boundaries come from the ring and a member whose
//! VMM dies is seen through its heartbeat. Tests use fakes.

use intervm_protocol::ring::{Consumer, MemberState, Producer, RingError};
use shared_region::transport::{monotonic_ms, STALE_AFTER_MS};
use shared_region::{Membership, Transport};

/// A peer as seen from here.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeerState {
    /// Not joined yet.
    Absent,
    /// Joined and alive.
    Present,
    /// Left, or its heartbeat stopped.
    Gone,
}

/// Why a link operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum LinkError {
    /// The peer left or died.
    #[error("peer {0} is gone")]
    PeerGone(u32),
    /// No such peer (or oneself).
    #[error("no peer {0}")]
    BadPeer(u32),
    /// The message exceeds the largest message.
    #[error("message too large")]
    TooLarge,
    /// The queue is corrupt (a misbehaving peer).
    #[error("queue to or from peer {0} is broken: {1}")]
    Broken(u32, RingError),
}

/// The transport behind a port-I/O channel device.
pub trait Link: Send {
    /// This member's index.
    fn me(&self) -> u32;
    /// Number of members.
    fn members(&self) -> u32;
    /// Largest message.
    fn max_message(&self) -> usize;
    /// State of `peer`.
    fn peer_state(&self, peer: u32) -> PeerState;
    /// Largest message `peer`'s queue takes now.
    fn room(&mut self, peer: u32) -> Result<usize, LinkError>;
    /// Queues `msg` for `peer`; `Ok(false)` when the queue is full.
    fn send(&mut self, peer: u32, msg: &[u8]) -> Result<bool, LinkError>;
    /// Takes the next message from any peer into `buf` (at least
    /// [`Link::max_message`] bytes). Returns the sender and the length.
    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(u32, usize)>, LinkError>;
}

/// A [`Link`] over the intervm ring protocol.
pub struct RingLink {
    membership: Membership,
    producers: Vec<Option<Producer>>,
    consumers: Vec<Option<Consumer>>,
    broken: Vec<bool>,
    next: usize,
    stale_after_ms: u64,
}

impl RingLink {
    /// Joins `transport` as member `me`.
    pub fn join(transport: &Transport, me: u32) -> Result<Self, shared_region::Error> {
        let membership = transport.join(me)?;
        let geo = transport.geometry();
        let r = transport.ring_region();
        let mut producers = Vec::new();
        let mut consumers = Vec::new();
        for p in 0..geo.members {
            if p == me {
                producers.push(None);
                consumers.push(None);
            } else {
                let ring = shared_region::Error::Ring;
                producers.push(Some(r.producer(geo, me, p).map_err(ring)?));
                consumers.push(Some(r.consumer(geo, p, me).map_err(ring)?));
            }
        }
        Ok(Self {
            membership,
            producers,
            consumers,
            broken: vec![false; geo.members as usize],
            next: 0,
            stale_after_ms: STALE_AFTER_MS,
        })
    }

    /// How long a peer's heartbeat may stand still before the peer counts
    /// as gone (a VMM killed without leaving); [`STALE_AFTER_MS`] unless
    /// set. Tests on loaded hosts raise it so that only a hang trips it.
    pub fn set_stale_after_ms(&mut self, ms: u64) {
        self.stale_after_ms = ms;
    }

    fn producer(&mut self, peer: u32) -> Result<&mut Producer, LinkError> {
        if self.broken.get(peer as usize) == Some(&true) {
            return Err(LinkError::Broken(peer, RingError::CorruptIndex(0)));
        }
        self.producers
            .get_mut(peer as usize)
            .and_then(|p| p.as_mut())
            .ok_or(LinkError::BadPeer(peer))
    }
}

impl Link for RingLink {
    fn me(&self) -> u32 {
        self.membership.member()
    }

    fn members(&self) -> u32 {
        self.membership.transport().geometry().members
    }

    fn max_message(&self) -> usize {
        self.membership.transport().geometry().max_payload() as usize
    }

    fn peer_state(&self, peer: u32) -> PeerState {
        let t = self.membership.transport();
        let (r, geo) = (t.ring_region(), t.geometry());
        match r.member_state(&geo, peer) {
            Ok(MemberState::Absent) | Ok(MemberState::Idle) => PeerState::Absent,
            Ok(MemberState::Gone) | Err(_) => PeerState::Gone,
            Ok(MemberState::Alive) => {
                let beat = r.heartbeat(&geo, peer).unwrap_or(0);
                if monotonic_ms().saturating_sub(beat) > self.stale_after_ms {
                    PeerState::Gone
                } else {
                    PeerState::Present
                }
            }
        }
    }

    fn room(&mut self, peer: u32) -> Result<usize, LinkError> {
        let max = self.max_message();
        let free = self
            .producer(peer)?
            .free()
            .map_err(|e| LinkError::Broken(peer, e))?;
        // A frame header and the payload padding come out of the free space.
        Ok(
            (free.saturating_sub(intervm_protocol::ring::FRAME_HEADER_BYTES) & !7).min(max as u64)
                as usize,
        )
    }

    fn send(&mut self, peer: u32, msg: &[u8]) -> Result<bool, LinkError> {
        if self.peer_state(peer) == PeerState::Gone {
            return Err(LinkError::PeerGone(peer));
        }
        if msg.len() > self.max_message() {
            return Err(LinkError::TooLarge);
        }
        match self.producer(peer)?.try_send(msg) {
            Ok(sent) => Ok(sent.is_some()),
            Err(e) => {
                self.broken[peer as usize] = true;
                Err(LinkError::Broken(peer, e))
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(u32, usize)>, LinkError> {
        let n = self.consumers.len();
        for i in 0..n {
            let peer = (self.next + i) % n;
            if self.broken[peer] {
                continue;
            }
            let Some(c) = self.consumers[peer].as_mut() else {
                continue;
            };
            match c.try_recv(buf) {
                Ok(Some((len, _))) => {
                    self.next = (peer + 1) % n;
                    return Ok(Some((peer as u32, len)));
                }
                Ok(None) => {}
                Err(e) => {
                    self.broken[peer] = true;
                    return Err(LinkError::Broken(peer as u32, e));
                }
            }
        }
        Ok(None)
    }
}
