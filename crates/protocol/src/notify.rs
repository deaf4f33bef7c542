//! How the two sides of a shared-memory ring wake each other: the one
//! definition of `notify`, from the launcher's TOML key through the probe's
//! boot arguments to the Linux guest tool's `--notify`.

use core::fmt;
use core::str::FromStr;

use crate::probe::{SHMEM_ADAPTIVE, SHMEM_NOTIFY};

/// How a transfer over a ring waits for and wakes its peer.
///
/// [`Notify::Always`] and [`Notify::Adaptive`] ring doorbells, so they need
/// an ivshmem-doorbell device; [`Notify::Never`] works on any shared region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Deserialize),
    serde(rename_all = "lowercase")
)]
pub enum Notify {
    /// Pure polling: no doorbells, an idle side spins.
    Never,
    /// A doorbell after every frame; an idle receiver always sleeps.
    Always,
    /// Poll for a budget (`spin_us`), then declare a sleep in the ring and
    /// wait for a doorbell; a side rings the other only when that one has
    /// declared it sleeps. The default.
    #[default]
    Adaptive,
}

/// The default polling budget of [`Notify::Adaptive`] on PVM, in µs: about
/// two one-way doorbells as measured there (60-76 µs each).
pub const SPIN_US_PVM: u64 = 150;

/// The default polling budget of [`Notify::Adaptive`] on hardware KVM
/// (VMX/SVM), in µs, where a doorbell costs a few µs.
pub const SPIN_US_HARDWARE: u64 = 20;

impl Notify {
    /// Every mode, in the order error messages list them.
    pub const ALL: [Notify; 3] = [Notify::Always, Notify::Adaptive, Notify::Never];

    /// The mode's name in configs and on command lines.
    pub const fn name(self) -> &'static str {
        match self {
            Notify::Never => "never",
            Notify::Always => "always",
            Notify::Adaptive => "adaptive",
        }
    }

    /// True when the mode rings doorbells (so it needs a doorbell device).
    pub const fn rings(self) -> bool {
        !matches!(self, Notify::Never)
    }

    /// The mode as `probe::shmem_args::FLAGS` bits.
    pub const fn probe_flags(self) -> u64 {
        match self {
            Notify::Never => 0,
            Notify::Always => SHMEM_NOTIFY,
            Notify::Adaptive => SHMEM_ADAPTIVE,
        }
    }

    /// The mode that `flags` (`probe::shmem_args::FLAGS`) ask for; the
    /// adaptive bit wins over the per-frame one.
    pub const fn from_probe_flags(flags: u64) -> Self {
        if flags & SHMEM_ADAPTIVE != 0 {
            Notify::Adaptive
        } else if flags & SHMEM_NOTIFY != 0 {
            Notify::Always
        } else {
            Notify::Never
        }
    }
}

impl fmt::Display for Notify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// A name that is no [`Notify`] mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UnknownNotify;

impl fmt::Display for UnknownNotify {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("not ")?;
        for (i, n) in Notify::ALL.iter().enumerate() {
            let sep = match i {
                0 => "",
                _ if i + 1 == Notify::ALL.len() => " or ",
                _ => ", ",
            };
            write!(f, "{sep}\"{}\"", n.name())?;
        }
        Ok(())
    }
}

impl core::error::Error for UnknownNotify {}

impl FromStr for Notify {
    type Err = UnknownNotify;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Notify::ALL
            .into_iter()
            .find(|n| n.name() == s)
            .ok_or(UnknownNotify)
    }
}

/// Which side of a ring a [`Policy`] drives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The producer: idle means its ring is full.
    Sender,
    /// The consumer: idle means its rings are empty.
    Receiver,
}

/// What an idle side does next, as [`Policy::idle`] decides.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// Look at the ring again (spinning).
    Poll,
    /// Sleep until rung: declare the sleep in the ring if [`Policy::declares`],
    /// look at the ring once more, then wait for a doorbell; call
    /// [`Policy::progress`] after waking.
    Sleep,
}

/// One side's notification policy: when to ring the peer and when to stop
/// polling and sleep. The probe guest and the Linux guest tool both run
/// their transfers on it, so the two speak the same protocol; time is in
/// whatever monotonic unit the caller reads (TSC cycles, µs), as long as
/// the budget is in the same unit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    mode: Notify,
    side: Side,
    budget: u64,
    idle_since: Option<u64>,
}

impl Policy {
    /// The policy of `side` under `mode`; `budget` is the polling budget of
    /// [`Notify::Adaptive`] in the caller's time unit.
    pub const fn new(mode: Notify, side: Side, budget: u64) -> Self {
        Self {
            mode,
            side,
            budget,
            idle_since: None,
        }
    }

    /// The mode this policy follows.
    pub const fn mode(&self) -> Notify {
        self.mode
    }

    /// True when a side about to sleep declares it in the ring first: in
    /// every mode that rings. An adaptive peer rings only a side that
    /// declared; under "always" nobody needs a receiver's declaration, but
    /// it shows an observer (a host, a test) that the receiver sleeps.
    pub const fn declares(&self) -> bool {
        self.mode.rings()
    }

