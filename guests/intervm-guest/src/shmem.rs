//! `intervm-guest shmem`: the polling shared-memory channel from Linux
//! userspace, on BAR2 of an ivshmem device mapped through sysfs (or any
//! file holding the region).
//!
//! The tool is a member like the probe guest: same ring protocol
//! (`intervm_protocol::ring`), same start line (ready words), same payload
//! pattern, so it interoperates with probe guests, other tools and any
//! program that speaks the protocol. It keeps its own heartbeat in the
//! member table while it runs and marks itself gone when it ends, so peers
//! never wait on a tool that died.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use intervm_protocol::heartbeat::{monotonic_ms, Heartbeat, StartError};
use intervm_protocol::notify::{Idle, Notify, Policy, Side};
use intervm_protocol::probe::{pattern_frame_pos, shmem_frame_bytes, shmem_source_bytes};
use intervm_protocol::ring::{
    self, fold, ready_go, Geometry, Liveness, MemberState, Region, RingError, HEADER_BYTES,
    READY_PREPARED,
};

use crate::pci::{self, Mapping};
use crate::Error;

/// Where the region comes from.
#[derive(Clone, Debug)]
pub struct Source {
    /// A PCI address (`00:03.0`) of the ivshmem device to use.
    pub device: Option<String>,
    /// A file to map instead of a PCI BAR (e.g. `/dev/shm/NAME` on a host).
    pub resource: Option<PathBuf>,
    /// sysfs PCI devices directory.
    pub sysfs: PathBuf,
    /// Map BAR2 through this ivshmem UIO device instead (`/dev/uioN`).
    pub uio: Option<PathBuf>,
}

/// Options shared by send and receive.
#[derive(Clone, Debug)]
pub struct Common {
    /// Region source.
    pub source: Source,
    /// This member's index.
    pub me: u32,
    /// The peer's index.
    pub peer: u32,
    /// Peer liveness timeout.
    pub timeout: Duration,
    /// How long to wait for the peer to show up.
    pub join_timeout: Duration,
    /// Fill (send) and read (receive) frames in place in the ring: a file
    /// is read straight into a frame and written straight from one, the
    /// pattern is generated and compared where it lies. No copy through a
    /// buffer; each received frame is checked after its use (see
    /// `intervm_protocol::ring::Borrowed`).
    pub zero_copy: bool,
}

/// A mapped, formatted region with this process joined as a member.
/// Dropping it marks the member gone, or idle after a finished transfer
/// (the next command of a script may join again).
pub struct Joined {
    // Declared before the mapping, so the heartbeat thread stops before
    // the region is unmapped.
    heartbeat: Heartbeat,
    pub(crate) region: Region,
    pub(crate) geo: Geometry,
    _map: Mapping,
}

fn ring_err(e: RingError) -> Error {
    Error::Ring(e)
}

/// Maps the region named by `src`.
pub fn map(src: &Source) -> Result<Mapping, Error> {
    match &src.uio {
        Some(dev) => crate::uio::Uio::shared(Path::new(crate::uio::SYSFS_UIO), dev),
        None => Mapping::open(&region_file(src)?),
    }
}

/// Maps the header page of the region named by `src` and reserves the
/// address space of the rest, for [`Mapping::reveal`] (UIO, which maps
/// whole regions only, maps all of it).
pub fn map_header(src: &Source) -> Result<Mapping, Error> {
    match &src.uio {
        Some(_) => map(src),
        None => Mapping::reserve(&region_file(src)?, HEADER_BYTES as usize),
    }
}

/// The file holding the region named by `src` (not a UIO device).
fn region_file(src: &Source) -> Result<PathBuf, Error> {
    Ok(match &src.resource {
        Some(p) => p.clone(),
        None => {
            let dev = pci::pick(
                &src.sysfs,
                intervm_protocol::ivshmem::VENDOR as u32,
                intervm_protocol::ivshmem::DEVICE as u32,
                src.device.as_deref(),
            )?;
            pci::enable(&dev)?;
            dev.join("resource2")
        }
    })
}

impl Joined {
    /// The doorbell ID member `m` published (read at every ring: it changes
    /// when the member's ivshmem server restarted).
    fn doorbell_of(&self, m: u32) -> Result<u16, Error> {
        self.region
            .doorbell_id(&self.geo, m)
            .map_err(ring_err)?
            .ok_or(Error::Ring(RingError::PeerGone(m)))
    }

