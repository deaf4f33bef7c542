//! The host side of the intervm ring transport (`intervm_protocol::ring`).
//!
//! A VMM that wires a shared-memory channel into a VM does three things here:
//!
//! 1. [`Transport::attach`]: makes sure the region holds a ring layout for
//!    this channel's number of members. The first VMM to arrive formats it;
//!    later ones (in this or another process) check the header. An `flock`
//!    on the backing file serialises this between processes, and a region
//!    left behind by a previous run (nobody alive in it) is formatted again.
//! 2. [`Transport::join`]: marks its member slot `Alive` and starts a
//!    heartbeat (the host's `CLOCK_MONOTONIC` in milliseconds, every
//!    [`HEARTBEAT_INTERVAL`]). Guests watch their peers' heartbeats, so a VMM
//!    that is killed outright is noticed within the guests' timeout.
//! 3. Dropping the [`Membership`] (the VM stopped) marks the slot `Gone`, so
//!    peers report "peer gone" immediately instead of waiting for the timeout.
//!
//! The guest side runs the rings itself; the host never touches ring data.

use std::os::fd::AsRawFd;
use std::sync::Arc;

pub use intervm_protocol::heartbeat::{monotonic_ms, INTERVAL as HEARTBEAT_INTERVAL};
use intervm_protocol::heartbeat::{Heartbeat, StartError};
use intervm_protocol::ring::{self, Geometry, MemberState, RingError};

use crate::{Error, Result, SharedRegion};

/// A heartbeat older than this means its writer is dead. [`Transport::attach`]
/// formats a region again only when no member's heartbeat moved for this
/// long: a region left behind by processes that were killed is reused
/// after this, and a live member whose heartbeat thread a busy host did
/// not run for a while (seconds, on an overloaded host) never has its
/// rings formatted away under it. The same as intervm's default
/// `peer_timeout`.
pub const STALE_AFTER_MS: u64 = 10_000;

/// A region formatted (or checked) for one channel.
#[derive(Debug, Clone)]
pub struct Transport {
    region: Arc<SharedRegion>,
    ring: ring::Region,
    geo: Geometry,
}

/// How long [`Transport::attach`] waits for another process formatting or
/// checking the same region (which takes microseconds): a holder past
/// this is stuck or hostile, and the attach fails instead of hanging.
pub const LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

struct FileLock<'a>(&'a std::fs::File);

impl<'a> FileLock<'a> {
    fn exclusive(file: &'a std::fs::File, label: &str, wait: std::time::Duration) -> Result<Self> {
        let t0 = std::time::Instant::now();
        loop {
            // SAFETY: flock on a file descriptor we own; no memory involved.
            let r = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
            if r == 0 {
                return Ok(Self(file));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => {}
                _ => {
                    return Err(Error::Io {
                        what: format!("{label}: flock"),
                        source: e,
                    })
                }
            }
            if t0.elapsed() >= wait {
                return Err(Error::Io {
                    what: format!(
                        "{label}: another process has held the region's lock for {} s \
                         (formatting takes microseconds; a stuck or hostile member?)",
                        wait.as_secs_f64()
                    ),
                    source: std::io::Error::from_raw_os_error(libc::EWOULDBLOCK),
                });
            }
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
}

impl Drop for FileLock<'_> {
    fn drop(&mut self) {
        // SAFETY: as above.
        unsafe { libc::flock(self.0.as_raw_fd(), libc::LOCK_UN) };
    }
}

impl Transport {
    /// Prepares `region` for a channel of `members` members: formats it when
    /// it holds no valid layout or nobody alive uses it, otherwise checks
    /// that its layout was made for the same number of members.
    pub fn attach(region: Arc<SharedRegion>, members: u32) -> Result<Self> {
        Self::attach_within(region, members, LOCK_WAIT)
    }

    /// Like [`Transport::attach`], waiting at most `lock_wait` for another
    /// process that holds the region's lock.
    pub fn attach_within(
        region: Arc<SharedRegion>,
        members: u32,
        lock_wait: std::time::Duration,
    ) -> Result<Self> {
        Self::attach_layout(region, members, None, lock_wait)
    }

    /// Like [`Transport::attach`], with rings of `ring_bytes` data bytes
    /// each (a power of two) at the end of the region
    /// ([`Geometry::at_end`]) when given, instead of rings that fill it. A
    /// region in use must have been formatted with the same ring size.
    pub fn attach_rings(
        region: Arc<SharedRegion>,
        members: u32,
        ring_bytes: Option<u64>,
    ) -> Result<Self> {
        Self::attach_layout(region, members, ring_bytes, LOCK_WAIT)
    }

