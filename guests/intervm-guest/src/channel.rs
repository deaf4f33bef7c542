//! Messages between guest programs over a shared region: the library face
//! of intervm for a guest application that is not a bulk transfer.
//!
//! Open the region of an ivshmem device (by PCI address, through its UIO
//! device, or any file that maps it), take a [`Sender`] to a member and a
//! [`Receiver`] from one, and send and receive whole messages. Every
//! message is checksummed by the ring protocol; a peer that leaves, dies or
//! stalls is reported ([`PeerGone`](intervm_protocol::ring::RingError::PeerGone)) instead of waited for.
//!
//! ```no_run
//! use std::time::Duration;
//! use intervm_guest::channel::Channel;
//!
//! # fn main() -> Result<(), intervm_guest::Error> {
//! // The only ivshmem device of this guest, as member 1 of its channel.
//! let ch = Channel::open_pci(None, 1)?;
//! let mut to_0 = ch.sender(0)?;
//! to_0.send(b"hello", Duration::from_secs(5))?;
//! let mut from_0 = ch.receiver(0)?;
//! let mut buf = vec![0u8; ch.max_message()];
//! let n = from_0.recv(&mut buf, Duration::from_secs(5))?;
//! println!("member 0 says {:?}", &buf[..n]);
//! # Ok(()) }
//! ```
//!
//! `examples/echo.rs` is a whole program. Both ends must be created before
//! the first message of a conversation, or right after the previous one
//! ended: a receiver takes a ring from where its previous consumer left it.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use intervm_protocol::heartbeat::monotonic_ms;
use intervm_protocol::ring::{Consumer, Liveness, MemberState, Producer};

use crate::shmem::{Joined, Source};
use crate::Error;

/// How long a peer may show no heartbeat or progress before it counts as
/// gone (as the launcher's default `peer_timeout` for a channel with a
/// Linux member: a peer may be a Linux guest program, whose heartbeat
/// thread a busy PVM host can leave unscheduled for more than 10 s).
pub const PEER_TIMEOUT: Duration = Duration::from_secs(60);

/// How long [`Channel::open_pci`] waits for the region to be formatted.
pub const OPEN_WAIT: Duration = Duration::from_secs(10);

/// This program's membership of one shared region.
pub struct Channel {
    joined: Joined,
    me: u32,
    peer_timeout: Duration,
}

impl Channel {
    /// Joins the region of `source` as member `me`, waiting up to `wait`
    /// for it to be formatted (by the VMM, or by a peer's
    /// `intervm-guest shmem format`).
    pub fn open(source: &Source, me: u32, wait: Duration) -> Result<Self, Error> {
        Ok(Self {
            joined: Joined::join(source, me, wait)?,
            me,
            peer_timeout: PEER_TIMEOUT,
        })
    }

    /// Joins the BAR2 region of the ivshmem device at PCI address `device`
    /// (`00:03.0`; `None`: the only one) as member `me`.
    pub fn open_pci(device: Option<&str>, me: u32) -> Result<Self, Error> {
        let source = Source {
            device: device.map(str::to_string),
            resource: None,
            sysfs: PathBuf::from("/sys/bus/pci/devices"),
            uio: None,
        };
        Self::open(&source, me, OPEN_WAIT)
    }

    /// Counts a peer as gone after `t` without heartbeat or progress.
    pub fn set_peer_timeout(&mut self, t: Duration) {
        self.peer_timeout = t;
    }

    /// This member's index.
    pub fn me(&self) -> u32 {
        self.me
    }

    /// Members the region was formatted for.
    pub fn members(&self) -> u32 {
        self.joined.geo.members
    }

    /// The largest message one frame carries.
    pub fn max_message(&self) -> usize {
        self.joined.geo.max_payload() as usize
    }

    /// Whether member `m` has joined and not left.
    pub fn is_alive(&self, m: u32) -> bool {
        self.joined.region.member_state(&self.joined.geo, m) == Ok(MemberState::Alive)
    }

    fn liveness(&self, peer: u32) -> Liveness {
        Liveness::new(
            &self.joined.region,
            &self.joined.geo,
            peer,
            self.peer_timeout.as_millis() as u64,
            monotonic_ms(),
        )
    }

