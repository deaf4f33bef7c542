//! Members of one doorbell channel in different processes find each other
//! by the name of their shared backing, with no server started by hand.
//!
//! Every member process derives the same socket path from the backing
//! (see [`Rendezvous::for_shm`] and [`Rendezvous::for_file`]) under one
//! runtime directory ([`default_dir`]). The first member to arrive finds
//! nobody listening there and starts an ivshmem server (QEMU's protocol, see
//! [`crate::server`]) as a process of its own; every member, the first
//! included, then joins it as a client ([`Rendezvous::join`]). The server
//! process lives as long as any member uses it and exits when the last one
//! leaves, so no member is the server: any member may stop, crash or
//! restart without taking the doorbells of the others with it. A QEMU VM
//! can join the same channel by that socket
//! (`-chardev socket,path=SOCKET,id=c -device ivshmem-doorbell,chardev=c`).
//!
//! Two servers for one socket cannot run at once: a server holds an
//! exclusive `flock` on a lock file beside the socket for its lifetime
//! ([`ServeLock`]); a second one started in a race finds the lock taken
//! and exits.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::client::{self, Session};
use crate::{Error, Result};

/// Environment variable that overrides the runtime directory.
pub const DIR_ENV: &str = "INTERVM_RUNTIME_DIR";

/// How often a joining member retries while a server starts.
const RETRY: Duration = Duration::from_millis(20);

/// How long after starting a server a member starts another one if the
/// first has not answered (it may have lost a race with an exiting one).
const RESTART_AFTER: Duration = Duration::from_millis(500);

/// The runtime directory every member process of a machine agrees on:
/// `$INTERVM_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/intervm`, else
/// `/run/intervm` for root, else `/tmp/intervm-UID`.
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os(DIR_ENV).filter(|d| !d.is_empty()) {
        return PathBuf::from(d);
    }
    if let Some(d) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(d).join("intervm");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    let uid = unsafe { libc::geteuid() };
    if uid == 0 {
        PathBuf::from("/run/intervm")
    } else {
        std::env::temp_dir().join(format!("intervm-{uid}"))
    }
}

/// 64-bit FNV-1a: a short, stable name for a long or odd backing name.
fn fnv64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Socket paths are limited to 107 bytes; keep names short and plain.
fn plain(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// Where the members of one channel meet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendezvous {
    /// The server's socket.
    pub socket: PathBuf,
    /// The lock a live server holds.
    pub lock: PathBuf,
    /// Where a server started on demand writes its log.
    pub log: PathBuf,
}

impl Rendezvous {
    /// The rendezvous whose socket is `socket` (`NAME.sock`; the lock and
    /// log are `NAME.lock` and `NAME.log` beside it).
    pub fn at(socket: &Path) -> Self {
        Self {
            socket: socket.to_path_buf(),
            lock: socket.with_extension("lock"),
            log: socket.with_extension("log"),
        }
    }

    /// The rendezvous in `dir` under `key` (a file-name-safe string).
    fn with_key(dir: &Path, key: &str) -> Self {
        Self::at(&dir.join(format!("{key}.sock")))
    }

    /// For a POSIX shared-memory object `/dev/shm/NAME`: `DIR/shm-NAME.sock`
    /// (a hash stands in for names that are long or not plain).
    pub fn for_shm(dir: &Path, name: &str) -> Self {
        let key = if plain(name) {
            format!("shm-{name}")
        } else {
            format!("shm-{:016x}", fnv64(name.as_bytes()))
        };
        Self::with_key(dir, &key)
    }

    /// For a backing file (a file on tmpfs, disk or hugetlbfs):
    /// `DIR/file-STEM-HASH.sock`, the hash taken over its absolute path.
    pub fn for_file(dir: &Path, path: &Path) -> Self {
        let abs = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
        let stem = abs
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .filter(|n| plain(n))
            .unwrap_or_else(|| "region".into());
        let hash = fnv64(abs.as_os_str().as_encoded_bytes());
        Self::with_key(dir, &format!("file-{stem}-{hash:016x}"))
    }

