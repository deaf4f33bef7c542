//! An ivshmem server: QEMU's protocol (see [`crate::proto`]) over a unix
//! socket. It hands every client the shared-memory fd, an ID, and the
//! eventfds to ring every other client and be rung, and tells everyone
//! when a client joins or leaves. QEMU's `ivshmem-doorbell` devices and
//! intervm's [`crate::client`] can both connect.
//!
//! The protocol is one-way, so anything a client sends is a violation: that
//! client is disconnected (and announced as gone), the others carry on.
//!
//! No client can hold up the others. Sockets are non-blocking and every
//! client has its own queue of messages, sent as fast as it reads them.
//! Its budget: a client whose queue made no progress for [`CLIENT_STALL`],
//! or grew past what a join of [`Server::with_max_clients`] peers needs, is
//! disconnected. At most that many clients are served at once (64 by
//! default): later ones are turned away until one leaves. Running out of
//! descriptors pauses accepting for a moment instead of spinning.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::EventFd;

use crate::proto::{self, PROTOCOL_VERSION};
use crate::{Error, Result};

/// Most clients the protocol can name (peer IDs are 16 bits).
pub const MAX_CLIENTS: usize = 65536;

/// Clients served at once unless [`Server::with_max_clients`] says otherwise.
pub const DEFAULT_MAX_CLIENTS: usize = 64;

/// A client whose queued messages made no progress for this long is
/// disconnected.
pub const CLIENT_STALL: Duration = Duration::from_secs(5);

/// How long accepting pauses when the process is out of descriptors.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(200);

/// A message waiting to be sent to one client. Eventfds are named, not
/// held: one that belongs to a client gone by the time it is sent is
/// skipped (that client's "left" notice follows anyway).
#[derive(Clone, Copy, Debug)]
enum Out {
    Version,
    Id(u16),
    Shm,
    /// Client `peer`'s eventfd for `vector`.
    Fd {
        peer: u16,
        vector: usize,
    },
    Left(u16),
}

struct Client {
    id: u16,
    stream: UnixStream,
    fds: Vec<EventFd>,
    out: VecDeque<Out>,
    /// When the queue last made progress (or became non-empty).
    progress: Instant,
}