    /// Maps the region, checks its header and joins as member `me`. A
    /// region nobody formatted yet (the VMM or a peer's tool does that) is
    /// waited for up to `wait`.
    pub fn join(src: &Source, me: u32, wait: Duration) -> Result<Self, Error> {
        // The header first; then only the rings (a region of GiB with
        // small rings at its end costs the guest kernel no more than they).
        let map = map_header(src)?;
        // SAFETY: the mapping lives in `Joined` as long as the region; the
        // ring code touches only the header until the rings are mapped
        // below.
        let region = unsafe { Region::new(map.ptr(), map.len() as u64) };
        let t0 = Instant::now();
        let geo = loop {
            match region.geometry() {
                Err(RingError::NotInitialized) if t0.elapsed() < wait => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                r => break r.map_err(ring_err)?,
            }
        };
        // `geometry` checked the rings lie inside the region.
        map.reveal(
            geo.ring_base as usize,
            (geo.region_bytes() - geo.ring_base) as usize,
        )?;
        if me >= geo.members {
            return Err(Error::Ring(RingError::BadMember(me)));
        }
        region.set_ready(&geo, me, 0).map_err(ring_err)?;
        // SAFETY: `Joined` keeps the mapping until after the heartbeat
        // (field order).
        let heartbeat = unsafe {
            Heartbeat::start_every(
                region,
                geo,
                me,
                "intervm-heartbeat",
                intervm_protocol::heartbeat::GUEST_INTERVAL,
            )
        }
        .map_err(|e| match e {
            StartError::Ring(e) => Error::Ring(e),
            StartError::Thread(e) => Error::Io("heartbeat thread".into(), e),
        })?;
        Ok(Self {
            heartbeat,
            region,
            geo,
            _map: map,
        })
    }

    /// Marks the transfer finished: leaving then says "idle", not "gone".
    fn finished(&mut self) {
        self.heartbeat.finished();
    }

