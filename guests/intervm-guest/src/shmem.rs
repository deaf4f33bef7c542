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

    fn wait_peer(&self, c: &Common, ok: impl Fn(&Region) -> bool) -> Result<(), Error> {
        let t0 = Instant::now();
        loop {
            if ok(&self.region) {
                return Ok(());
            }
            if self.region.member_state(&self.geo, c.peer) == Ok(MemberState::Gone)
                || t0.elapsed() > c.join_timeout
            {
                return Err(Error::Ring(RingError::PeerGone(c.peer)));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
    }
}

/// What a transfer did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
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
    j.wait_peer(c, |r| r.may_prepare_for(&j.geo, c.peer))?;
    j.region
        .set_ready(&j.geo, c.me, READY_PREPARED)
        .map_err(ring_err)?;
    j.wait_peer(c, |r| r.ready(&j.geo, c.peer) == Ok(ready_go(1)))?;
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
    let mut buf = crate::touched_buffer(frame);
    let mut policy = policy_of(notify, my_id.is_some(), Side::Sender);
    loop {
        let msg: &[u8] = match &mut file {
            Some(f) => {
                let n = read_full(f, &mut buf)
                    .map_err(|e| Error::Io("reading the payload".into(), e))?;
                &buf[..n]
            }
            None => {
                if sent >= size {
                    break;
                }
                let n = (frame.min((size - sent) as usize)).min(src.len() - pos);
                let m = &src[pos..pos + n];
                pos = (pos + n) % src.len();
                m
            }
        };
        let eof = msg.is_empty();
        loop {
            match p.try_send(msg).map_err(ring_err)? {
                Some(sum) => {
                    policy.progress();
                    if !eof {
                        stream = fold(stream, sum);
                        sent += msg.len() as u64;
                        frames += 1;
                    }
                    if rings && policy.ring_peer(|| p.take_consumer_sleep()) {
                        // Read again at every ring: a receiver whose
                        // ivshmem server restarted has a new ID.
                        notify.ring(j.doorbell_of(c.peer)?);
                    }
                    break;
                }
                None => {
                    live.check(&j.region, &j.geo, monotonic_ms())
                        .map_err(ring_err)?;
                    // Full ring. Adaptive: poll for the budget, then
                    // declare, look again, and sleep until the receiver,
                    // having made room, rings this side.
                    match policy.idle(monotonic_us()) {
                        Idle::Sleep => {
                            p.declare_sleep();
                            if p.free().map_err(ring_err)? < ring::frame_bytes(msg.len() as u64) {
                                notify.wait(Duration::from_millis(50));
                            }
                            p.awake();
                            policy.progress();
                        }
                        Idle::Poll => std::hint::spin_loop(),
                    }
                }
            }
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
    let mut policy = policy_of(notify, my_id.is_some(), Side::Receiver);
    let mut cons = j.region.consumer(j.geo, c.peer, c.me).map_err(ring_err)?;
    let mut sink = match out {
        Some(p) => Some(std::io::BufWriter::new(
            std::fs::File::create(p).map_err(|e| Error::Io(p.display().to_string(), e))?,
        )),
        None => None,
    };
    // Room for the longest frame seen so far, not for the longest the ring
    // could hold: a region may be larger than this guest's memory.
    let first = j.geo.max_payload().min(RECV_BUFFER_START) as usize;
    let mut buf = crate::touched_buffer(first);
    let mut want = if verify.is_some() {
        crate::touched_buffer(first)
    } else {
        Vec::new()
    };
    j.wait_peer(c, |r| {
        r.member_state(&j.geo, c.peer) == Ok(MemberState::Alive)
            && r.ready(&j.geo, c.peer) == Ok(READY_PREPARED)
    })?;
    // The sender sends nothing before the "go" below: whatever is in the
    // ring now was left by an earlier, interrupted transfer.
    cons.drop_stale().map_err(ring_err)?;
    let start = Instant::now();
    j.region
        .set_ready(&j.geo, c.me, ready_go(1))
        .map_err(ring_err)?;
    let mut live = Liveness::new(
        &j.region,
        &j.geo,
        c.peer,
        c.timeout.as_millis() as u64,
        monotonic_ms(),
    );
    let (mut got, mut frames, mut stream, mut last) = (0u64, 0u64, 0u64, start.elapsed());
    let mut idle = 0u64;
    let mut first_frame: Option<u64> = None;
    while size.is_none_or(|s| got < s) {
        let frame = match cons.try_recv(&mut buf) {
            // Longer than any before (and checked to fit the ring): grow.
            Err(RingError::TooLarge(len)) => {
                buf = crate::try_touched_buffer(len as usize)?;
                if verify.is_some() {
                    want = crate::try_touched_buffer(len as usize)?;
                }
                continue;
            }
            r => r.map_err(ring_err)?,
        };
        match frame {
            Some((0, _)) => break,
            Some((n, sum)) => {
                if let Some(seed) = verify {
                    // Frames after the first are as long as the first but
                    // for the last: the sender's frame size.
                    let frame = *first_frame.get_or_insert(n as u64);
                    let pos = pattern_frame_pos(size.unwrap_or(u64::MAX), frame, frames);
                    ring::fill_pattern(seed, pos, &mut want[..n]);
                    if buf[..n] != want[..n] {
                        let i = (0..n).find(|&i| buf[i] != want[i]).unwrap_or(0);
                        return Err(Error::Mismatch {
                            seed,
                            offset: got + i as u64,
                        });
                    }
                }
                got += n as u64;
                frames += 1;
                stream = fold(stream, sum);
                // Adaptive: a sender asleep on a full ring has room now.
                if policy.ring_peer(|| cons.take_producer_sleep()) {
                    notify.ring(j.doorbell_of(c.peer)?);
                }
                last = start.elapsed();
                policy.progress();
                if let Some(w) = &mut sink {
                    w.write_all(&buf[..n])
                        .map_err(|e| Error::Io("writing the payload".into(), e))?;
                }
                idle = 0;
            }
            None if policy.idle(monotonic_us()) == Idle::Sleep => {
                // Declare, look again, sleep. The driver counts
                // interrupts, so a ring since the last wait returns at
                // once: no lost wake-up.
                if policy.declares() {
                    cons.declare_sleep();
                }
                if cons.available().map_err(ring_err)? == 0 {
                    notify.wait(Duration::from_millis(50));
                }
                if policy.declares() {
                    cons.awake();
                }
                policy.progress();
                if let Err(e) = live.check(&j.region, &j.geo, monotonic_ms()) {
                    if cons.available().map_err(ring_err)? == 0 {
                        return Err(Error::Ring(e));
                    }
                }
            }
            None => {
                idle += 1;
                if idle.is_multiple_of(4096) {
                    if let Err(e) = live.check(&j.region, &j.geo, monotonic_ms()) {
                        if cons.available().map_err(ring_err)? == 0 {
                            return Err(Error::Ring(e));
                        }
                    }
                }
                std::hint::spin_loop();
            }
        }
    }
    if let Some(mut w) = sink {
        w.flush()
            .map_err(|e| Error::Io("writing the payload".into(), e))?;
    }
    j.finished();
    Ok(Summary {
        bytes: got,
        frames,
        stream,
        elapsed: last,
    })
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
    region.init(geo).map_err(ring_err)?;
    Ok(geo)
}