    fn attach_layout(
        region: Arc<SharedRegion>,
        members: u32,
        ring_bytes: Option<u64>,
        lock_wait: std::time::Duration,
    ) -> Result<Self> {
        // SAFETY: the mapping lives as long as `region`, which `Transport`
        // (and every `Membership`) keeps alive through the Arc.
        let ring = unsafe { ring::Region::new(region.host_addr(), region.size()) };
        let lock = FileLock::exclusive(region.file(), region.label(), lock_wait)?;
        let in_use = match ring.geometry() {
            Ok(geo) => live_members(&ring, &geo) > 0,
            Err(_) => false,
        };
        let geo = if in_use {
            let geo = ring.geometry().map_err(Error::ring(region.label()))?;
            if geo.members != members {
                return Err(Error::MemberMismatch {
                    path: region.label().to_string(),
                    found: geo.members,
                    wanted: members,
                });
            }
            match ring_bytes {
                Some(wanted) if wanted != geo.ring_bytes => {
                    return Err(Error::RingMismatch {
                        path: region.label().to_string(),
                        found: geo.ring_bytes,
                        wanted,
                    })
                }
                _ => {}
            }
            geo
        } else {
            if let Some(v) = ring
                .formatted_version()
                .filter(|&v| v != ring::REGION_VERSION)
            {
                log::warn!(
                    "{}: formatted by an intervm of another ring layout (version {v}, this \
                     one uses {}); formatting it again (members of that version still \
                     using it lose their rings)",
                    region.label(),
                    ring::REGION_VERSION
                );
            }
            let geo = match ring_bytes {
                Some(n) => Geometry::at_end(members, region.size(), n),
                None => Geometry::fit(members, region.size()),
            }
            .map_err(Error::ring(region.label()))?;
            ring.init(geo).map_err(Error::ring(region.label()))?;
            log::debug!(
                "{}: formatted for {members} members, {} KiB per ring",
                region.label(),
                geo.ring_bytes >> 10
            );
            geo
        };
        drop(lock);
        Ok(Self { region, ring, geo })
    }

    /// The layout in use.
    pub fn geometry(&self) -> Geometry {
        self.geo
    }

    /// The region as the ring protocol sees it (for host-side endpoints).
    pub fn ring_region(&self) -> ring::Region {
        self.ring
    }

    /// The shared region.
    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }

    /// What member `m`'s guest must only read: the header and every other
    /// member's section ([`Geometry::guest_read_only`]), for the device
    /// that maps the region into it (`set_guest_read_only`). With that,
    /// no guest can write into a ring it does not produce or speak for
    /// another member.
    pub fn guest_read_only(&self, m: u32) -> Vec<std::ops::Range<u64>> {
        self.geo
            .guest_read_only(m)
            .into_iter()
            .filter(|r| !r.is_empty())
            .collect()
    }

    /// State of member `m`.
    pub fn member_state(&self, m: u32) -> Result<MemberState> {
        self.ring
            .member_state(&self.geo, m)
            .map_err(Error::ring(self.region.label()))
    }

    /// Joins as member `member`: marks it alive and starts its heartbeat.
    /// Fails if another process formatted the region again with another
    /// layout since this transport attached (nobody was alive in it then).
    pub fn join(&self, member: u32) -> Result<Membership> {
        if member >= self.geo.members {
            return Err(Error::ring(self.region.label())(RingError::BadMember(
                member,
            )));
        }
        // Under the lock, so that no attach formats the region between
        // this check and the heartbeat marking the member alive.
        let lock = FileLock::exclusive(self.region.file(), self.region.label(), LOCK_WAIT)?;
        let describe =
            |g: &Geometry| format!("{} members, rings of {} bytes", g.members, g.ring_bytes);
        match self.ring.geometry() {
            Ok(g) if g == self.geo => {}
            found => {
                return Err(Error::Reformatted {
                    path: self.region.label().to_string(),
                    found: found.map_or_else(|e| e.to_string(), |g| describe(&g)),
                    wanted: describe(&self.geo),
                })
            }
        }
        // SAFETY: the returned Membership holds this transport, and with it
        // the region's mapping, for as long as the heartbeat runs.
        let heartbeat = unsafe {
            Heartbeat::start(
                self.ring,
                self.geo,
                member,
                &format!("shmem-heartbeat-{member}"),
            )
        }
        .map_err(|e| match e {
            StartError::Ring(e) => Error::ring(self.region.label())(e),
            StartError::Thread(source) => Error::Io {
                what: "spawning the heartbeat thread".into(),
                source,
            },
        })?;
        drop(lock);
        Ok(Membership {
            heartbeat,
            transport: self.clone(),
        })
    }
}

