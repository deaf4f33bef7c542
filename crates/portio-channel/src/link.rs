//! Where a device's messages go: a [`Link`] to the other members.
//!
//! [`RingLink`] is the real one: the intervm ring protocol over a shared
//! region (a memfd when every member is in one process, a `/dev/shm` object
//! across processes), one bounded queue per ordered pair of members, so
//! backpressure and message boundaries come from the ring and a member whose
//! VMM dies is seen through its heartbeat. A member whose VMM restarts
//! joins as a new incarnation: both rings of each pair start again at a
//! point both ends agree on (`intervm_protocol::ring` generations), so a
//! frame is never read as part of another incarnation's stream, and the
//! guest sees the old incarnation gone until it accepts the new one.
//! Tests use fakes.

use std::cell::Cell;

use intervm_protocol::ring::{self, Consumer, Follow, MemberState, Producer, RingError};
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
    /// The incarnation accepted is gone and a new one is there (see
    /// [`Link::accept`]).
    Replaced,
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
    /// The bytes of a message to send could not be had (see
    /// [`Link::send_with`]); nothing was sent.
    #[error("the message's bytes could not be read")]
    Unreadable,
}

/// How [`Link::send_with`] gets a message's bytes: called with each piece
/// of the message (in order) and the piece's offset in it, to fill the
/// piece where the message will be read from; `false` if the bytes cannot
/// be had.
pub type Fill<'a> = &'a mut dyn FnMut(usize, &mut [u8]) -> bool;

/// What [`Link::recv_with`] does with a message where it lies: called with
/// its sender and its one or two pieces (in order); returns whether it took
/// the message (`false` leaves it the next one).
pub type Take<'a> = &'a mut dyn FnMut(u32, &[u8], &[u8]) -> bool;

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
    /// Queues a message of `len` bytes for `peer` whose bytes `fill`
    /// writes. `Ok(false)` (and `fill` not called) when the queue is full.
    /// A link that lends its queue's memory (like [`RingLink`]) has `fill`
    /// write straight into it; this default stages the bytes first.
    fn send_with(&mut self, peer: u32, len: usize, fill: Fill<'_>) -> Result<bool, LinkError> {
        if len > self.max_message() {
            return Err(LinkError::TooLarge);
        }
        if self.room(peer)? < len {
            return Ok(false);
        }
        let mut msg = vec![0; len];
        if !fill(0, &mut msg) {
            return Err(LinkError::Unreadable);
        }
        self.send(peer, &msg)
    }
    /// Offers the next message from any peer to `take`, where it lies in
    /// the queue. Returns its sender and length if `take` took it; `None`
    /// when no message is waiting or `take` left it (it is then the next
    /// one [`Link::recv`] takes).
    fn recv_with(&mut self, take: Take<'_>) -> Result<Option<(u32, usize)>, LinkError>;
    /// Takes the incarnation of `peer` that is there now as the one this
    /// member talks to, dropping what an earlier one left unread. Returns
    /// whether it is another one than before. Links without restarts have
    /// one incarnation per peer.
    fn accept(&mut self, _peer: u32) -> Result<bool, LinkError> {
        Ok(false)
    }
}

/// A [`Link`] over the intervm ring protocol.
pub struct RingLink {
    membership: Membership,
    producers: Vec<Option<Producer>>,
    consumers: Vec<Option<Consumer>>,
    /// Per peer, the ring error that broke its queues (both directions),
    /// until a new incarnation of the peer starts them again.
    broken: Vec<Option<RingError>>,
    /// Per peer, the incarnation this member talks to (0: none seen yet;
    /// the first one seen is taken).
    accepted: Vec<Cell<u64>>,
    next: usize,
    stale_after_ms: u64,
}