/// A bound server, not yet running.
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    shm: File,
    vectors: usize,
    clients: Vec<Client>,
    idle_exit: Option<Duration>,
    max_clients: usize,
    accept_paused_until: Option<Instant>,
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
            .map_err(|e| Error::Io(format!("{}: making it non-blocking", path.display()), e))?;
        Ok(Self {
            listener,
            path: path.to_path_buf(),
            shm,
            vectors,
            clients: Vec::new(),
            idle_exit: None,
            max_clients: DEFAULT_MAX_CLIENTS,
            accept_paused_until: None,
        })
    }

    /// Serves at most `n` clients at once (1..=[`MAX_CLIENTS`]); a client
    /// beyond that is accepted and closed at once, and can retry.
    pub fn with_max_clients(mut self, n: usize) -> Self {
        self.max_clients = n.clamp(1, MAX_CLIENTS);
        self
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

    /// Messages one client may have queued: a whole join with every
    /// other client's eventfds, and as many join and leave notices again.
    fn queue_budget(&self) -> usize {
        8 + 2 * (self.max_clients + 1) * (self.vectors + 1)
    }

    /// Queues `m` for client `i`; false when that exceeds its budget.
    fn queue(&mut self, i: usize, m: Out) -> bool {
        let budget = self.queue_budget();
        let c = &mut self.clients[i];
        if c.out.is_empty() {
            c.progress = Instant::now();
        }
        c.out.push_back(m);
        c.out.len() <= budget
    }

    fn accept(&mut self, stream: UnixStream) -> Result<()> {
        if self.clients.len() >= self.max_clients {
            return Err(Error::Protocol(format!(
                "{} clients already (the most this server takes); turned away",
                self.clients.len()
            )));
        }
        let Some(id) = self.free_id() else {
            return Err(Error::Protocol("no free peer ID".into()));
        };
        stream
            .set_nonblocking(true)
            .map_err(|e| Error::Io("making a client's connection non-blocking".into(), e))?;
        let fds = crate::device::new_eventfds(self.vectors)?;
        let mut out = VecDeque::from([Out::Version, Out::Id(id), Out::Shm]);
        for c in &self.clients {
            out.extend((0..c.fds.len()).map(|vector| Out::Fd { peer: c.id, vector }));
        }
        out.extend((0..fds.len()).map(|vector| Out::Fd { peer: id, vector }));
        log::info!("ivshmem-server: peer {id} joined");
        self.clients.push(Client {
            id,
            stream,
            fds,
            out,
            progress: Instant::now(),
        });
        // Everyone else learns the new client's eventfds.
        let mut over = Vec::new();
        for i in 0..self.clients.len() - 1 {
            for vector in 0..self.vectors {
                if !self.queue(i, Out::Fd { peer: id, vector }) {
                    over.push(self.clients[i].id);
                    break;
                }
            }
        }
        self.drop_clients(over, "its queue is over budget");
        Ok(())
    }

    /// Disconnects `ids` and announces each to the rest; a client whose
    /// queue overflows with those notices goes too (a work list, not
    /// recursion).
    fn drop_clients(&mut self, mut ids: Vec<u16>, why: &str) {
        while let Some(id) = ids.pop() {
            let Some(i) = self.clients.iter().position(|c| c.id == id) else {
                continue;
            };
            self.clients.remove(i);
            log::info!("ivshmem-server: peer {id} left ({why})");
            for j in 0..self.clients.len() {
                if !self.queue(j, Out::Left(id)) {
                    ids.push(self.clients[j].id);
                }
            }
        }
    }

    /// Sends what client `i` has queued until its socket is full. Returns
    /// false when the client failed (disconnect it).
    fn flush(&mut self, i: usize) -> bool {
        let none: Option<&File> = None;
        loop {
            let c = &self.clients[i];
            let Some(&m) = c.out.front() else {
                return true;
            };
            let sent = match m {
                Out::Version => proto::send(&c.stream, PROTOCOL_VERSION, none),
                Out::Id(id) => proto::send(&c.stream, id as i64, none),
                Out::Shm => proto::send(&c.stream, -1, Some(&self.shm)),
                Out::Left(id) => proto::send(&c.stream, id as i64, none),
                Out::Fd { peer, vector } => {
                    match self
                        .clients
                        .iter()
                        .find(|p| p.id == peer)
                        .and_then(|p| p.fds.get(vector))
                    {
                        Some(f) => proto::send(&c.stream, peer as i64, Some(f)),
                        // That peer left before this was sent.
                        None => Ok(()),
                    }
                }
            };
            match sent {
                Ok(()) => {
                    let c = &mut self.clients[i];
                    c.out.pop_front();
                    c.progress = Instant::now();
                }
                Err(Error::Io(_, e)) if e.kind() == std::io::ErrorKind::WouldBlock => return true,
                Err(e) => {
                    log::warn!("ivshmem-server: peer {}: {e}", c.id);
                    return false;
                }
            }
        }
    }

    /// Accepts every waiting connection.
    fn accept_all(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((s, _)) => {
                    if let Err(e) = self.accept(s) {
                        log::warn!("ivshmem-server: a client failed to join: {e}");
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // Out of descriptors (EMFILE/ENFILE) or another
                    // resource: the connection stays queued; try again
                    // shortly instead of polling a listener that stays
                    // readable.
                    log::warn!(
                        "ivshmem-server: accept: {e}; pausing {} ms",
                        ACCEPT_BACKOFF.as_millis()
                    );
                    self.accept_paused_until = Some(Instant::now() + ACCEPT_BACKOFF);
                    return;
                }
            }
        }
    }

    /// Serves until `stop` is set (or, with [`Server::exit_when_idle`],
    /// until nobody uses it).
    pub fn run(mut self, stop: Arc<AtomicBool>) -> Result<()> {
        let started = Instant::now();
        let mut served = false;
        while !stop.load(Ordering::Acquire) {
            served |= !self.clients.is_empty();
            if let Some(first) = self.idle_exit {
                if self.clients.is_empty() && (served || started.elapsed() >= first) {
                    log::info!("ivshmem-server: no peers left; exiting");
                    break;
                }
            }
            let paused = self.accept_paused_until.is_some_and(|t| Instant::now() < t);
            let mut fds = vec![libc::pollfd {
                // A negative fd is ignored by poll.
                fd: if paused {
                    -1
                } else {
                    self.listener.as_raw_fd()
                },
                events: libc::POLLIN,
                revents: 0,
            }];
            fds.extend(self.clients.iter().map(|c| libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events: libc::POLLIN | if c.out.is_empty() { 0 } else { libc::POLLOUT },
                revents: 0,
            }));
            // SAFETY: `fds` is a valid array of pollfds for its length.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
            // Any data, hang-up or error from a client ends it: clients
            // never speak in this protocol.
            let mut gone = Vec::new();
            if n > 0 {
                for (c, p) in self.clients.iter().zip(&fds[1..]) {
                    if p.revents & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                        if sent_data(&c.stream) {
                            log::warn!("ivshmem-server: peer {} sent data; disconnecting it", c.id);
                        }
                        gone.push(c.id);
                    }
                }
            }
            // The per-client budget in time.
            for c in &self.clients {
                if !c.out.is_empty()
                    && c.progress.elapsed() >= CLIENT_STALL
                    && !gone.contains(&c.id)
                {
                    log::warn!(
                        "ivshmem-server: peer {} took none of its {} queued messages for {} s; disconnecting it",
                        c.id,
                        c.out.len(),
                        CLIENT_STALL.as_secs()
                    );
                    gone.push(c.id);
                }
            }
            self.drop_clients(gone, "hung up or stalled");
            if !paused && n > 0 && fds[0].revents & libc::POLLIN != 0 {
                self.accept_all();
            }
            // Every queue (new clients' joins, the notices queued above,
            // what a full socket held back) goes out where there is room;
            // the next poll waits for room where there was none.
            let mut failed = Vec::new();
            for i in 0..self.clients.len() {
                if !self.flush(i) {
                    failed.push(self.clients[i].id);
                }
            }
            self.drop_clients(failed, "a send failed");
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