fn live_members(ring: &ring::Region, geo: &Geometry) -> u32 {
    let now = monotonic_ms();
    (0..geo.members)
        .filter(|&m| {
            ring.member_state(geo, m) == Ok(MemberState::Alive)
                && ring
                    .heartbeat(geo, m)
                    .is_ok_and(|b| now.saturating_sub(b) < STALE_AFTER_MS)
        })
        .count() as u32
}

/// One member's presence in a channel. Dropping it marks the member `Gone`.
#[derive(Debug)]
pub struct Membership {
    // Declared first so it stops (and stops writing) before the transport,
    // which keeps the region mapped, is dropped.
    heartbeat: Heartbeat,
    transport: Transport,
}

impl Membership {
    /// This member's index.
    pub fn member(&self) -> u32 {
        self.heartbeat.member()
    }

    /// The channel's transport.
    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    /// Leaves the channel (same as dropping).
    pub fn leave(self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Backing;

    fn shm_name(tag: &str) -> String {
        format!("intervm-test-{tag}-{}", std::process::id())
    }

    #[test]
    fn ring_errors_name_the_region() {
        let name = shm_name("ring-error");
        let r = Arc::new(SharedRegion::open(&Backing::Shm(name.clone()), 1 << 20).unwrap());
        let t = Transport::attach(r, 2).unwrap();
        let Err(e) = t.join(5) else {
            panic!("joined as member 5 of 2")
        };
        let e = e.to_string();
        assert!(e.contains(&name) && e.contains("no member 5"), "{e}");
        let _ = std::fs::remove_file(format!("/dev/shm/{name}"));
    }

    #[test]
    fn a_lock_held_for_ever_fails_the_attach_instead_of_hanging() {
        let name = shm_name("stuck");
        let backing = Backing::Shm(name.clone());
        let r = Arc::new(SharedRegion::open(&backing, 1 << 20).unwrap());
        // Another open file description (as a hostile process would hold).
        let holder = std::fs::File::open(format!("/dev/shm/{name}")).unwrap();
        // SAFETY: flock on a descriptor we own.
        assert_eq!(unsafe { libc::flock(holder.as_raw_fd(), libc::LOCK_EX) }, 0);
        let e = Transport::attach_within(r.clone(), 2, std::time::Duration::from_millis(100))
            .unwrap_err()
            .to_string();
        assert!(e.contains("held the region's lock for 0.1 s"), "{e}");
        drop(holder);
        assert!(Transport::attach_within(r, 2, std::time::Duration::from_millis(100)).is_ok());
        let _ = std::fs::remove_file(format!("/dev/shm/{name}"));
    }

    #[test]
    fn first_attach_formats_and_members_must_agree() {
        let name = shm_name("agree");
        let backing = Backing::Shm(name.clone());
        let r1 = Arc::new(SharedRegion::open(&backing, 1 << 20).unwrap());
        let t1 = Transport::attach(r1, 3).unwrap();
        let m0 = t1.join(0).unwrap();
        // A second opener (as another process would) sees the same layout.
        let r2 = Arc::new(SharedRegion::open(&backing, 1 << 20).unwrap());
        let t2 = Transport::attach(r2.clone(), 3).unwrap();
        assert_eq!(t2.geometry(), t1.geometry());
        assert_eq!(t2.member_state(0).unwrap(), MemberState::Alive);
        // A member with another idea of the channel is refused while m0 lives.
        let err = Transport::attach(r2, 2).unwrap_err();
        assert!(
            matches!(
                err,
                Error::MemberMismatch {
                    found: 3,
                    wanted: 2,
                    ..
                }
            ),
            "{err}"
        );
        assert!(t1.join(3).is_err());
        drop(m0);
        assert_eq!(t2.member_state(0).unwrap(), MemberState::Gone);
        // Nobody alive: the next attach reformats for the new member count.
        let r3 = Arc::new(SharedRegion::open(&backing, 1 << 20).unwrap());
        let t3 = Transport::attach(r3, 2).unwrap();
        assert_eq!(t3.geometry().members, 2);
        assert_eq!(t3.member_state(0).unwrap(), MemberState::Absent);
        let _ = std::fs::remove_file(format!("/dev/shm/{name}"));
    }

    #[test]
    fn a_member_whose_heartbeat_a_busy_host_held_back_keeps_its_rings() {
        // A member alive in another process (no Membership here: only its
        // entry), whose heartbeat thread the host did not run for `age`.
        let name = shm_name("late-beat");
        let backing = Backing::Shm(name.clone());
        let open = || Arc::new(SharedRegion::open(&backing, 1 << 20).unwrap());
        let with_beat_aged = |age: u64| {
            let t = Transport::attach(open(), 3).unwrap();
            let (ring, geo) = (t.ring_region(), t.geometry());
            ring.set_member_state(&geo, 1, MemberState::Alive).unwrap();
            // The monotonic clock counts from boot: minutes by now.
            ring.set_heartbeat(&geo, 1, monotonic_ms().saturating_sub(age))
                .unwrap();
            t
        };
        // Three seconds late is a slow host, not a death: the region is in
        // use, and a member with another layout is refused instead of
        // formatting the live member's rings away.
        let t = with_beat_aged(3_000);
        let err = Transport::attach(open(), 2).unwrap_err();
        assert!(matches!(err, Error::MemberMismatch { .. }), "{err}");
        assert!(
            err.to_string().contains("count as in use for 10 s"),
            "{err}"
        );
        assert_eq!(t.member_state(1).unwrap(), MemberState::Alive);
        // Still for longer than STALE_AFTER_MS: its process is dead, and
        // the region is formatted again for whoever comes.
        with_beat_aged(STALE_AFTER_MS + 5_000);
        let t = Transport::attach(open(), 2).unwrap();
        assert_eq!(t.geometry().members, 2);
        assert_eq!(t.member_state(1).unwrap(), MemberState::Absent);
        let _ = std::fs::remove_file(format!("/dev/shm/{name}"));
    }

    #[test]
    fn rings_of_a_chosen_size_sit_at_the_end_and_must_match_while_in_use() {
        let name = format!("intervm-test-rings-{}", std::process::id());
        let backing = Backing::Shm(name.clone());
        let open = || Arc::new(SharedRegion::open(&backing, 1 << 20).unwrap());
        let t1 = Transport::attach_rings(open(), 2, Some(64 << 10)).unwrap();
        let geo = t1.geometry();
        assert_eq!((geo.ring_bytes, geo.region_bytes()), (64 << 10, 1 << 20));
        let m0 = t1.join(0).unwrap();
        // Another opener asking for other rings is refused while m0 lives;
        // one asking for the same, or for none in particular, takes them.
        let err = Transport::attach_rings(open(), 2, Some(128 << 10)).unwrap_err();
        assert!(
            matches!(
                err,
                Error::RingMismatch {
                    found: 65536,
                    wanted: 131072,
                    ..
                }
            ),
            "{err}"
        );
        assert_eq!(Transport::attach(open(), 2).unwrap().geometry(), geo);
        assert_eq!(
            Transport::attach_rings(open(), 2, Some(64 << 10))
                .unwrap()
                .geometry(),
            geo
        );
        drop(m0);
        let _ = std::fs::remove_file(format!("/dev/shm/{name}"));
    }

    #[test]
    fn a_region_formatted_again_between_attach_and_join_is_refused_at_the_join() {
        // Two processes started at once with different settings: the
        // second attaches before the first joined, finds nobody alive and
        // formats again. The first must not join with its old layout (its
        // heartbeat and its guest's writable section would land in the
        // new layout's rings).
        let name = shm_name("reformat");
        let backing = Backing::Shm(name.clone());
        let open = || Arc::new(SharedRegion::open(&backing, 1 << 20).unwrap());
        let t1 = Transport::attach_rings(open(), 2, Some(64 << 10)).unwrap();
        let t2 = Transport::attach_rings(open(), 2, Some(128 << 10)).unwrap();
        let e = t1.join(0).unwrap_err();
        assert!(
            matches!(e, Error::Reformatted { .. })
                && e.to_string().contains("2 members, rings of 131072 bytes; this one uses 2 members, rings of 65536 bytes"),
            "{e}"
        );
        assert_eq!(
            t1.member_state(0).unwrap(),
            MemberState::Absent,
            "not marked alive"
        );
        // The one whose layout is in the header joins.
        let m = t2.join(1).unwrap();
        drop(m);
        let _ = std::fs::remove_file(format!("/dev/shm/{name}"));
    }

    #[test]
    fn heartbeat_moves_while_joined() {
        let r = Arc::new(SharedRegion::open(&Backing::Memfd, 64 << 10).unwrap());
        let t = Transport::attach(r, 2).unwrap();
        let m = t.join(1).unwrap();
        let ring = t.ring_region();
        let geo = t.geometry();
        // Wait for the next beat; only a hang (not a heartbeat thread that a
        // loaded host runs late) fails this.
        let b0 = ring.heartbeat(&geo, 1).unwrap();
        let t0 = std::time::Instant::now();
        while ring.heartbeat(&geo, 1).unwrap() <= b0 {
            assert!(
                t0.elapsed() < std::time::Duration::from_secs(60),
                "the heartbeat never moved"
            );
            std::thread::sleep(HEARTBEAT_INTERVAL);
        }
        assert_eq!(m.member(), 1);
        m.leave();
        assert_eq!(t.member_state(1).unwrap(), MemberState::Gone);
    }
}
