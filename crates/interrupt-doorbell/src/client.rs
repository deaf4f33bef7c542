//! Joining an ivshmem server as a client (see [`crate::proto`]): the
//! handshake gives this member its ID, the shared memory and its receive
//! eventfds; afterwards [`ServerNotices`], in the VM's event loop, follows
//! join and leave notices and keeps the device's peer table current.
//!
//! When the server goes away (it was restarted, or crashed and was
//! started again) the follower joins it again in the background
//! ([`Session::follow`]): the device takes its new ID, receive eventfds
//! and peers ([`IvshmemDoorbell::rejoined`]), and the region must be the
//! same object as before (a server sharing another one is refused, as the
//! guest's BAR2 cannot change under it).

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use vmm_core::events::{EventLoop, EventOps, Events, LoopHandle, MutEventSubscriber};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::proto::{self, PROTOCOL_VERSION};
use crate::{Error, IvshmemDoorbell, Result};

/// What the handshake gave.
pub struct Session {
    /// This member's peer ID.
    pub id: u16,
    /// The shared memory (a fresh open file description of it, so `flock`
    /// works between processes).
    pub shm: File,
    /// Eventfds this member is rung on, one per vector.
    pub own: Vec<EventFd>,
    /// Eventfds to ring the peers already there.
    pub peers: HashMap<u16, Vec<EventFd>>,
    stream: UnixStream,
    vectors: usize,
    socket: PathBuf,
}

/// Takes a descriptor the server says is an eventfd: checks that it is
/// one (a pipe or socket in its place could block the vCPU that rings it)
/// and makes it non-blocking, so that ringing a peer whose counter the
/// server saturated fails at once (the peer has a ring pending anyway)
/// instead of blocking under the device lock.
fn eventfd(f: File) -> Result<EventFd> {
    let link = std::fs::read_link(format!("/proc/self/fd/{}", f.as_raw_fd()))
        .map_err(|e| Error::Io("inspecting a received eventfd".into(), e))?;
    if link.as_os_str() != "anon_inode:[eventfd]" {
        return Err(Error::Protocol(format!(
            "the server sent {} where an eventfd belongs",
            link.display()
        )));
    }
    // SAFETY: F_GETFL/F_SETFL on a descriptor we own; no memory involved.
    let ok = unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        flags >= 0 && libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
    };
    if !ok {
        return Err(Error::Io(
            "making a received eventfd non-blocking".into(),
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: checked above to be an eventfd; we own the descriptor now.
    Ok(unsafe { EventFd::from_raw_fd(f.into_raw_fd()) })
}

fn id_of(v: i64) -> Result<u16> {
    u16::try_from(v).map_err(|_| Error::Protocol(format!("{v} is not a peer ID")))
}

/// How long [`connect`] may take in all: connecting, the handshake and
/// every peer's eventfds. A server that stalls, or keeps the client busy
/// with notices, cannot hold a joining VMM longer than this.
pub const JOIN_DEADLINE: Duration = Duration::from_secs(10);

/// How long to wait for one more own eventfd once at least one has come:
/// a server with fewer vectors than this device sends no more (the
/// protocol has no end marker), and a join of such a device takes this
/// much longer. A server sends its vectors in one burst, so only a server
/// the host does not schedule for this long is cut short.
const MORE_VECTORS_WAIT: Duration = Duration::from_secs(3);

/// Connects to the server at `path` as a device with `vectors` vectors,
/// within [`JOIN_DEADLINE`].
pub fn connect(path: &Path, vectors: usize) -> Result<Session> {
    connect_within(path, vectors, JOIN_DEADLINE)
}

/// Checks a received shared-memory fd: a regular file (or memfd) opened
/// read-write. Reopening it (below) then cannot gain an access the server
/// did not give.
fn check_shm(f: &File) -> Result<()> {
    let meta = f
        .metadata()
        .map_err(|e| Error::Io("stat of the shared-memory fd".into(), e))?;
    if !meta.file_type().is_file() {
        return Err(Error::Protocol(
            "the shared-memory fd is not a regular file or memfd".into(),
        ));
    }
    // SAFETY: F_GETFL on a descriptor we own; no memory involved.
    let flags = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GETFL) };
    if flags < 0 {
        return Err(Error::Io(
            "fcntl of the shared-memory fd".into(),
            std::io::Error::last_os_error(),
        ));
    }
    if flags & libc::O_ACCMODE != libc::O_RDWR {
        return Err(Error::Protocol(
            "the shared-memory fd is not open read-write".into(),
        ));
    }
    Ok(())
}