    /// Polls until `ok`, failing when the join timeout passes, or when
    /// the peer is gone and `may_return` is false (a receiver serving
    /// several transfers waits for a sender to come back).
    fn wait_for(
        &self,
        c: &Common,
        may_return: bool,
        ok: impl Fn(&Region) -> bool,
    ) -> Result<(), Error> {
        let t0 = Instant::now();
        loop {
            if ok(&self.region) {
                return Ok(());
            }
            if (!may_return && self.region.member_state(&self.geo, c.peer) == Ok(MemberState::Gone))
                || t0.elapsed() > c.join_timeout
            {
                return Err(Error::Ring(RingError::PeerGone(c.peer)));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// What a transfer did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Payload bytes.
    pub bytes: u64,
    /// Frames.
    pub frames: u64,
    /// Stream checksum (`ring::fold` of frame checksums).
    pub stream: u64,
    /// Start line to last byte.
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let s = self.elapsed.as_secs_f64();
        write!(
            f,
            "bytes={} frames={} seconds={:.6} mib_per_s={:.1} stream_checksum={:#018x}",
            self.bytes,
            self.frames,
            s,
            if s > 0.0 {
                self.bytes as f64 / s / (1 << 20) as f64
            } else {
                0.0
            },
            self.stream
        )
    }
}

pub use crate::Payload;

/// How a transfer waits: by polling, or on doorbells (an ivshmem-doorbell
/// device through the UIO driver, see [`crate::uio`]).
pub trait Notifier {
    /// This member's doorbell ID, or `None` when polling.
    fn my_id(&mut self) -> Option<u16>;
    /// Rings peer `id` on vector 0.
    fn ring(&mut self, id: u16);
    /// Sleeps until rung (returns at once if a ring came since the last
    /// wait) or `timeout` passes.
    fn wait(&mut self, timeout: Duration);
    /// Adaptive notification: poll this long before sleeping, and ring only
    /// a side that declared it sleeps. `None`: ring every frame, sleep
    /// whenever idle.
    fn adaptive(&self) -> Option<Duration> {
        None
    }
}

/// [`Notifier`] by polling: never rings, never sleeps.
pub struct Polling;

impl Notifier for Polling {
    fn my_id(&mut self) -> Option<u16> {
        None
    }
    fn ring(&mut self, _id: u16) {}
    fn wait(&mut self, _timeout: Duration) {
        std::hint::spin_loop();
    }
}

/// Microseconds since this process first asked: the time base of the
/// notification policies (only differences matter).
fn monotonic_us() -> u64 {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    EPOCH
        .get_or_init(Instant::now)
        .elapsed()
        .as_micros()
        .try_into()
        .unwrap_or(u64::MAX)
}

/// The shared notification policy (see `intervm_protocol::notify`) that
/// `notify` asks for on `side`, timed in µs of [`monotonic_us`]; `rings`:
/// it has a doorbell ID (its [`Notifier::my_id`], read once by the caller:
/// on a UIO device each read is a register access).
fn policy_of(notify: &dyn Notifier, rings: bool, side: Side) -> Policy {
    let budget = notify.adaptive();
    let mode = match (rings, budget) {
        (false, _) => Notify::Never,
        (true, None) => Notify::Always,
        (true, Some(_)) => Notify::Adaptive,
    };
    Policy::new(
        mode,
        side,
        budget.map_or(0, |b| b.as_micros().try_into().unwrap_or(u64::MAX)),
    )
}

/// Sends `payload` to `c.peer`, ringing it after each frame when `notify`
/// has a doorbell.
pub fn send(
    c: &Common,
    payload: &Payload,
    chunk: u64,
    notify: &mut dyn Notifier,
) -> Result<Summary, Error> {
    let mut j = Joined::join(&c.source, c.me, c.join_timeout)?;
    let mut p = j.region.producer(j.geo, c.me, c.peer).map_err(ring_err)?;
    let mut file = match payload {
        Payload::File(path) => {
            Some(std::fs::File::open(path).map_err(|e| Error::Io(path.display().to_string(), e))?)
        }
        Payload::Pattern { .. } => None,
    };
    let (size, src) = match payload {
        Payload::Pattern { seed, size } => {
            let frame = shmem_frame_bytes(chunk, *size, p.max_message());
            let mut src = vec![0u8; shmem_source_bytes(*size, frame) as usize];
            ring::fill_pattern(*seed, 0, &mut src);
            (*size, src)
        }
        Payload::File(_) => (
            u64::MAX,
            vec![0u8; chunk.clamp(1, p.max_message()) as usize],
        ),
    };
    let frame = shmem_frame_bytes(chunk, size, p.max_message()) as usize;
    // With doorbells: publish this side's ID, so that a receiver can wake
    // it after it slept on a full ring.
    let my_id = publish_id(&j, c.me, notify)?;
    // A "go" still up from the receiver's previous transfer is not ours
    // (see ring::READY_PREPARED): wait until it ended.
    j.wait_for(c, false, |r| r.may_prepare_for(&j.geo, c.peer))?;
    j.region
        .set_ready(&j.geo, c.me, READY_PREPARED)
        .map_err(ring_err)?;
    j.wait_for(c, false, |r| r.ready(&j.geo, c.peer) == Ok(ready_go(1)))?;
    let start = Instant::now();
    // With doorbells: the receiver published its doorbell ID before "go"
    // (checked here; read again at every ring).
    let rings = my_id.is_some();
    if rings {
        j.doorbell_of(c.peer)?;
    }
    let mut live = Liveness::new(
        &j.region,
        &j.geo,
        c.peer,
        c.timeout.as_millis() as u64,
        monotonic_ms(),
    );
    let (mut sent, mut frames, mut stream, mut pos) = (0u64, 0u64, 0u64, 0usize);
    // Copying: frames are staged here. In place: nothing is staged.
    let mut buf = if c.zero_copy {
        Vec::new()
    } else {
        crate::touched_buffer(frame)
    };
    let mut policy = policy_of(notify, my_id.is_some(), Side::Sender);
    loop {
        // The next frame: its most bytes, and, when copying, the bytes.
        let (most, msg): (usize, &[u8]) = match &mut file {
            Some(_) if c.zero_copy => (frame, &[]),
            Some(f) => {
                let n = read_full(f, &mut buf)
                    .map_err(|e| Error::Io("reading the payload".into(), e))?;
                (n, &buf[..n])
            }
            None => {
                if sent >= size {
                    break;
                }
                let n = (frame.min((size - sent) as usize)).min(src.len() - pos);
                (n, &src[pos..pos + n])
            }
        };
        let (len, sum) = loop {
            let attempt = if c.zero_copy {
                let from = match &mut file {
                    Some(f) => InPlace::File(f),
                    None => InPlace::Bytes(msg),
                };
                fill_in_place(&mut p, most, from)?
            } else {
                p.try_send(msg)
                    .map_err(ring_err)?
                    .map(|sum| (msg.len(), sum))
            };
            match attempt {
                Some(sent) => break sent,
                None => {
                    live.check(&j.region, &j.geo, monotonic_ms())
                        .map_err(ring_err)?;
                    // Full ring. Adaptive: poll for the budget, then
                    // declare, look again, and sleep until the receiver,
                    // having made room, rings this side.
                    match policy.idle(monotonic_us()) {
                        Idle::Sleep => {
                            p.declare_sleep();
                            if p.free().map_err(ring_err)? < ring::frame_bytes(most as u64) {
                                notify.wait(Duration::from_millis(50));
                            }
                            p.awake();
                            policy.progress();
                        }
                        Idle::Poll => std::hint::spin_loop(),
                    }
                }
            }
        };
        policy.progress();
        // A file's end: the empty frame just sent.
        let eof = file.is_some() && len == 0;
        if !eof {
            stream = fold(stream, sum);
            sent += len as u64;
            frames += 1;
            if file.is_none() {
                pos = (pos + len) % src.len();
            }
        }
        if rings && policy.ring_peer(|| p.take_consumer_sleep()) {
            // Read again at every ring: a receiver whose ivshmem server
            // restarted has a new ID.
            notify.ring(j.doorbell_of(c.peer)?);
        }
        if eof {
            break;
        }
    }
    j.finished();
    Ok(Summary {
        bytes: sent,
        frames,
        stream,
        elapsed: start.elapsed(),
    })
}

/// Where a frame filled in place takes its bytes from.
enum InPlace<'a> {
    /// Read from this file (fewer bytes at its end, none past it).
    File(&'a mut std::fs::File),
    /// These bytes (the test pattern, prepared before the clock started).
    Bytes(&'a [u8]),
}

/// Sends one frame of up to `most` bytes filled where it lies in the ring
/// (`--zero-copy`): read from a file straight into the ring, or the
/// prepared pattern written there (the sum is taken in place at the
/// commit, not while the ring copies). `Ok(None)` while the ring has no room for it;
/// otherwise the bytes sent (0 at a file's end: the end-of-stream frame)
/// and the frame's checksum.
fn fill_in_place(
    p: &mut ring::Producer,
    most: usize,
    from: InPlace<'_>,
) -> Result<Option<(usize, u64)>, Error> {
    let Some(mut frame) = p.try_reserve(most).map_err(ring_err)? else {
        return Ok(None);
    };
    // SAFETY: this process holds the ring's only producer (its member's);
    // the pieces are only stored into.
    let (a, b) = unsafe { frame.pieces_mut() };
    let len = match from {
        InPlace::File(f) => {
            let mut read = |buf: &mut [u8]| {
                read_full(f, buf).map_err(|e| Error::Io("reading the payload".into(), e))
            };
            // A failed read drops the reservation: nothing is sent.
            let n = read(a)?;
            if n == a.len() {
                n + read(b)?
            } else {
                n
            }
        }
        InPlace::Bytes(msg) => {
            let (m0, m1) = msg.split_at(a.len().min(msg.len()));
            a[..m0.len()].copy_from_slice(m0);
            b[..m1.len()].copy_from_slice(m1);
            msg.len()
        }
    };
    let sum = frame.commit(len).map_err(ring_err)?;
    Ok(Some((len, sum)))
}

pub(crate) fn read_full(f: &mut impl Read, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Publishes this member's doorbell ID, reading it again until it holds
/// still: a host that rejoined a restarted ivshmem server publishes the
/// new ID itself, and an old one read just before must not overwrite it.
fn publish_id(j: &Joined, me: u32, notify: &mut dyn Notifier) -> Result<Option<u16>, Error> {
    let mut id = notify.my_id();
    while let Some(v) = id {
        j.region.set_doorbell_id(&j.geo, me, v).map_err(ring_err)?;
        let now = notify.my_id();
        if now == id {
            break;
        }
        id = now;
    }
    Ok(id)
}

/// A receiver's buffer before the first longer frame (the probe's and the
/// tool's senders use 64 KiB frames by default).
const RECV_BUFFER_START: u64 = 1 << 20;

/// What a receiver keeps from one transfer to the next: its ring end, its
/// buffers, its notification policy.
struct Inbound {
    cons: ring::Consumer,
    policy: Policy,
    buf: Vec<u8>,
    want: Vec<u8>,
    /// Compare every byte with the test pattern of this seed.
    verify: Option<u64>,
    /// Read frames where they lie (`Common::zero_copy`); `buf` stays empty.
    zero_copy: bool,
}

/// Where a received frame belongs in its transfer (for the pattern check).
#[derive(Clone, Copy)]
struct At {
    /// The transfer's size, if known.
    size: Option<u64>,
    /// Frames and bytes received before this one.
    frames: u64,
    bytes: u64,
}

impl Inbound {
    fn new(
        j: &Joined,
        c: &Common,
        my_id: Option<u16>,
        notify: &dyn Notifier,
        verify: Option<u64>,
    ) -> Result<Self, Error> {
        let cons = j.region.consumer(j.geo, c.peer, c.me).map_err(ring_err)?;
        // Room for the longest frame seen so far, not for the longest the
        // ring could hold: a region may be larger than this guest's memory.
        // Both are faulted in now, before any clock starts.
        let first = j.geo.max_payload().min(RECV_BUFFER_START) as usize;
        Ok(Self {
            cons,
            policy: policy_of(notify, my_id.is_some(), Side::Receiver),
            buf: match c.zero_copy {
                false => crate::touched_buffer(first),
                true => Vec::new(),
            },
            want: match verify {
                Some(_) => crate::touched_buffer(first),
                None => Vec::new(),
            },
            verify,
            zero_copy: c.zero_copy,
        })
    }

    /// Starts a transfer: drops what an earlier, interrupted one left in
    /// the ring (the sender sends nothing before the "go" given here) and
    /// says go. Call it once the sender has prepared.
    /// Returns the bytes dropped.
    fn go(&mut self, j: &Joined, c: &Common) -> Result<u64, Error> {
        let dropped = self.cons.drop_stale().map_err(ring_err)?;
        j.region
            .set_ready(&j.geo, c.me, ready_go(1))
            .map_err(ring_err)?;
        Ok(dropped)
    }

    /// Makes room for copied frames of `len` bytes, failing instead of
    /// aborting when memory is short. (The pattern is compared a block at
    /// a time: its buffer does not grow.)
    fn grow(&mut self, len: usize) -> Result<(), Error> {
        self.buf = crate::try_touched_buffer(len)?;
        Ok(())
    }

    /// Takes the next frame off the ring if one is there, checked against
    /// the pattern (when asked) and written to `sink`: copied out first, or
    /// used where it lies and taken off only if its checksum still holds.
    /// Returns its length and checksum.
    fn next_frame(
        &mut self,
        at: At,
        first_frame: &mut Option<u64>,
        sink: Option<&mut (dyn Write + '_)>,
    ) -> Result<Option<(usize, u64)>, Error> {
        if !self.zero_copy {
            let (n, sum) = loop {
                match self.cons.try_recv(&mut self.buf) {
                    // Longer than any before (and checked to fit the
                    // ring): grow.
                    Err(RingError::TooLarge(len)) => self.grow(len as usize)?,
                    Err(e) => return Err(ring_err(e)),
                    Ok(None) => return Ok(None),
                    Ok(Some(f)) => break f,
                }
            };
            let pieces = (&self.buf[..n], &[][..]);
            deliver(pieces, self.verify, &mut self.want, at, first_frame, sink)?;
            return Ok(Some((n, sum)));
        }
        let Some(frame) = self.cons.try_borrow().map_err(ring_err)? else {
            return Ok(None);
        };
        let n = frame.len();
        // SAFETY: `deliver` only compares the pieces with the pattern and
        // hands them to `write(2)`; what it did stands only if the release
        // below succeeds (the transfer fails otherwise).
        let pieces = unsafe { frame.pieces() };
        deliver(pieces, self.verify, &mut self.want, at, first_frame, sink)?;
        // What was checked and written stands only if the bytes were the
        // sender's all along.
        let sum = frame.release().map_err(ring_err)?;
        Ok(Some((n, sum)))
    }

    /// Receives one transfer after [`Inbound::go`]: `size` bytes (if
    /// given) or up to an end-of-stream frame, written to `sink` if given
    /// and compared with the pattern if asked. `live` watches the sender
    /// incarnation that prepared it; when it leaves, or another takes its
    /// place, the transfer ends with `PeerGone` and what it got.
    fn transfer(
        &mut self,
        j: &Joined,
        c: &Common,
        size: Option<u64>,
        mut sink: Option<&mut dyn Write>,
        live: &mut Liveness,
        notify: &mut dyn Notifier,
    ) -> (Summary, Result<(), Error>) {
        let start = Instant::now();
        let mut s = Summary::default();
        live.progressed(monotonic_ms());
        let mut first_frame: Option<u64> = None;
        let mut idle = 0u64;
        let r = loop {
            if size.is_some_and(|want| s.bytes >= want) {
                break Ok(());
            }
            let at = At {
                size,
                frames: s.frames,
                bytes: s.bytes,
            };
            let frame = match self.next_frame(at, &mut first_frame, sink.as_deref_mut()) {
                Err(e) => break Err(e),
                Ok(f) => f,
            };
            match frame {
                Some((0, _)) => break Ok(()),
                Some((n, sum)) => {
                    s.bytes += n as u64;
                    s.frames += 1;
                    s.stream = fold(s.stream, sum);
                    // Adaptive: a sender asleep on a full ring has room now.
                    let cons = &mut self.cons;
                    if self.policy.ring_peer(|| cons.take_producer_sleep()) {
                        match j.doorbell_of(c.peer) {
                            Ok(id) => notify.ring(id),
                            Err(e) => break Err(e),
                        }
                    }
                    s.elapsed = start.elapsed();
                    self.policy.progress();
                    idle = 0;
                }
                None => {
                    let sleep = self.policy.idle(monotonic_us()) == Idle::Sleep;
                    if sleep {
                        // Declare, look again, sleep. The driver counts
                        // interrupts, so a ring since the last wait returns
                        // at once: no lost wake-up.
                        if self.policy.declares() {
                            self.cons.declare_sleep();
                        }
                        match self.cons.available() {
                            Ok(0) => notify.wait(Duration::from_millis(50)),
                            Ok(_) => {}
                            Err(e) => break Err(ring_err(e)),
                        }
                        if self.policy.declares() {
                            self.cons.awake();
                        }
                        self.policy.progress();
                    } else {
                        idle += 1;
                        std::hint::spin_loop();
                    }
                    if sleep || idle.is_multiple_of(4096) {
                        if let Err(e) = live.check(&j.region, &j.geo, monotonic_ms()) {
                            // What the sender published before it left is
                            // still taken.
                            match self.cons.available() {
                                Ok(0) => break Err(Error::Ring(e)),
                                Ok(_) => {}
                                Err(e) => break Err(ring_err(e)),
                            }
                        }
                    }
                }
            }
        };
        (s, r)
    }
}

/// Checks a received frame, in `pieces` (in order), against the pattern
/// of seed `verify` if given (generated into `want`), and writes it to
/// `sink` if given.
fn deliver(
    pieces: (&[u8], &[u8]),
    verify: Option<u64>,
    want: &mut [u8],
    at: At,
    first_frame: &mut Option<u64>,
    sink: Option<&mut (dyn Write + '_)>,
) -> Result<(), Error> {
    let n = pieces.0.len() + pieces.1.len();
    if let Some(seed) = verify {
        // Frames after the first are as long as the first but for the
        // last: the sender's frame size.
        let frame = *first_frame.get_or_insert(n as u64);
        let pos = pattern_frame_pos(at.size.unwrap_or(u64::MAX), frame, at.frames);
        // Compared a block of `want` at a time.
        let mut off = 0usize;
        for piece in [pieces.0, pieces.1] {
            for block in piece.chunks(want.len().max(1)) {
                let w = &mut want[..block.len()];
                ring::fill_pattern(seed, pos + off as u64, w);
                if block != w {
                    let i = block.iter().zip(w.iter()).position(|(g, w)| g != w);
                    return Err(Error::Mismatch {
                        seed,
                        offset: at.bytes + (off + i.unwrap_or(0)) as u64,
                    });
                }
                off += block.len();
            }
        }
    }
    if let Some(w) = sink {
        for piece in [pieces.0, pieces.1] {
            w.write_all(piece)
                .map_err(|e| Error::Io("writing the payload".into(), e))?;
        }
    }
    Ok(())
}

/// Waits until sender `c.peer` is alive and has prepared a transfer, and
/// returns a watch on the incarnation that did: the watch starts before
/// the wait, and if another incarnation joined during it, the wait is done
/// again for that one. A sender that is gone for now may come back within
/// the join timeout.
fn await_prepared(j: &Joined, c: &Common) -> Result<Liveness, Error> {
    loop {
        let live = Liveness::new(
            &j.region,
            &j.geo,
            c.peer,
            c.timeout.as_millis() as u64,
            monotonic_ms(),
        );
        j.wait_for(c, true, |r| {
            r.member_state(&j.geo, c.peer) == Ok(MemberState::Alive)
                && r.ready(&j.geo, c.peer) == Ok(READY_PREPARED)
        })?;
        // A watch begun before any sender joined follows no incarnation
        // yet: watch again, so that it is the one that prepared.
        if live.is_pinned() && !live.rejoined(&j.region, &j.geo) {
            return Ok(live);
        }
    }
}

/// Receives from `c.peer` until `size` bytes (if given) or an end-of-stream
/// frame, writing the payload to `out` if given, and comparing it with the
/// test pattern of seed `verify` if given (the first difference is an
/// error).
pub fn recv(
    c: &Common,
    size: Option<u64>,
    out: Option<&PathBuf>,
    verify: Option<u64>,
    notify: &mut dyn Notifier,
) -> Result<Summary, Error> {
    let mut j = Joined::join(&c.source, c.me, c.join_timeout)?;
    let my_id = publish_id(&j, c.me, notify)?;
    let mut inbound = Inbound::new(&j, c, my_id, notify, verify)?;
    let mut sink = out.map(create_sink).transpose()?;
    j.wait_for(c, false, |r| {
        r.member_state(&j.geo, c.peer) == Ok(MemberState::Alive)
            && r.ready(&j.geo, c.peer) == Ok(READY_PREPARED)
    })?;
    let mut live = Liveness::new(
        &j.region,
        &j.geo,
        c.peer,
        c.timeout.as_millis() as u64,
        monotonic_ms(),
    );
    inbound.go(&j, c)?;
    let (s, r) = inbound.transfer(
        &j,
        c,
        size,
        sink.as_mut().map(|w| w as &mut dyn Write),
        &mut live,
        notify,
    );
    r?;
    if let Some(mut w) = sink {
        w.flush()
            .map_err(|e| Error::Io("writing the payload".into(), e))?;
    }
    j.finished();
    Ok(s)
}

fn create_sink(p: &PathBuf) -> Result<std::io::BufWriter<std::fs::File>, Error> {
    Ok(std::io::BufWriter::new(
        std::fs::File::create(p).map_err(|e| Error::Io(p.display().to_string(), e))?,
    ))
}

/// What [`serve`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Served {
    /// Transfers received whole (and checked, with a pattern seed).
    pub complete: u64,
    /// Transfers the sender left before their end (it died, stopped, or a
    /// new incarnation of it joined): reported, never counted as received.
    pub interrupted: u64,
    /// Bytes of interrupted transfers dropped from the ring.
    pub stale_bytes: u64,
    /// The last complete transfer.
    pub last: Summary,
}

/// Receives `transfers` complete transfers of `size` bytes each from
/// sender `c.peer`, which may leave, crash or be restarted (a new VMM or
/// tool joining as the same member) before, between or during them, as the
/// probe's receiver does. Each transfer starts afresh: the receiver
/// watches the sender incarnation that is there, waits for its "prepared",
/// drops what an interrupted transfer left in the ring and says go. A
/// transfer its sender leaves is reported on stderr and counted as
/// interrupted; a ring error or a pattern mismatch fails at once. `out`
/// holds the last transfer received (it is truncated at each start). Fails
/// when no sender is there to prepare within the join timeout.
pub fn serve(
    c: &Common,
    size: u64,
    transfers: u64,
    out: Option<&PathBuf>,
    verify: Option<u64>,
    notify: &mut dyn Notifier,
) -> Result<Served, Error> {
    let mut j = Joined::join(&c.source, c.me, c.join_timeout)?;
    let my_id = publish_id(&j, c.me, notify)?;
    let mut inbound = Inbound::new(&j, c, my_id, notify, verify)?;
    let mut done = Served {
        complete: 0,
        interrupted: 0,
        stale_bytes: 0,
        last: Summary::default(),
    };
    while done.complete < transfers {
        let mut live = await_prepared(&j, c)?;
        let mut sink = out.map(create_sink).transpose()?;
        done.stale_bytes += inbound.go(&j, c)?;
        let (s, r) = inbound.transfer(
            &j,
            c,
            Some(size),
            sink.as_mut().map(|w| w as &mut dyn Write),
            &mut live,
            notify,
        );
        let n = done.complete + done.interrupted + 1;
        match r {
            Ok(()) => {
                if let Some(mut w) = sink {
                    w.flush()
                        .map_err(|e| Error::Io("writing the payload".into(), e))?;
                }
                done.complete += 1;
                done.last = s;
                eprintln!("intervm-guest: transfer {n}: {} bytes, complete", s.bytes);
            }
            Err(Error::Ring(RingError::PeerGone(_))) => {
                done.interrupted += 1;
                eprintln!(
                    "intervm-guest: transfer {n}: sender gone after {} of {size} bytes",
                    s.bytes
                );
            }
            Err(e) => return Err(e),
        }
        // End our side of this transfer. A sender that finished ends its
        // side too (or leaves) before the next start line counts; one that
        // died left its "prepared" up until its next incarnation begins
        // (see the probe's `serve`: only the sender writes its word).
        j.region.set_ready(&j.geo, c.me, 0).map_err(ring_err)?;
        j.wait_for(c, true, |r| {
            r.ready(&j.geo, c.peer) != Ok(READY_PREPARED) || live.rejoined(r, &j.geo)
        })?;
    }
    j.finished();
    Ok(done)
}

/// What [`check_protection`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Protection {
    /// Pages probed in the header and the other members' sections.
    pub probed: u64,
    /// Of those, the pages where the write landed (each undone at once).
    pub landed: u64,
    /// Whether the write to this member's own section landed.
    pub own_writable: bool,
}

impl std::fmt::Display for Protection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} of {} pages of the header and the other members' sections took a write; \
             this member's own section {}",
            self.landed,
            self.probed,
            if self.own_writable {
                "took one"
            } else {
                "did not take one"
            }
        )
    }
}

