//! Whether a peer is still there: its state, heartbeat and incarnation in
//! the member table.

use super::{Geometry, MemberState, Region, RingError};

/// Watches a peer's liveness from its member-table entry while waiting.
///
/// Call [`Liveness::check`] now and then from a wait loop with a clock in
/// milliseconds (the TSC in a guest, `Instant` on the host). The peer is
/// declared gone when its VMM marked it `Gone`, when its heartbeat did not
/// move for `timeout_ms` while we were waiting, or when it is another
/// incarnation than the one watched (it was restarted meanwhile).
#[derive(Clone, Copy, Debug)]
pub struct Liveness {
    peer: u32,
    timeout_ms: u64,
    last_beat: u64,
    since_ms: u64,
    incarnation: u64,
}

impl Liveness {
    /// Starts watching `peer`, as the incarnation it is now, at time
    /// `now_ms`. (Create it before waiting for what that incarnation
    /// publishes, so that a restart in between is noticed.) A peer that
    /// has not joined yet is watched as the first incarnation that does.
    pub fn new(region: &Region, geo: &Geometry, peer: u32, timeout_ms: u64, now_ms: u64) -> Self {
        let last_beat = region.heartbeat(geo, peer).unwrap_or(0);
        Self {
            peer,
            timeout_ms,
            last_beat,
            since_ms: now_ms,
            incarnation: region.incarnation(geo, peer).unwrap_or(0),
        }
    }

    /// The incarnation watched.
    pub fn incarnation(&self) -> u64 {
        self.incarnation
    }

    /// Whether the watch follows a known incarnation: false for one begun
    /// before the peer ever joined, until [`Liveness::check`] adopts the
    /// first incarnation it sees. Adopting is right for a peer that joins
    /// once, but a wait for what an incarnation publishes must not return
    /// such a watch: the peer may die and another incarnation join before
    /// the first check, which would then follow the new one as if it had
    /// published (a receiver waiting for a dead sender's frames, the new
    /// sender waiting for that receiver: both stuck). Watch again instead.
    pub fn is_pinned(&self) -> bool {
        self.incarnation != 0
    }

    /// True when the peer was restarted (joined again) since this watch
    /// began; never before it joined for the first time.
    pub fn rejoined(&self, region: &Region, geo: &Geometry) -> bool {
        self.incarnation != 0
            && region
                .incarnation(geo, self.peer)
                .is_ok_and(|i| i != self.incarnation)
    }

    /// Notes that progress was made (resets the stall timer).
    pub fn progressed(&mut self, now_ms: u64) {
        self.since_ms = now_ms;
    }

    /// `Err(PeerGone)` when the peer is gone, stalled, or another
    /// incarnation.
    pub fn check(&mut self, region: &Region, geo: &Geometry, now_ms: u64) -> Result<(), RingError> {
        if self.incarnation == 0 {
            // Watching began before the peer joined: this is its first.
            self.incarnation = region.incarnation(geo, self.peer)?;
        }
        if matches!(
            region.member_state(geo, self.peer)?,
            MemberState::Gone | MemberState::Idle
        ) || self.rejoined(region, geo)
        {
            return Err(RingError::PeerGone(self.peer));
        }
        let beat = region.heartbeat(geo, self.peer)?;
        if beat != self.last_beat {
            self.last_beat = beat;
            self.since_ms = now_ms;
            return Ok(());
        }
        if now_ms.saturating_sub(self.since_ms) > self.timeout_ms {
            return Err(RingError::PeerGone(self.peer));
        }
        Ok(())
    }
}