/// Like [`connect`], with the whole join bounded by `limit`.
pub fn connect_within(path: &Path, vectors: usize, limit: Duration) -> Result<Session> {
    let deadline = Instant::now() + limit;
    let stream = UnixStream::connect(path).map_err(|source| Error::Unreachable {
        socket: path.to_path_buf(),
        source,
    })?;
    let late = || {
        Error::Protocol(format!(
            "{}: the server did not complete the join within {} s",
            path.display(),
            limit.as_secs_f64()
        ))
    };
    // Each receive waits at most `per` and never past the deadline.
    let wait = |per: Duration| -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(late());
        }
        stream.set_read_timeout(Some(per.min(left))).map_err(|e| {
            Error::Io(
                "setting the ivshmem server socket's receive timeout".into(),
                e,
            )
        })
    };
    // A receive that times out under `wait(limit)` has hit the deadline.
    let timed_out = |e: Error| match e {
        Error::Io(_, ref io)
            if matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            ) =>
        {
            late()
        }
        e => e,
    };
    wait(limit)?;
    let (version, _) = match proto::recv(&stream).map_err(timed_out)? {
        Some(m) => m,
        // Accepted, then closed: a server on its way out. Worth a retry.
        None => {
            return Err(Error::Unreachable {
                socket: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "the server hung up before the version",
                ),
            })
        }
    };
    // A hang-up anywhere in the handshake is a server on its way out (one
    // killed while this member joined): worth a retry, like one that never
    // answered.
    let next = |what: &str| -> Result<(i64, Option<File>)> {
        wait(limit)?;
        proto::recv(&stream)
            .map_err(timed_out)?
            .ok_or_else(|| Error::Unreachable {
                socket: path.to_path_buf(),
                source: std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    format!("the server hung up before {what}"),
                ),
            })
    };
    if version != PROTOCOL_VERSION {
        return Err(Error::Protocol(format!(
            "version {version}, expected {PROTOCOL_VERSION}"
        )));
    }
    let id = id_of(next("the peer ID")?.0)?;
    let (minus_one, shm) = next("the shared memory")?;
    let shm = match (minus_one, shm) {
        (-1, Some(f)) => f,
        _ => {
            return Err(Error::Protocol(
                "expected -1 with the shared-memory fd".into(),
            ))
        }
    };
    check_shm(&shm)?;
    // Reopen: a new open file description, so flock serialises formatting.
    // The fd is read-write (checked), so this grants nothing new.
    let shm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", shm.as_raw_fd()))
        .unwrap_or(shm);
    let mut peers: HashMap<u16, Vec<EventFd>> = HashMap::new();
    let mut own = Vec::new();
    while own.len() < vectors {
        wait(if own.is_empty() {
            limit
        } else {
            MORE_VECTORS_WAIT
        })?;
        let (v, fd) = match proto::recv(&stream) {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Error::Protocol("server hung up during setup".into())),
            // Fewer vectors on the server than here: the rest stay unconnected.
            Err(Error::Io(_, e))
                if !own.is_empty()
                    && matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
            {
                break
            }
            Err(e) => return Err(timed_out(e)),
        };
        let peer = id_of(v)?;
        let Some(fd) = fd else {
            peers.remove(&peer);
            continue;
        };
        if peer == id {
            own.push(eventfd(fd)?);
        } else {
            let list = peers.entry(peer).or_default();
            if list.len() < vectors {
                list.push(eventfd(fd)?);
            }
        }
    }
    stream.set_read_timeout(None).map_err(|e| {
        Error::Io(
            "setting the ivshmem server socket's receive timeout".into(),
            e,
        )
    })?;
    Ok(Session {
        id,
        shm,
        own,
        peers,
        stream,
        vectors,
        socket: path.to_path_buf(),
    })
}

/// True when `a` and `b` are the same file or memfd (device and inode):
/// a server's region against the one a member mapped.
pub fn same_object(a: &File, b: &File) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (a.metadata(), b.metadata()) {
        (Ok(x), Ok(y)) => x.dev() == y.dev() && x.ino() == y.ino(),
        _ => false,
    }
}

/// How long the follower waits for the rest of a message the server
/// began: the event loop it runs on serves other sources too.
const MESSAGE_WAIT: Duration = Duration::from_secs(1);

/// Joins the server again after it went away, for a fresh [`Session`]
/// (the default connects to the same socket with the same vectors; a VMM
/// that starts servers on demand starts one here). Called again every
/// [`REJOIN_RETRY`] until it succeeds or the device is gone.
pub type Reconnect = Box<dyn FnMut() -> Result<Session> + Send>;

/// Told this member's new peer ID after each rejoin (a VMM publishes it
/// where its peers look it up).
pub type OnRejoin = Box<dyn FnMut(u16) + Send>;

/// What a follower does when its server hangs up (see [`Session::follow_with`]).
#[derive(Default)]
pub struct Rejoin {
    /// How to join again (`None`: the same socket, the same vectors).
    pub reconnect: Option<Reconnect>,
    /// Called after each rejoin.
    pub on_rejoin: Option<OnRejoin>,
}

