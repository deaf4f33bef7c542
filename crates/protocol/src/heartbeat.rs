//! A member's presence in a ring region, for hosts and guest tools with
//! `std` (feature `std`): the member is marked alive, a thread writes its
//! heartbeat every [`INTERVAL`], and dropping the [`Heartbeat`] stops the
//! thread and marks the member gone (or idle, after [`Heartbeat::finished`]).
//! Peers watch it with [`crate::ring::Liveness`].

extern crate std;

use core::sync::atomic::{AtomicBool, Ordering};
use core::time::Duration;
use std::sync::Arc;
use std::thread::JoinHandle;

use crate::ring::{Geometry, MemberState, Region, RingError};

/// How often a host VMM writes its heartbeat (cheap on the host).
pub const INTERVAL: Duration = Duration::from_millis(10);

/// How often a tool inside a guest writes its heartbeat. Each beat there
/// is a timer wake-up, a system call and two context switches of guest
/// kernel code, which is emulated on PVM (milliseconds each on a busy
/// host): at [`INTERVAL`] the heartbeat thread alone could take most of a
/// vCPU from the transfer it vouches for. Peers' timeouts are seconds.
pub const GUEST_INTERVAL: Duration = Duration::from_millis(100);

/// Milliseconds of `CLOCK_MONOTONIC`, the clock heartbeats are written in
/// (the same in every process of one host). Never 0, so a heartbeat of 0
/// means "never beat".
pub fn monotonic_ms() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64 * 1000 + ts.tv_nsec as u64 / 1_000_000).max(1)
}

/// Member `me`'s heartbeat thread; see the module docs.
#[derive(Debug)]
pub struct Heartbeat {
    region: Region,
    geo: Geometry,
    me: u32,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    leave_as: MemberState,
}

impl Heartbeat {
    /// Marks member `me` alive and starts its heartbeat thread (named
    /// `name`).
    ///
    /// # Safety
    /// `region` must stay mapped until the returned value is dropped (the
    /// thread writes to it until then).
    pub unsafe fn start(
        region: Region,
        geo: Geometry,
        me: u32,
        name: &str,
    ) -> Result<Self, StartError> {
        // SAFETY: the caller's guarantee, passed on.
        unsafe { Self::start_every(region, geo, me, name, INTERVAL) }
    }

    /// Like [`Heartbeat::start`], beating every `interval` (e.g.
    /// [`GUEST_INTERVAL`] in a guest).
    ///
    /// # Safety
    /// As for [`Heartbeat::start`].
    pub unsafe fn start_every(
        region: Region,
        geo: Geometry,
        me: u32,
        name: &str,
        interval: Duration,
    ) -> Result<Self, StartError> {
        // A new incarnation first: a peer still watching the previous one
        // (killed, then restarted here) must not take this one's beats
        // for its.
        region.begin_incarnation(&geo, me)?;
        region.set_heartbeat(&geo, me, monotonic_ms())?;
        region.set_member_state(&geo, me, MemberState::Alive)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while !stop2.load(Ordering::Acquire) {
                    let _ = region.set_heartbeat(&geo, me, monotonic_ms());
                    std::thread::park_timeout(interval);
                }
            })
            .map_err(StartError::Thread)?;
        Ok(Self {
            region,
            geo,
            me,
            stop,
            thread: Some(thread),
            leave_as: MemberState::Gone,
        })
    }

    /// This member's index.
    pub fn member(&self) -> u32 {
        self.me
    }

    /// The work is done: leaving will mark the member `Idle` (it may join
    /// again, e.g. with the next command of a script) instead of `Gone`.
    pub fn finished(&mut self) {
        self.leave_as = MemberState::Idle;
    }
}

impl Drop for Heartbeat {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
        // No start line of ours outlives us (see ring::READY_PREPARED).
        let _ = self.region.set_ready(&self.geo, self.me, 0);
        let _ = self
            .region
            .set_member_state(&self.geo, self.me, self.leave_as);
    }
}

/// Why [`Heartbeat::start`] failed.
#[derive(Debug)]
pub enum StartError {
    /// The member index or region is invalid.
    Ring(RingError),
    /// The thread could not be spawned.
    Thread(std::io::Error),
}

impl From<RingError> for StartError {
    fn from(e: RingError) -> Self {
        StartError::Ring(e)
    }
}

impl core::fmt::Display for StartError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            StartError::Ring(e) => write!(f, "{e}"),
            StartError::Thread(e) => write!(f, "spawning the heartbeat thread: {e}"),
        }
    }
}

impl std::error::Error for StartError {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::Liveness;

    #[test]
    fn beats_while_alive_and_leaves_gone_or_idle() {
        let mut mem = std::vec![0u64; (1 << 20) / 8];
        // SAFETY: `mem` outlives every use of `region` below.
        let region = unsafe { Region::new(mem.as_mut_ptr().cast(), 1 << 20) };
        let geo = Geometry::fit(2, 1 << 20).unwrap();
        region.init(geo).unwrap();
        // SAFETY: `mem` stays alive until the end of the test.
        let hb = unsafe { Heartbeat::start(region, geo, 1, "test-beat") }.unwrap();
        assert_eq!(region.member_state(&geo, 1), Ok(MemberState::Alive));
        // The thread beats: wait for the next beat (a loaded host may not
        // run the thread for a while; only a hang fails this).
        let first = region.heartbeat(&geo, 1).unwrap();
        let t0 = std::time::Instant::now();
        while region.heartbeat(&geo, 1).unwrap() <= first {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "the thread never beat"
            );
            std::thread::sleep(INTERVAL);
        }
        drop(hb);
        assert_eq!(region.member_state(&geo, 1), Ok(MemberState::Gone));
        let mut live = Liveness::new(&region, &geo, 1, 1000, monotonic_ms());
        assert!(live.check(&region, &geo, monotonic_ms()).is_err());

        // SAFETY: as above.
        let mut hb = unsafe { Heartbeat::start(region, geo, 1, "test-beat") }.unwrap();
        hb.finished();
        drop(hb);
        assert_eq!(region.member_state(&geo, 1), Ok(MemberState::Idle));
        // SAFETY: as above.
        assert!(unsafe { Heartbeat::start(region, geo, 2, "test-beat") }.is_err());
    }

    #[test]
    fn every_start_is_a_new_incarnation() {
        let mut mem = std::vec![0u64; (1 << 20) / 8];
        // SAFETY: `mem` outlives every use of `region` below.
        let region = unsafe { Region::new(mem.as_mut_ptr().cast(), 1 << 20) };
        let geo = Geometry::fit(2, 1 << 20).unwrap();
        region.init(geo).unwrap();
        assert_eq!(region.incarnation(&geo, 0), Ok(0));
        // SAFETY: `mem` stays alive until the end of the test.
        let first = unsafe { Heartbeat::start(region, geo, 0, "test-beat") }.unwrap();
        let mut live = Liveness::new(&region, &geo, 0, 60_000, monotonic_ms());
        assert_eq!(live.incarnation(), 1);
        // Killed: no leave is written, the slot still says alive.
        std::mem::drop(first);
        region
            .set_member_state(&geo, 0, MemberState::Alive)
            .unwrap();
        // Restarted before anybody noticed: alive and beating, yet the
        // watcher of the first one sees it gone.
        // SAFETY: as above.
        let _second = unsafe { Heartbeat::start(region, geo, 0, "test-beat") }.unwrap();
        assert_eq!(region.incarnation(&geo, 0), Ok(2));
        assert!(live.check(&region, &geo, monotonic_ms()).is_err());
    }
}
