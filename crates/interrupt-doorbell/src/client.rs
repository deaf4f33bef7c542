//! Joining an ivshmem server as a client (see [`crate::proto`]): the
//! handshake gives this member its ID, the shared memory and its receive
//! eventfds; afterwards a thread follows join and leave notices and keeps
//! the device's peer table current.

use std::collections::HashMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::{Mutex, Weak};
use std::time::Duration;

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

fn eventfd(f: File) -> EventFd {
    // SAFETY: the server sent an eventfd; we own the descriptor now.
    unsafe { EventFd::from_raw_fd(f.into_raw_fd()) }
}

fn id_of(v: i64) -> Result<u16> {
    u16::try_from(v).map_err(|_| Error::Protocol(format!("{v} is not a peer ID")))
}

/// Connects to the server at `path` as a device with `vectors` vectors.
pub fn connect(path: &Path, vectors: usize) -> Result<Session> {
    let stream = UnixStream::connect(path)
        .map_err(|e| Error::Io(format!("{}: connect", path.display()), e))?;
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| Error::Io("timeout".into(), e))?;
    let next = |what: &str| -> Result<(i64, Option<File>)> {
        proto::recv(&stream)?
            .ok_or_else(|| Error::Protocol(format!("server hung up before {what}")))
    };
    let (version, _) = next("the version")?;
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
    // Reopen: a new open file description, so flock serialises formatting.
    let shm = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(format!("/proc/self/fd/{}", shm.as_raw_fd()))
        .unwrap_or(shm);
    let mut peers: HashMap<u16, Vec<EventFd>> = HashMap::new();
    let mut own = Vec::new();
    stream
        .set_read_timeout(Some(Duration::from_millis(500)))
        .map_err(|e| Error::Io("timeout".into(), e))?;
    while own.len() < vectors {
        let (v, fd) = match proto::recv(&stream) {
            Ok(Some(m)) => m,
            Ok(None) => return Err(Error::Protocol("server hung up during setup".into())),
            // Fewer vectors on the server than here: the rest stay unconnected.
            Err(Error::Io(_, e))
                if !own.is_empty() && e.kind() == std::io::ErrorKind::WouldBlock =>
            {
                break
            }
            Err(e) => return Err(e),
        };
        let peer = id_of(v)?;
        let Some(fd) = fd else {
            peers.remove(&peer);
            continue;
        };
        if peer == id {
            own.push(eventfd(fd));
        } else {
            let list = peers.entry(peer).or_default();
            if list.len() < vectors {
                list.push(eventfd(fd));
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

impl Session {
    /// Hands the peers known so far to `dev` and follows the server's
    /// notices on a thread until the server hangs up or misbehaves (then
    /// the peers stay as they were, as QEMU does) or the device is gone.
    pub fn follow(self, dev: Weak<Mutex<IvshmemDoorbell>>) -> Result<std::thread::JoinHandle<()>> {
        let Session {
            id,
            peers,
            stream,
            vectors,
            ..
        } = self;
        if let Some(d) = dev.upgrade() {
            if let Ok(mut g) = d.lock() {
                for (p, evts) in peers {
                    g.add_peer(p, evts);
                }
            }
        }
        std::thread::Builder::new()
            .name(format!("ivshmem-client-{id}"))
            .spawn(move || {
                let mut pending: HashMap<u16, Vec<EventFd>> = HashMap::new();
                loop {
                    let msg = match proto::recv(&stream) {
                        Ok(Some(m)) => m,
                        Ok(None) => {
                            log::warn!("ivshmem client {id}: the server hung up");
                            return;
                        }
                        Err(e) => {
                            log::warn!("ivshmem client {id}: {e}; no more join/leave notices");
                            return;
                        }
                    };
                    let Some(d) = dev.upgrade() else { return };
                    let Ok(peer) = id_of(msg.0) else {
                        log::warn!("ivshmem client {id}: bad peer ID {}", msg.0);
                        return;
                    };
                    let Ok(mut g) = d.lock() else { return };
                    match msg.1 {
                        Some(fd) if peer != id => {
                            let list = pending.entry(peer).or_default();
                            if list.len() < vectors {
                                list.push(eventfd(fd));
                            }
                            let clones: Vec<EventFd> =
                                list.iter().filter_map(|e| e.try_clone().ok()).collect();
                            g.add_peer(peer, clones);
                        }
                        Some(_) => {}
                        None => {
                            pending.remove(&peer);
                            g.remove_peer(peer);
                        }
                    }
                }
            })
            .map_err(|e| Error::Io("spawning the client thread".into(), e))
    }
}
