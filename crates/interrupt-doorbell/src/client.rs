//! Joining an ivshmem server as a client (see [`crate::proto`]): the
//! handshake gives this member its ID, the shared memory and its receive
//! eventfds; afterwards [`ServerNotices`], in the VM's event loop, follows
//! join and leave notices and keeps the device's peer table current.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, Weak};
use std::time::{Duration, Instant};

use vmm_core::events::{EventLoop, EventOps, Events, MutEventSubscriber};
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
/// a server with fewer vectors than this device sends no more.
const MORE_VECTORS_WAIT: Duration = Duration::from_millis(500);

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
        stream
            .set_read_timeout(Some(per.min(left)))
            .map_err(|e| Error::Io("timeout".into(), e))
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
    let next = |what: &str| -> Result<(i64, Option<File>)> {
        wait(limit)?;
        proto::recv(&stream)
            .map_err(timed_out)?
            .ok_or_else(|| Error::Protocol(format!("server hung up before {what}")))
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
    stream
        .set_read_timeout(None)
        .map_err(|e| Error::Io("timeout".into(), e))?;
    Ok(Session {
        id,
        shm,
        own,
        peers,
        stream,
        vectors,
    })
}

/// How long the follower waits for the rest of a message the server
/// began: the event loop it runs on serves other sources too.
const MESSAGE_WAIT: Duration = Duration::from_secs(1);

impl Session {
    /// Hands the peers known so far to `dev` and returns the follower of
    /// the server's later notices, to put into an event loop.
    pub fn follower(self, dev: Weak<Mutex<IvshmemDoorbell>>) -> Result<ServerNotices> {
        let Session {
            id,
            peers,
            stream,
            vectors,
            ..
        } = self;
        stream
            .set_read_timeout(Some(MESSAGE_WAIT))
            .map_err(|e| Error::Io("timeout".into(), e))?;
        if let Some(d) = dev.upgrade() {
            let mut g = d.lock().map_err(|_| Error::Poisoned)?;
            for (p, evts) in peers {
                g.add_peer(p, evts);
            }
        }
        Ok(ServerNotices {
            id,
            dev,
            stream: Some(stream),
            vectors,
            pending: HashMap::new(),
        })
    }

    /// [`Session::follower`], put into `events` (a VM's event loop).
    pub fn follow(self, dev: Weak<Mutex<IvshmemDoorbell>>, events: &EventLoop) -> Result<()> {
        let f = self.follower(dev)?;
        events.add(Box::new(f)).map_err(Error::Events)?;
        Ok(())
    }
}

/// Follows the server's join and leave notices and keeps a device's peer
/// table current, as an event-loop subscriber ([`vmm_core::events`]).
/// When the server hangs up or misbehaves the peers stay as they were (as
/// QEMU does); when the device is gone the connection is closed.
pub struct ServerNotices {
    id: u16,
    dev: Weak<Mutex<IvshmemDoorbell>>,
    stream: Option<UnixStream>,
    vectors: usize,
    /// Eventfds of peers announced since the handshake, by peer.
    pending: HashMap<u16, Vec<EventFd>>,
}

impl ServerNotices {
    /// Takes one notice. `Err`: stop following, with the reason to log.
    fn take(&mut self, stream: &UnixStream) -> std::result::Result<(), String> {
        let id = self.id;
        let msg = match proto::recv(stream) {
            Ok(Some(m)) => m,
            Ok(None) => return Err("the server hung up".into()),
            Err(e) => return Err(format!("{e}; no more join/leave notices")),
        };
        let Some(d) = self.dev.upgrade() else {
            return Err("the device is gone".into());
        };
        let peer = id_of(msg.0).map_err(|_| format!("bad peer ID {}", msg.0))?;
        let mut g = d
            .lock()
            .map_err(|_| "the device's lock is poisoned".to_string())?;
        match msg.1 {
            Some(fd) if peer != id => {
                let list = self.pending.entry(peer).or_default();
                if list.len() < self.vectors {
                    list.push(eventfd(fd).map_err(|e| format!("{e}; no more join/leave notices"))?);
                }
                let clones: Vec<EventFd> = list.iter().filter_map(|e| e.try_clone().ok()).collect();
                g.add_peer(peer, clones);
            }
            Some(_) => {}
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
        match self.take(&stream) {
            Ok(()) => self.stream = Some(stream),
            Err(why) => {
                log::warn!("ivshmem client {}: {why}", self.id);
                let _ = ops.remove(Events::new(&stream, EventSet::IN));
            }
        }
    }
}