/// Flips word `at` of the mapping and reads it back: whether the write
/// landed. A landed write is undone at once. A peer's own store to the
/// word in between would have to produce exactly the flipped value to be
/// taken for ours.
///
/// # Safety
/// `at + 8` must lie inside `map`, and `at` must be 8-byte aligned.
unsafe fn write_lands(map: &Mapping, at: u64) -> bool {
    const FLIP: u64 = 0xa55a_c33c_0ff0_9669;
    // SAFETY: in bounds and aligned (the caller's contract); volatile,
    // since other VMs share the bytes.
    unsafe {
        let p = map.ptr().add(at as usize).cast::<u64>();
        let was = p.read_volatile();
        p.write_volatile(was ^ FLIP);
        let landed = p.read_volatile() == was ^ FLIP;
        if landed {
            p.write_volatile(was);
        }
        landed
    }
}

/// Checks what this guest may write of a formatted region, as member
/// `me`: one word of every page of the header and of every other member's
/// section, which an intervm VMM maps read-only into the guest
/// ([`Geometry::guest_read_only`]), and one word of `me`'s own section,
/// which it maps writable. Each word is flipped and read back; one that
/// changed is put back at once, but a peer using that page may see it in
/// between: run this where a write that lands is a failure anyway.
/// Under QEMU, which maps the whole region writable, every write lands.
pub fn check_protection(src: &Source, me: u32) -> Result<Protection, Error> {
    let map = map(src)?;
    // SAFETY: `map` outlives `region` (both end with this function).
    let region = unsafe { Region::new(map.ptr(), map.len() as u64) };
    let geo = region.geometry().map_err(ring_err)?;
    let own = geo
        .section(me)
        .ok_or(Error::Ring(RingError::BadMember(me)))?;
    let mut found = Protection {
        probed: 0,
        landed: 0,
        own_writable: false,
    };
    for range in geo.guest_read_only(me) {
        // `geometry` checked that the sections lie inside the mapping;
        // they and the header are page aligned.
        for page in (range.start..range.end).step_by(4096) {
            found.probed += 1;
            // SAFETY: a page start inside the region.
            if unsafe { write_lands(&map, page) } {
                found.landed += 1;
            }
        }
    }
    // The last word of the section: data bytes of its last ring, which
    // no peer reads beyond that ring's published head.
    // SAFETY: inside the region, 8-byte aligned (sections are pages).
    found.own_writable = unsafe { write_lands(&map, own.end - 8) };
    Ok(found)
}