impl RingLink {
    /// Joins `transport` as member `me`: a new incarnation of it, whose
    /// rings start again where their other ends say (see the module
    /// documentation).
    pub fn join(transport: &Transport, me: u32) -> Result<Self, shared_region::Error> {
        let geo = transport.geometry();
        let r = transport.ring_region();
        let ring = shared_region::Error::ring(transport.region().label());
        // The rings start again before the member table shows the new
        // incarnation: a peer that sees it and accepts it finds this
        // side's sync points there already, so nothing it sends from then
        // on can land before them (and be skipped).
        let incarnation = r
            .incarnation(&geo, me)
            .map_err(ring)?
            .wrapping_add(1)
            .max(1);
        let mut producers = Vec::new();
        let mut consumers = Vec::new();
        for p in 0..geo.members {
            if p == me {
                producers.push(None);
                consumers.push(None);
            } else {
                let mut tx = r.producer(geo, me, p).map_err(ring)?;
                tx.announce(incarnation);
                let mut rx = r.consumer(geo, p, me).map_err(ring)?;
                if incarnation > 1 {
                    // A first incarnation reads from the ring's start.
                    rx.request_sync(incarnation);
                }
                producers.push(Some(tx));
                consumers.push(Some(rx));
            }
        }
        let membership = transport.join(me)?;
        let now = r.incarnation(&geo, me).map_err(ring)?;
        if now != incarnation {
            // Another process joined as this member at the same moment (a
            // misconfiguration): go by the number the table holds.
            for tx in producers.iter_mut().flatten() {
                tx.announce(now);
            }
            for rx in consumers.iter_mut().flatten() {
                if now > 1 {
                    rx.request_sync(now);
                }
            }
        }
        Ok(Self {
            membership,
            producers,
            consumers,
            broken: vec![None; geo.members as usize],
            accepted: (0..geo.members).map(|_| Cell::new(0)).collect(),
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

    /// The producer to `peer`, having answered a sync request of a
    /// restarted consumer there.
    fn producer(&mut self, peer: u32) -> Result<&mut Producer, LinkError> {
        if let Some(Some(e)) = self.broken.get(peer as usize) {
            return Err(LinkError::Broken(peer, *e));
        }
        let p = self
            .producers
            .get_mut(peer as usize)
            .and_then(|p| p.as_mut())
            .ok_or(LinkError::BadPeer(peer))?;
        // Only an incarnation this member accepted: what it sends before
        // that was for the one before, and is not the new one's.
        let accepted = &self.accepted[peer as usize];
        p.answer_sync(|id| accept_incarnation(accepted, id));
        Ok(p)
    }

    /// Visits the peers round robin, from the one after the last that
    /// gave something, and runs `visit` on each one's consumer when it
    /// reads the incarnation this member accepted; returns the first
    /// answer that is not `None`, with its peer. A ring error breaks that
    /// peer's queue.
    fn poll_peers<T>(
        &mut self,
        mut visit: impl FnMut(u32, &mut Consumer) -> Result<Option<T>, RingError>,
    ) -> Result<Option<(u32, T)>, LinkError> {
        let n = self.consumers.len();
        for i in 0..n {
            let peer = (self.next + i) % n;
            if self.broken[peer].is_some() {
                continue;
            }
            let accepted = &self.accepted[peer];
            if accepted.get() == 0 {
                // First sight of this peer: its incarnation now (none yet: 0).
                accepted.set(self.incarnation(peer as u32));
            }
            let Some(c) = self.consumers[peer].as_mut() else {
                continue;
            };
            let gen = c.generation();
            let followed = if gen != 0 && gen != accepted.get() {
                // The incarnation read is no longer the accepted one: what
                // it left unread is not delivered.
                c.drop_other_generations(accepted.get())
                    .and_then(|_| c.follow(accepted.get()))
            } else {
                c.follow(accepted.get())
            };
            let followed = match followed {
                // Frames of incarnations before the accepted one (sent to
                // this member before it first looked at the peer, which
                // restarted since) can never be read: drop them, or they
                // hold the queue forever.
                Ok(Follow::Held(t)) if ring::precedes(t, accepted.get()) => c
                    .drop_older_generations(accepted.get())
                    .and_then(|_| c.follow(accepted.get())),
                f => f,
            };
            let visited = match followed {
                Ok(Follow::Ready | Follow::Switched(_)) if c.generation() == accepted.get() => {
                    visit(peer as u32, c)
                }
                Ok(_) => continue,
                Err(e) => Err(e),
            };
            match visited {
                Ok(Some(v)) => {
                    self.next = (peer + 1) % n;
                    return Ok(Some((peer as u32, v)));
                }
                Ok(None) => {}
                Err(e) => {
                    self.broken[peer] = Some(e);
                    return Err(LinkError::Broken(peer as u32, e));
                }
            }
        }
        Ok(None)
    }

    /// Whether a message of `len` bytes may go to `peer`: it is neither
    /// gone nor replaced, and the message is not too large.
    fn may_send(&self, peer: u32, len: usize) -> Result<(), LinkError> {
        if matches!(self.peer_state(peer), PeerState::Gone | PeerState::Replaced) {
            return Err(LinkError::PeerGone(peer));
        }
        if len > self.max_message() {
            return Err(LinkError::TooLarge);
        }
        Ok(())
    }

    /// `peer`'s incarnation now (0: never joined).
    fn incarnation(&self, peer: u32) -> u64 {
        let t = self.membership.transport();
        t.ring_region()
            .incarnation(&t.geometry(), peer)
            .unwrap_or(0)
    }

    /// Whether `incarnation` is the one of `peer` this member talks to.
    fn accepts(&self, peer: u32, incarnation: u64) -> bool {
        self.accepted
            .get(peer as usize)
            .is_some_and(|a| accept_incarnation(a, incarnation))
    }
}

/// Whether `incarnation` (a ring generation) is the accepted one in
/// `accepted`; the first one seen is taken.
fn accept_incarnation(accepted: &Cell<u64>, incarnation: u64) -> bool {
    match accepted.get() {
        0 => {
            accepted.set(incarnation);
            true
        }
        a => a == incarnation,
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
                let now = r.incarnation(&geo, peer).unwrap_or(0);
                if monotonic_ms().saturating_sub(beat) > self.stale_after_ms {
                    PeerState::Gone
                } else if !self.accepts(peer, now) {
                    PeerState::Replaced
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
        self.may_send(peer, msg.len())?;
        match self.producer(peer)?.try_send(msg) {
            Ok(sent) => Ok(sent.is_some()),
            Err(e) => {
                self.broken[peer as usize] = Some(e);
                Err(LinkError::Broken(peer, e))
            }
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(u32, usize)>, LinkError> {
        self.poll_peers(|_, c| Ok(c.try_recv(buf)?.map(|(len, _)| len)))
    }

    fn send_with(&mut self, peer: u32, len: usize, fill: Fill<'_>) -> Result<bool, LinkError> {
        self.may_send(peer, len)?;
        let sent = match self.producer(peer)?.try_reserve(len) {
            Ok(None) => return Ok(false),
            Ok(Some(mut frame)) => {
                // SAFETY: this link holds the ring's only producer in this
                // process; `fill` only stores into the pieces.
                let (a, b) = unsafe { frame.pieces_mut() };
                let first = a.len();
                // A piece that cannot be filled drops the reservation:
                // nothing is sent.
                if !fill(0, a) || !fill(first, b) {
                    return Err(LinkError::Unreadable);
                }
                frame.commit(len)
            }
            Err(e) => Err(e),
        };
        sent.map(|_| true).map_err(|e| {
            self.broken[peer as usize] = Some(e);
            LinkError::Broken(peer, e)
        })
    }

    fn recv_with(&mut self, take: Take<'_>) -> Result<Option<(u32, usize)>, LinkError> {
        let offered = self.poll_peers(|peer, c| {
            let Some(frame) = c.try_borrow()? else {
                return Ok(None);
            };
            // SAFETY: `take` only copies the pieces (into guest memory),
            // and its copy stands only if the release below succeeds.
            let (a, b) = unsafe { frame.pieces() };
            if !take(peer, a, b) {
                return Ok(Some(None));
            }
            // What `take` copied stands only if the frame was the
            // sender's all along: a frame changed meanwhile breaks the
            // queue, and the caller reports it.
            let len = frame.len();
            frame.release()?;
            Ok(Some(Some(len)))
        })?;
        match offered {
            Some((peer, Some(len))) => Ok(Some((peer, len))),
            Some((peer, None)) => {
                // Left: the next `recv` starts at this peer again, so the
                // message offered is the one it takes.
                self.next = peer as usize;
                Ok(None)
            }
            None => Ok(None),
        }
    }

    fn accept(&mut self, peer: u32) -> Result<bool, LinkError> {
        let now = self.incarnation(peer);
        let Some(a) = self.accepted.get(peer as usize) else {
            return Err(LinkError::BadPeer(peer));
        };
        if now == 0 || a.get() == now {
            return Ok(false);
        }
        a.set(now);
        // A new incarnation starts both rings again, clean.
        self.broken[peer as usize] = None;
        if let Some(c) = self.consumers[peer as usize].as_mut() {
            c.drop_other_generations(now)
                .map_err(|e| LinkError::Broken(peer, e))?;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shared_region::{Backing, SharedRegion};
    use std::sync::Arc;

    fn transport() -> Transport {
        let r = SharedRegion::open(&Backing::Memfd, 1 << 20).unwrap();
        Transport::attach(Arc::new(r), 2).unwrap()
    }

    fn recv(l: &mut RingLink) -> Option<(u32, Vec<u8>)> {
        let mut buf = vec![0u8; l.max_message()];
        let (from, n) = l.recv(&mut buf).unwrap()?;
        Some((from, buf[..n].to_vec()))
    }

    #[test]
    fn a_restarted_member_is_gone_until_accepted_and_streams_never_mix() {
        let t = transport();
        let mut a = RingLink::join(&t, 0).unwrap();
        let mut b1 = RingLink::join(&t, 1).unwrap();
        assert_eq!(a.peer_state(1), PeerState::Present);
        assert!(a.send(1, b"a1").unwrap());
        assert!(a.send(1, b"a2").unwrap());
        assert_eq!(recv(&mut b1), Some((0, b"a1".to_vec())));
        assert!(b1.send(0, b"b1").unwrap());
        // b's VMM goes, and comes back as a new incarnation.
        drop(b1);
        let mut b2 = RingLink::join(&t, 1).unwrap();
        assert!(b2.send(0, b"new").unwrap());
        // a still talks to the first: gone, and sends to it fail...
        assert_eq!(a.peer_state(1), PeerState::Replaced);
        assert_eq!(a.send(1, b"x"), Err(LinkError::PeerGone(1)));
        // ...what it sent is delivered, the new one's is held.
        assert_eq!(recv(&mut a), Some((1, b"b1".to_vec())));
        assert_eq!(recv(&mut a), None);
        // b2 reads nothing a sent to b1 (a2, still in the ring).
        assert_eq!(recv(&mut b2), None);
        // Accepted, the new one is present and both ways start clean.
        assert_eq!(a.accept(1), Ok(true));
        assert_eq!(a.accept(1), Ok(false), "once");
        assert_eq!(a.peer_state(1), PeerState::Present);
        assert_eq!(recv(&mut a), Some((1, b"new".to_vec())));
        assert!(a.send(1, b"hello").unwrap());
        assert_eq!(recv(&mut b2), Some((0, b"hello".to_vec())));
        assert_eq!(b2.peer_state(0), PeerState::Present);
    }

    #[test]
    fn a_broken_queue_reports_the_error_that_broke_it_both_ways() {
        let t = transport();
        let mut a = RingLink::join(&t, 0).unwrap();
        let mut b = RingLink::join(&t, 1).unwrap();
        assert!(b.send(0, b"fine").unwrap());
        // A hostile b moves its head past anything it could have written.
        let geo = t.geometry();
        let head =
            t.ring_region().ring_offset(&geo, 1, 0).unwrap() + intervm_protocol::ring::RING_HEAD;
        // SAFETY: an 8-byte aligned word inside the mapping, which the
        // region keeps alive.
        unsafe { (t.region().host_addr().add(head as usize) as *mut u64).write_volatile(1 << 40) };
        let mut buf = vec![0u8; a.max_message()];
        let Err(LinkError::Broken(1, why)) = a.recv(&mut buf) else {
            panic!("the corrupt index went unnoticed");
        };
        // Sending to b names the same cause (it was "corrupt ring index
        // 0x0" whatever the cause).
        assert_eq!(a.send(1, b"x"), Err(LinkError::Broken(1, why)));
        assert_ne!(why, RingError::CorruptIndex(0));
    }

    #[test]
    fn a_peer_first_seen_after_it_restarted_is_not_held_behind_its_old_frames() {
        // Through the state (a guest that asks first) and through a
        // receive (one that just reads); a joined before b1 or after.
        for (look_first, join_late) in [(true, false), (false, false), (false, true)] {
            let t = transport();
            let early = (!join_late).then(|| RingLink::join(&t, 0).unwrap());
            let mut b1 = RingLink::join(&t, 1).unwrap();
            assert!(b1.send(0, b"old").unwrap());
            drop(b1);
            let mut a = early.unwrap_or_else(|| RingLink::join(&t, 0).unwrap());
            let mut b2 = RingLink::join(&t, 1).unwrap();
            assert!(b2.send(0, b"new").unwrap());
            if look_first {
                assert_eq!(a.peer_state(1), PeerState::Present);
            }
            // b1's frame was never for the incarnation a first saw.
            assert_eq!(
                recv(&mut a),
                Some((1, b"new".to_vec())),
                "looked first: {look_first}, joined late: {join_late}"
            );
            assert_eq!(recv(&mut a), None);
        }
    }

    #[test]
    fn what_the_old_incarnation_left_unread_goes_with_the_accept() {
        let t = transport();
        let mut a = RingLink::join(&t, 0).unwrap();
        let b1 = RingLink::join(&t, 1).unwrap();
        assert_eq!(a.peer_state(1), PeerState::Present);
        let mut b1 = b1;
        for m in [&b"old1"[..], b"old2"] {
            assert!(b1.send(0, m).unwrap());
        }
        drop(b1);
        let mut b2 = RingLink::join(&t, 1).unwrap();
        assert!(b2.send(0, b"new").unwrap());
        assert_eq!(a.accept(1), Ok(true));
        assert_eq!(recv(&mut a), Some((1, b"new".to_vec())));
        assert_eq!(recv(&mut a), None);
    }

    #[test]
    fn ten_restarts_in_a_row_each_carry_their_own_stream() {
        let t = transport();
        let mut a = RingLink::join(&t, 0).unwrap();
        for round in 0..10u8 {
            let mut b = RingLink::join(&t, 1).unwrap();
            // The first incarnation is taken at first sight, later ones
            // once accepted.
            let _ = a.accept(1);
            assert_eq!(a.peer_state(1), PeerState::Present, "round {round}");
            assert!(a.send(1, &[round; 100]).unwrap());
            assert!(b.send(0, &[round; 50]).unwrap());
            assert_eq!(recv(&mut b), Some((0, vec![round; 100])));
            assert_eq!(recv(&mut a), Some((1, vec![round; 50])));
            // Left unread for the next round to ignore.
            assert!(a.send(1, b"for this round only").unwrap());
            assert!(b.send(0, b"also").unwrap());
        }
    }

    #[test]
    fn messages_go_in_and_out_of_the_ring_in_place() {
        let t = transport();
        let (mut a, mut b) = (
            RingLink::join(&t, 0).unwrap(),
            RingLink::join(&t, 1).unwrap(),
        );
        // Sizes that make frames wrap past the ring's end now and then.
        let max = a.max_message();
        let mut wrapped = 0;
        for i in 0..40usize {
            let len = (i * 7919) % (max / 3) + 1;
            let msg: Vec<u8> = (0..len).map(|j| (i + j) as u8).collect();
            let mut fill = |off: usize, piece: &mut [u8]| {
                piece.copy_from_slice(&msg[off..off + piece.len()]);
                true
            };
            assert!(a.send_with(1, len, &mut fill).unwrap(), "room for {i}");
            // Left once: it stays the next message.
            assert_eq!(b.recv_with(&mut |_, _, _| false).unwrap(), None);
            let mut got = Vec::new();
            let taken = b
                .recv_with(&mut |from, x, y| {
                    assert_eq!(from, 0);
                    wrapped += usize::from(!x.is_empty() && !y.is_empty());
                    got = [x, y].concat();
                    true
                })
                .unwrap();
            assert_eq!(taken, Some((0, len)));
            assert!(got == msg, "message {i} differs");
        }
        assert!(wrapped > 0, "no message wrapped the ring");
        // A message left in place is the one the next copy takes, even
        // with another member's waiting after it in the round.
        let t3 = {
            let r = SharedRegion::open(&Backing::Memfd, 1 << 20).unwrap();
            Transport::attach(Arc::new(r), 3).unwrap()
        };
        let (mut x, mut y, mut z) = (
            RingLink::join(&t3, 0).unwrap(),
            RingLink::join(&t3, 1).unwrap(),
            RingLink::join(&t3, 2).unwrap(),
        );
        for round in 0..3u8 {
            assert!(y.send(0, &[round; 10]).unwrap());
            assert!(z.send(0, &[round + 100; 20]).unwrap());
            for _ in 0..2 {
                let mut first = None;
                assert_eq!(
                    x.recv_with(&mut |from, _, _| {
                        first = Some(from);
                        false
                    })
                    .unwrap(),
                    None
                );
                let (from, _) = recv(&mut x).unwrap();
                assert_eq!(
                    Some(from),
                    first,
                    "round {round}: another message was taken"
                );
            }
        }
        // A fill that fails sends nothing.
        assert_eq!(
            a.send_with(1, 100, &mut |_, _| false),
            Err(LinkError::Unreadable)
        );
        assert_eq!(recv(&mut b), None);
        // Copies and in-place takes mix.
        assert!(a.send(1, b"copied").unwrap());
        let mut got = Vec::new();
        b.recv_with(&mut |_, x, y| {
            got = [x, y].concat();
            true
        })
        .unwrap();
        assert_eq!(got, b"copied");
        assert_eq!(
            a.send_with(1, max + 1, &mut |_, _| true),
            Err(LinkError::TooLarge)
        );
    }
}