    /// After this side moved a frame (the sender published one, the
    /// receiver took one): whether to ring the peer. `peer_sleeps` takes
    /// the peer's sleep declaration from the ring; it is asked only when
    /// the answer depends on it (adaptive mode), so a declaration is never
    /// taken without the ring that answers it.
    pub fn ring_peer(&self, peer_sleeps: impl FnOnce() -> bool) -> bool {
        match (self.mode, self.side) {
            (Notify::Never, _) => false,
            (Notify::Always, Side::Sender) => true,
            // Under "always" only receivers sleep, so nobody waits for a
            // receiver's ring.
            (Notify::Always, Side::Receiver) => false,
            (Notify::Adaptive, _) => peer_sleeps(),
        }
    }

    /// This side found nothing to do at time `now`: poll again, or sleep.
    /// Adaptive sides poll until they have been idle for the budget; under
    /// "always" a receiver sleeps at once and a sender (whose receiver
    /// never rings it) polls.
    pub fn idle(&mut self, now: u64) -> Idle {
        match (self.mode, self.side) {
            (Notify::Never, _) | (Notify::Always, Side::Sender) => Idle::Poll,
            (Notify::Always, Side::Receiver) => Idle::Sleep,
            (Notify::Adaptive, _) => {
                let since = *self.idle_since.get_or_insert(now);
                if now.wrapping_sub(since) < self.budget {
                    Idle::Poll
                } else {
                    Idle::Sleep
                }
            }
        }
    }

    /// This side made progress or woke up: its next idle period starts
    /// afresh.
    pub fn progress(&mut self) {
        self.idle_since = None;
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::string::ToString;

    #[test]
    fn names_and_flags_round_trip() {
        for n in Notify::ALL {
            assert_eq!(n.name().parse::<Notify>(), Ok(n));
            assert_eq!(n.to_string(), n.name());
            assert_eq!(Notify::from_probe_flags(n.probe_flags()), n);
        }
        assert_eq!(Notify::default(), Notify::Adaptive);
        assert!(!Notify::Never.rings() && Notify::Always.rings() && Notify::Adaptive.rings());
    }

    #[test]
    fn unknown_names_are_refused_with_the_choices() {
        assert_eq!("Always".parse::<Notify>(), Err(UnknownNotify));
        assert_eq!("".parse::<Notify>(), Err(UnknownNotify));
        assert_eq!(
            UnknownNotify.to_string(),
            "not \"always\", \"adaptive\" or \"never\""
        );
    }

    #[test]
    fn who_rings_whom() {
        let asked = &core::cell::Cell::new(0);
        let sleeps = |answer: bool| {
            move || {
                asked.set(asked.get() + 1);
                answer
            }
        };
        let p = |mode, side| Policy::new(mode, side, 10);
        assert!(!p(Notify::Never, Side::Sender).ring_peer(sleeps(true)));
        assert!(p(Notify::Always, Side::Sender).ring_peer(sleeps(false)));
        assert!(!p(Notify::Always, Side::Receiver).ring_peer(sleeps(true)));
        assert_eq!(asked.get(), 0, "a declaration taken and not answered");
        assert!(p(Notify::Adaptive, Side::Sender).ring_peer(sleeps(true)));
        assert!(!p(Notify::Adaptive, Side::Receiver).ring_peer(sleeps(false)));
        assert_eq!(asked.get(), 2);
    }

    #[test]
    fn adaptive_sides_poll_for_their_budget_then_sleep() {
        for side in [Side::Sender, Side::Receiver] {
            let mut p = Policy::new(Notify::Adaptive, side, 10);
            assert!(p.declares());
            assert_eq!(p.idle(100), Idle::Poll);
            assert_eq!(p.idle(109), Idle::Poll);
            assert_eq!(p.idle(110), Idle::Sleep);
            assert_eq!(p.idle(500), Idle::Sleep, "still idle since 100");
            p.progress();
            assert_eq!(p.idle(500), Idle::Poll, "a new idle period");
            assert_eq!(p.idle(510), Idle::Sleep);
        }
        // A clock that wraps between two looks still counts forward.
        let mut p = Policy::new(Notify::Adaptive, Side::Receiver, 10);
        assert_eq!(p.idle(u64::MAX - 2), Idle::Poll);
        assert_eq!(p.idle(8), Idle::Sleep);
    }

    #[test]
    fn fixed_modes_never_wait_for_a_budget() {
        let mut p = Policy::new(Notify::Always, Side::Receiver, 1 << 40);
        assert_eq!(p.idle(0), Idle::Sleep);
        assert!(p.declares());
        assert!(!Policy::new(Notify::Never, Side::Receiver, 0).declares());
        let mut p = Policy::new(Notify::Always, Side::Sender, 0);
        assert_eq!(p.idle(1 << 50), Idle::Poll);
        let mut p = Policy::new(Notify::Never, Side::Receiver, 0);
        assert_eq!(p.idle(1 << 50), Idle::Poll);
    }

    #[test]
    fn the_adaptive_bit_wins() {
        assert_eq!(
            Notify::from_probe_flags(SHMEM_NOTIFY | SHMEM_ADAPTIVE),
            Notify::Adaptive
        );
        assert_eq!(
            Notify::from_probe_flags(!(SHMEM_NOTIFY | SHMEM_ADAPTIVE)),
            Notify::Never
        );
    }
}