/// How long to wait between attempts to join a server that went away.
pub const REJOIN_RETRY: Duration = Duration::from_millis(250);

/// A follower's way back to its server, once it has an event loop to
/// put the next follower into.
struct Rejoiner {
    reconnect: Reconnect,
    on_rejoin: Option<OnRejoin>,
    events: LoopHandle,
}

impl Session {
    /// Hands the peers known so far to `dev` and returns the follower of
    /// the server's later notices, to put into an event loop. It does not
    /// rejoin a server that goes away (see [`Session::follow`]).
    pub fn follower(self, dev: Weak<Mutex<IvshmemDoorbell>>) -> Result<ServerNotices> {
        let Session {
            id,
            peers,
            stream,
            vectors,
            ..
        } = self;
        if let Some(d) = dev.upgrade() {
            let mut g = d.lock().map_err(|_| Error::Poisoned)?;
            for (p, evts) in peers {
                g.add_peer(p, evts);
            }
        }
        ServerNotices::new(id, dev, stream, vectors, None)
    }

    /// [`Session::follower`], put into `events` (a VM's event loop); when
    /// the server goes away, it joins the same socket again as soon as a
    /// server answers there.
    pub fn follow(self, dev: Weak<Mutex<IvshmemDoorbell>>, events: &EventLoop) -> Result<()> {
        self.follow_with(dev, events, Rejoin::default())
    }

    /// [`Session::follow`], rejoining as `rejoin` says.
    pub fn follow_with(
        self,
        dev: Weak<Mutex<IvshmemDoorbell>>,
        events: &EventLoop,
        rejoin: Rejoin,
    ) -> Result<()> {
        let reconnect = rejoin.reconnect.unwrap_or_else(|| {
            let (socket, vectors) = (self.socket.clone(), self.vectors);
            Box::new(move || connect(&socket, vectors))
        });
        let mut f = self.follower(dev)?;
        f.rejoin = Some(Rejoiner {
            reconnect,
            on_rejoin: rejoin.on_rejoin,
            events: events.handle(),
        });
        events.add(Box::new(f)).map_err(Error::Events)?;
        Ok(())
    }
}

/// Follows the server's join and leave notices and keeps a device's peer
/// table current, as an event-loop subscriber ([`vmm_core::events`]).
/// When the server misbehaves the peers stay as they were (as QEMU does);
/// when it hangs up, the same, and a follower from [`Session::follow`]
/// joins it again once it is back; when the device is gone the connection
/// is closed.
pub struct ServerNotices {
    id: u16,
    dev: Weak<Mutex<IvshmemDoorbell>>,
    stream: Option<UnixStream>,
    vectors: usize,
    /// Eventfds of peers announced since the handshake, by peer.
    pending: HashMap<u16, Vec<EventFd>>,
    rejoin: Option<Rejoiner>,
}

/// Why a follower stops.
enum Stop {
    /// The server closed the connection.
    HungUp,
    /// Anything else, to log.
    Failed(String),
}

impl ServerNotices {
    fn new(
        id: u16,
        dev: Weak<Mutex<IvshmemDoorbell>>,
        stream: UnixStream,
        vectors: usize,
        rejoin: Option<Rejoiner>,
    ) -> Result<Self> {
        stream.set_read_timeout(Some(MESSAGE_WAIT)).map_err(|e| {
            Error::Io(
                "setting the ivshmem server socket's receive timeout".into(),
                e,
            )
        })?;
        Ok(Self {
            id,
            dev,
            stream: Some(stream),
            vectors,
            pending: HashMap::new(),
            rejoin,
        })
    }

    /// Takes one notice.
    fn take(&mut self, stream: &UnixStream) -> std::result::Result<(), Stop> {
        let id = self.id;
        let msg = match proto::recv(stream) {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Stop::HungUp),
            Err(Error::Io(_, e)) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                return Err(Stop::HungUp)
            }
            Err(e) => return Err(Stop::Failed(format!("{e}; no more join/leave notices"))),
        };
        let Some(d) = self.dev.upgrade() else {
            return Err(Stop::Failed("the device is gone".into()));
        };
        let peer = id_of(msg.0).map_err(|_| Stop::Failed(format!("bad peer ID {}", msg.0)))?;
        let mut g = d
            .lock()
            .map_err(|_| Stop::Failed("the device's lock is poisoned".into()))?;
        match msg.1 {
            Some(fd) if peer != id => {
                let list = self.pending.entry(peer).or_default();
                if list.len() < self.vectors {
                    list.push(
                        eventfd(fd).map_err(|e| {
                            Stop::Failed(format!("{e}; no more join/leave notices"))
                        })?,
                    );
                }
                let clones: Vec<EventFd> = list.iter().filter_map(|e| e.try_clone().ok()).collect();
                g.add_peer(peer, clones);
            }
            Some(_) => {}
            // "Peer left" for this member itself: a server's mistake (or
            // malice) that must not take its self-doorbell away, as QEMU
            // ignores it too.
            None if peer == id => {
                log::warn!("ivshmem client {id}: the server said this member left; ignored");
            }
            None => {
                self.pending.remove(&peer);
                g.remove_peer(peer);
            }
        }
        Ok(())
    }
}