    /// Makes sure the directory of the socket exists, belongs to this user
    /// and is writable by nobody else (created `0700` if missing), so no
    /// other user can plant a server there.
    pub fn prepare_dir(&self) -> Result<()> {
        let dir = self.socket.parent().unwrap_or(Path::new("."));
        let io = |what: &str, e| Error::Io(format!("{}: {what}", dir.display()), e);
        if !dir.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(|e| io("creating the rendezvous directory", e))?;
        }
        let meta = std::fs::metadata(dir).map_err(|e| io("stat", e))?;
        // SAFETY: geteuid has no preconditions and cannot fail.
        let uid = unsafe { libc::geteuid() };
        if !meta.is_dir() {
            return Err(Error::Config(format!("{}: not a directory", dir.display())));
        }
        if meta.uid() != uid || meta.permissions().mode() & 0o022 != 0 {
            return Err(Error::Config(format!(
                "{}: the rendezvous directory must belong to uid {uid} and be \
                 writable only by it (it has uid {}, mode {:o})",
                dir.display(),
                meta.uid(),
                meta.permissions().mode() & 0o7777
            )));
        }
        // SAFETY: `c` is a NUL-terminated path that outlives the call.
        let writable = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
            .map(|c| unsafe { libc::access(c.as_ptr(), libc::W_OK | libc::X_OK) } == 0)
            .unwrap_or(false);
        if !writable {
            return Err(io(
                "not writable",
                std::io::Error::from_raw_os_error(libc::EACCES),
            ));
        }
        Ok(())
    }

    /// Joins the channel's server as a device with `vectors` vectors,
    /// calling `start` to start one when nobody answers, all within
    /// `limit`. `start` should return at once (the server runs in a
    /// process of its own); it may be called more than once, and extra
    /// servers exit by themselves (see [`ServeLock`]).
    pub fn join(
        &self,
        vectors: usize,
        limit: Duration,
        start: &mut dyn FnMut() -> Result<()>,
    ) -> Result<Session> {
        let t0 = Instant::now();
        let mut started: Option<Instant> = None;
        loop {
            let left = limit.saturating_sub(t0.elapsed());
            let why = match client::connect_within(&self.socket, vectors, left.max(RETRY)) {
                Ok(s) => return Ok(s),
                Err(Error::Unreachable { source, .. }) => source,
                Err(e) => return Err(e),
            };
            if t0.elapsed() >= limit {
                return Err(Error::Config(format!(
                    "{}: no ivshmem server answered within {} s ({why}); a server \
                     started on demand logs to {}",
                    self.socket.display(),
                    limit.as_secs_f64(),
                    self.log.display()
                )));
            }
            if started.is_none_or(|t| t.elapsed() >= RESTART_AFTER) {
                start()?;
                started = Some(Instant::now());
            }
            std::thread::sleep(RETRY);
        }
    }
}

/// The right to serve one rendezvous: an exclusive `flock` on its lock
/// file, held until dropped (or the process exits).
#[derive(Debug)]
pub struct ServeLock {
    _held: File,
}

impl ServeLock {
    /// Takes the lock, waiting up to `wait` for a server that is on its way
    /// out. `None`: another server holds it (and serves).
    pub fn acquire(r: &Rendezvous, wait: Duration) -> Result<Option<Self>> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&r.lock)
            .map_err(|e| Error::Io(format!("{}: open", r.lock.display()), e))?;
        let t0 = Instant::now();
        loop {
            // SAFETY: flock on a descriptor we own; no memory involved.
            if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
                return Ok(Some(Self { _held: f }));
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EWOULDBLOCK) | Some(libc::EINTR) => {}
                _ => return Err(Error::Io(format!("{}: flock", r.lock.display()), e)),
            }
            if t0.elapsed() >= wait {
                return Ok(None);
            }
            std::thread::sleep(RETRY);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_short_stable_and_distinct() {
        let d = Path::new("/run/intervm");
        assert_eq!(
            Rendezvous::for_shm(d, "bell").socket,
            Path::new("/run/intervm/shm-bell.sock")
        );
        let odd = Rendezvous::for_shm(d, "a name with spaces and a very long tail ........");
        assert!(odd
            .socket
            .to_str()
            .unwrap()
            .starts_with("/run/intervm/shm-"));
        assert_ne!(odd, Rendezvous::for_shm(d, "another odd name !"));
        let f = Rendezvous::for_file(d, Path::new("/dev/hugepages/region"));
        let name = f.socket.file_name().unwrap().to_str().unwrap();
        assert!(
            name.starts_with("file-region-") && name.len() < 64,
            "{name}"
        );
        assert_ne!(f, Rendezvous::for_file(d, Path::new("/tmp/region")));
        assert_eq!(f.lock, d.join(name.replace(".sock", ".lock")));
    }

    #[test]
    fn one_server_holds_the_lock() {
        let dir = std::env::temp_dir().join(format!("intervm-rv-lock-{}", std::process::id()));
        let r = Rendezvous::for_shm(&dir, "x");
        r.prepare_dir().unwrap();
        let first = ServeLock::acquire(&r, Duration::ZERO).unwrap();
        assert!(first.is_some());
        // A second open file description cannot take it while the first lives.
        assert!(ServeLock::acquire(&r, Duration::from_millis(50))
            .unwrap()
            .is_none());
        drop(first);
        assert!(ServeLock::acquire(&r, Duration::ZERO).unwrap().is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_directory_others_may_write_is_refused() {
        let dir = std::env::temp_dir().join(format!("intervm-rv-perm-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = Rendezvous::for_shm(&dir, "x").prepare_dir().unwrap_err();
        assert!(e.to_string().contains("writable only by it"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