    /// The sending end towards member `to`.
    pub fn sender(&self, to: u32) -> Result<Sender<'_>, Error> {
        let p = self
            .joined
            .region
            .producer(self.joined.geo, self.me, to)
            .map_err(Error::Ring)?;
        Ok(Sender {
            ch: self,
            p,
            live: self.liveness(to),
        })
    }

    /// The receiving end from member `from`.
    pub fn receiver(&self, from: u32) -> Result<Receiver<'_>, Error> {
        let c = self
            .joined
            .region
            .consumer(self.joined.geo, from, self.me)
            .map_err(Error::Ring)?;
        Ok(Receiver {
            ch: self,
            c,
            live: self.liveness(from),
        })
    }
}

/// Sends messages to one member.
pub struct Sender<'a> {
    ch: &'a Channel,
    p: Producer,
    live: Liveness,
}

impl Sender<'_> {
    /// Sends `msg` if the ring has room now; `Ok(false)` when it is full.
    pub fn try_send(&mut self, msg: &[u8]) -> Result<bool, Error> {
        let sent = self.p.try_send(msg).map_err(Error::Ring)?.is_some();
        if sent {
            self.live.progressed(monotonic_ms());
        }
        Ok(sent)
    }

    /// Sends `msg`, waiting for room up to `timeout`. The peer leaving or
    /// stalling ends the wait with
    /// [`PeerGone`](intervm_protocol::ring::RingError::PeerGone).
    pub fn send(&mut self, msg: &[u8], timeout: Duration) -> Result<(), Error> {
        let peer = self.p.peer();
        let (p, live) = (&mut self.p, &mut self.live);
        poll(self.ch, live, timeout, || {
            let sent = p.try_send(msg).map_err(Error::Ring)?.is_some();
            Ok(sent.then_some(()))
        })
        .map_err(|e| {
            late(e, || {
                format!("member {peer} took no message for {timeout:?}")
            })
        })
    }
}

/// Tries `step` until it gives a value, the peer watched by `live` counts
/// as gone, or `timeout` passes (an empty [`Error::Timeout`], which the
/// caller words).
fn poll<T>(
    ch: &Channel,
    live: &mut Liveness,
    timeout: Duration,
    mut step: impl FnMut() -> Result<Option<T>, Error>,
) -> Result<T, Error> {
    let t0 = Instant::now();
    loop {
        if let Some(v) = step()? {
            live.progressed(monotonic_ms());
            return Ok(v);
        }
        live.check(&ch.joined.region, &ch.joined.geo, monotonic_ms())
            .map_err(Error::Ring)?;
        if t0.elapsed() >= timeout {
            return Err(Error::Timeout(String::new()));
        }
        std::hint::spin_loop();
    }
}

/// Words an empty timeout from [`poll`].
fn late(e: Error, what: impl Fn() -> String) -> Error {
    match e {
        Error::Timeout(s) if s.is_empty() => Error::Timeout(what()),
        e => e,
    }
}

/// Receives messages from one member.
pub struct Receiver<'a> {
    ch: &'a Channel,
    c: Consumer,
    live: Liveness,
}

impl Receiver<'_> {
    /// The next message into `buf` if one is there: its length.
    pub fn try_recv(&mut self, buf: &mut [u8]) -> Result<Option<usize>, Error> {
        let got = self.c.try_recv(buf).map_err(Error::Ring)?.map(|(n, _)| n);
        if got.is_some() {
            self.live.progressed(monotonic_ms());
        }
        Ok(got)
    }

    /// Waits up to `timeout` for the next message. Frames the peer sent
    /// before it left are still delivered; after them, its leaving is
    /// [`PeerGone`](intervm_protocol::ring::RingError::PeerGone).
    pub fn recv(&mut self, buf: &mut [u8], timeout: Duration) -> Result<usize, Error> {
        let peer = self.c.peer();
        let (c, live) = (&mut self.c, &mut self.live);
        poll(self.ch, live, timeout, || {
            Ok(c.try_recv(buf).map_err(Error::Ring)?.map(|(n, _)| n))
        })
        .map_err(|e| {
            late(e, || {
                format!("no message from member {peer} for {timeout:?}")
            })
        })
    }
}
