//! An ivshmem server: QEMU's protocol (see [`crate::proto`]) over a unix
//! socket. It hands every client the shared-memory fd, an ID, and the
//! eventfds to ring every other client and be rung, and tells everyone
//! when a client joins or leaves. QEMU's `ivshmem-doorbell` devices and
//! intervm's [`crate::client`] can both connect.
//!
//! The protocol is one-way, so anything a client sends is a violation: that
//! client is disconnected (and announced as gone), the others carry on. A
//! client that stops reading cannot block the server: sends time out.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use crate::proto::{self, PROTOCOL_VERSION};
use crate::{Error, Result};

/// Most clients (peer IDs are 16 bits).
pub const MAX_CLIENTS: usize = 65536;

struct Client {
    id: u16,
    stream: UnixStream,
    fds: Vec<EventFd>,
}

/// A bound server, not yet running.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    shm: File,
    vectors: usize,
    clients: Vec<Client>,
    idle_exit: Option<Duration>,
}

impl Server {
    /// Listens on `path` (replacing a stale socket file) to share `shm`
    /// with `vectors` interrupt vectors per client.
    pub fn bind(path: &Path, shm: File, vectors: usize) -> Result<Self> {
        if vectors == 0 || vectors > 1024 {
            return Err(Error::Config(format!("{vectors} vectors (1..=1024)")));
        }
        if let Ok(meta) = std::fs::symlink_metadata(path) {
            // Only a socket nobody listens on may be replaced: never a
            // file, directory or link a user mistyped as the socket path.
            if !meta.file_type().is_socket() {
                return Err(Error::Config(format!(
                    "{}: exists and is not a socket; refusing to replace it",
                    path.display()
                )));
            }
            if UnixStream::connect(path).is_ok() {
                return Err(Error::Config(format!(
                    "{}: another server is listening there",
                    path.display()
                )));
            }
            std::fs::remove_file(path).map_err(|e| {
                Error::Io(format!("{}: removing a stale socket", path.display()), e)
            })?;
        }
        // Bind under a temporary name and rename: `bind` creates the file
        // before the socket listens, and a client that sees the file (as
        // scripts and tests wait for it) must be able to connect.
        let tmp = match path.file_name() {
            Some(name) => path.with_file_name(format!(
                ".{}.{}.binding",
                name.to_string_lossy(),
                std::process::id()
            )),
            None => path.to_path_buf(),
        };
        let _ = std::fs::remove_file(&tmp);
        let listener = UnixListener::bind(&tmp)
            .map_err(|e| Error::Io(format!("{}: bind", path.display()), e))?;
        if tmp != path {
            std::fs::rename(&tmp, path).map_err(|e| {
                let _ = std::fs::remove_file(&tmp);
                Error::Io(format!("{}: bind", path.display()), e)
            })?;
        }
        listener
            .set_nonblocking(true)
            .map_err(|e| Error::Io("nonblocking".into(), e))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            shm,
            vectors,
            clients: Vec::new(),
            idle_exit: None,
        })
    }

    /// Makes [`Server::run`] return once the last client has left, or when
    /// no client has come within `first`: a server started on demand for
    /// one channel (see [`crate::rendezvous`]) lives as long as its members.
    pub fn exit_when_idle(mut self, first: Duration) -> Self {
        self.idle_exit = Some(first);
        self
    }

    /// IDs of connected clients.
    pub fn clients(&self) -> Vec<u16> {
        self.clients.iter().map(|c| c.id).collect()
    }

    fn free_id(&self) -> Option<u16> {
        (0..MAX_CLIENTS)
            .map(|i| i as u16)
            .find(|id| self.clients.iter().all(|c| c.id != *id))
    }

    fn accept(&mut self, stream: UnixStream) -> Result<()> {
        let Some(id) = self.free_id() else {
            return Err(Error::Protocol("no free peer ID".into()));
        };
        stream
            .set_write_timeout(Some(Duration::from_secs(1)))
            .map_err(|e| Error::Io("timeout".into(), e))?;
        let fds = crate::device::new_eventfds(self.vectors)?;
        let none: Option<&File> = None;
        proto::send(&stream, PROTOCOL_VERSION, none)?;
        proto::send(&stream, id as i64, none)?;
        proto::send(&stream, -1, Some(&self.shm))?;
        for c in &self.clients {
            for f in &c.fds {
                proto::send(&stream, c.id as i64, Some(f))?;
            }
        }
        for f in &fds {
            proto::send(&stream, id as i64, Some(f))?;
        }
        // The new client has everything; only now tell the others, so a
        // client that fails during its setup is never announced.
        let mut failed = Vec::new();
        for c in &self.clients {
            for f in &fds {
                if proto::send(&c.stream, id as i64, Some(f)).is_err() {
                    failed.push(c.id);
                    break;
                }
            }
        }
        log::info!("ivshmem-server: peer {id} joined");
        self.clients.push(Client { id, stream, fds });
        for id in failed {
            self.drop_client(id);
        }
        Ok(())
    }

    fn drop_client(&mut self, id: u16) {
        let Some(i) = self.clients.iter().position(|c| c.id == id) else {
            return;
        };
        self.clients.remove(i);
        log::info!("ivshmem-server: peer {id} left");
        let none: Option<&File> = None;
        let mut failed = Vec::new();
        for c in &self.clients {
            if proto::send(&c.stream, id as i64, none).is_err() {
                failed.push(c.id);
            }
        }
        for id in failed {
            self.drop_client(id);
        }
    }

    /// Serves until `stop` is set (or, with [`Server::exit_when_idle`],
    /// until nobody uses it).
    pub fn run(mut self, stop: Arc<AtomicBool>) -> Result<()> {
        let started = std::time::Instant::now();
        let mut served = false;
        while !stop.load(Ordering::Acquire) {
            served |= !self.clients.is_empty();
            if let Some(first) = self.idle_exit {
                if self.clients.is_empty() && (served || started.elapsed() >= first) {
                    log::info!("ivshmem-server: no peers left; exiting");
                    break;
                }
            }
            let mut fds = vec![libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            fds.extend(self.clients.iter().map(|c| libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            }));
            // SAFETY: `fds` is a valid array of pollfds for its length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            if n <= 0 {
                continue;
            }
            // Any data, hang-up or error from a client ends it: clients
            // never speak in this protocol.
            let gone: Vec<(u16, bool)> = fds[1..]
                .iter()
                .zip(&self.clients)
                .filter(|(p, _)| p.revents != 0)
                .map(|(_, c)| (c.id, sent_data(&c.stream)))
                .collect();
            for (id, spoke) in gone {
                if spoke {
                    log::warn!("ivshmem-server: peer {id} sent data; disconnecting it");
                }
                self.drop_client(id);
            }
            if fds[0].revents & libc::POLLIN != 0 {
                while let Ok((s, _)) = self.listener.accept() {
                    if let Err(e) = s.set_nonblocking(false) {
                        log::warn!("ivshmem-server: {e}");
                        continue;
                    }
                    if let Err(e) = self.accept(s) {
                        log::warn!("ivshmem-server: a client failed to join: {e}");
                    }
                }
            }
        }
        Ok(())
    }
}

/// True when `s` holds data to read (a violation), false when it only hung
/// up or failed.
fn sent_data(s: &UnixStream) -> bool {
    let mut b = [0u8; 1];
    // SAFETY: receives at most one byte into `b`, which outlives the call;
    // MSG_PEEK leaves it queued and MSG_DONTWAIT never blocks.
    let n = unsafe {
        libc::recv(
            s.as_raw_fd(),
            b.as_mut_ptr().cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n > 0
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}