/// Writes a fresh ring layout for `members` into the region (for regions
/// no intervm VMM manages, e.g. between QEMU guests). Refuses while a
/// member is alive unless `force`.
pub fn format(src: &Source, members: u32, force: bool) -> Result<Geometry, Error> {
    let map = map(src)?;
    // SAFETY: `map` outlives `region` (both end with this function).
    let region = unsafe { Region::new(map.ptr(), map.len() as u64) };
    if let Ok(geo) = region.geometry() {
        let alive = (0..geo.members)
            .filter(|&m| region.member_state(&geo, m) == Ok(MemberState::Alive))
            .count();
        if alive > 0 && !force {
            return Err(Error::InUse(alive));
        }
    }
    let geo = Geometry::fit(members, map.len() as u64).map_err(ring_err)?;
    // An intervm VMM maps the header read-only into its guests and
    // formats the region itself: `init` then refuses (NotWritable) before
    // it writes anything.
    region.init(geo).map_err(ring_err)?;
    Ok(geo)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame of `n` pattern bytes at stream offset `pos`, split after
    /// `first` bytes as a wrapping frame is, with byte `bad` flipped.
    fn frame(pos: u64, n: usize, bad: Option<usize>) -> Vec<u8> {
        let mut f = vec![0u8; n];
        ring::fill_pattern(7, pos, &mut f);
        if let Some(i) = bad {
            f[i] ^= 0x40;
        }
        f
    }

    #[test]
    fn a_difference_is_found_at_its_byte_in_either_piece_and_any_block() {
        // Frames of 1,000 bytes, compared in blocks of 64.
        let mut want = vec![0u8; 64];
        for (k, first, bad) in [
            (0u64, 1000, None),
            (3, 600, Some(599)),
            (5, 600, Some(601)),
            (2, 10, Some(999)),
        ] {
            let f = frame(k * 1000, 1000, bad);
            let (a, b) = f.split_at(first);
            let at = At {
                size: Some(10_000),
                frames: k,
                bytes: k * 1000,
            };
            let mut first_frame = Some(1000);
            let got = deliver((a, b), Some(7), &mut want, at, &mut first_frame, None);
            match (bad, got) {
                (None, Ok(())) => {}
                (Some(i), Err(Error::Mismatch { seed: 7, offset })) => {
                    assert_eq!(offset, k * 1000 + i as u64, "frame {k}")
                }
                (bad, got) => panic!("frame {k}, byte {bad:?} flipped: {got:?}"),
            }
        }
        // What a sink gets is the frame, both pieces in order.
        let f = frame(0, 300, None);
        let mut sink = Vec::new();
        let at = At {
            size: None,
            frames: 0,
            bytes: 0,
        };
        deliver(
            f.split_at(100),
            None,
            &mut [],
            at,
            &mut None,
            Some(&mut sink),
        )
        .unwrap();
        assert_eq!(sink, f);
    }
}