impl MutEventSubscriber for ServerNotices {
    fn init(&mut self, ops: &mut EventOps) {
        if let Some(s) = &self.stream {
            if let Err(e) = ops.add(Events::new(s, EventSet::IN)) {
                log::warn!("ivshmem client {}: {e}; no join/leave notices", self.id);
            }
        }
    }

    fn process(&mut self, _: Events, ops: &mut EventOps) {
        let Some(stream) = self.stream.take() else {
            return;
        };
        let stop = match self.take(&stream) {
            Ok(()) => {
                self.stream = Some(stream);
                return;
            }
            Err(stop) => stop,
        };
        let _ = ops.remove(Events::new(&stream, EventSet::IN));
        match (stop, self.rejoin.take()) {
            (Stop::HungUp, Some(r)) if self.dev.strong_count() > 0 => {
                log::warn!(
                    "ivshmem client {}: the server hung up; joining it again once it is back \
                     (the peers stay as they were meanwhile)",
                    self.id
                );
                rejoin_in_background(self.dev.clone(), self.id, r);
            }
            (Stop::HungUp, _) => log::warn!("ivshmem client {}: the server hung up", self.id),
            (Stop::Failed(why), _) => log::warn!("ivshmem client {}: {why}", self.id),
        }
    }
}

/// Takes a session of a server that came back into `dev` (its eventfds
/// are taken out of `s`) and says how many peers are there. `Ok(None)`: the
/// device is gone.
fn take_rejoin(dev: &Weak<Mutex<IvshmemDoorbell>>, s: &mut Session) -> Result<Option<usize>> {
    let Some(d) = dev.upgrade() else {
        return Ok(None);
    };
    let mut g = d.lock().map_err(|_| Error::Poisoned)?;
    if !same_object(&s.shm, g.region().file()) {
        return Err(Error::Rejoin(format!(
            "the server on {} now shares another object than the region this VM maps \
             ({}); this member stays without doorbells to new peers",
            s.socket.display(),
            g.region().label()
        )));
    }
    let peers = s.peers.len();
    g.rejoined(
        s.id,
        std::mem::take(&mut s.own),
        std::mem::take(&mut s.peers),
    )?;
    Ok(Some(peers))
}

/// Joins the server again on a thread of its own (a join may wait for a
/// server to start), then puts a new follower into the VM's event loop.
/// Gives up when the device is gone or the server shares another region.
fn rejoin_in_background(dev: Weak<Mutex<IvshmemDoorbell>>, old: u16, mut r: Rejoiner) {
    let run = move || {
        let mut last = String::new();
        while dev.strong_count() > 0 {
            let failed = match (r.reconnect)() {
                Ok(mut s) => match take_rejoin(&dev, &mut s) {
                    Ok(None) => return,
                    Ok(Some(peers)) => {
                        let id = s.id;
                        if let Some(f) = r.on_rejoin.as_mut() {
                            f(id);
                        }
                        // After the new ID is published (see `rejoined`).
                        if let Some(d) = dev.upgrade() {
                            if let Ok(g) = d.lock() {
                                g.wake_all();
                            }
                        }
                        log::info!(
                            "ivshmem client {old}: joined {} again as peer {id}, {peers} peer(s) there",
                            s.socket.display()
                        );
                        let events = r.events.clone();
                        match ServerNotices::new(id, dev, s.stream, s.vectors, Some(r)) {
                            Ok(f) => events.add_later(Box::new(f)),
                            Err(e) => log::warn!("ivshmem client {id}: {e}; no join/leave notices"),
                        }
                        return;
                    }
                    Err(e @ Error::Rejoin(_)) => {
                        log::error!("ivshmem client {old}: {e}");
                        return;
                    }
                    Err(e) => e.to_string(),
                },
                Err(e) => e.to_string(),
            };
            if failed != last {
                log::info!("ivshmem client {old}: not joined again yet: {failed}; retrying");
                last = failed;
            }
            std::thread::sleep(REJOIN_RETRY);
        }
    };
    if let Err(e) = std::thread::Builder::new()
        .name("ivshmem-rejoin".into())
        .spawn(run)
    {
        log::warn!("ivshmem client {old}: cannot rejoin the server: {e}");
    }
}
