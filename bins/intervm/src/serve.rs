//! `intervm ivshmem-server`: QEMU's ivshmem-server protocol for a region,
//! run by hand, or started on demand by a member process as the rendezvous
//! of a doorbell channel split across processes
//! (`interrupt_doorbell::rendezvous`).

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use interrupt_doorbell::rendezvous::{Rendezvous, ServeLock};
use interrupt_doorbell::server::Server;
use shmem_device::SharedRegion;

use crate::wire::{catch_signals, interrupted};

/// A server started on demand exits if no member comes within this long.
const FIRST_CLIENT_WITHIN: Duration = Duration::from_secs(30);

/// How long a server started on demand waits for the rendezvous lock held
/// by a server on its way out.
const LOCK_WAIT: Duration = Duration::from_secs(2);

/// The region a server shares.
pub enum Source {
    /// `/dev/shm/NAME`, created with the given size if missing.
    Shm(String, u64),
    /// An existing file (on tmpfs, disk or hugetlbfs), shared whole.
    File(PathBuf),
}

fn open_source(src: &Source) -> Result<std::fs::File, String> {
    match src {
        Source::Shm(name, size) => {
            let region = SharedRegion::open(&shmem_device::Backing::Shm(name.clone()), *size)
                .map_err(|e| format!("--shm {name}: {e}"))?;
            region
                .file()
                .try_clone()
                .map_err(|e| format!("--shm {name}: {e}"))
        }
        // Never through a symbolic link (as members open it).
        Source::File(p) => std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(p)
            .map_err(|e| format!("--file {}: {e}", p.display())),
    }
}

/// Serves `src` on `socket` with `vectors` vectors per client until SIGINT
/// or SIGTERM. With `on_demand`, `socket` is a rendezvous: the server
/// first takes its lock (and exits quietly if another server holds it),
/// and exits once its last client has left.
pub fn serve(socket: &Path, src: &Source, vectors: usize, on_demand: bool) -> Result<(), String> {
    let _lock = if on_demand {
        match ServeLock::acquire(&Rendezvous::at(socket), LOCK_WAIT).map_err(|e| e.to_string())? {
            Some(l) => Some(l),
            None => {
                log::info!("{}: another server serves it", socket.display());
                return Ok(());
            }
        }
    } else {
        None
    };
    let file = open_source(src)?;
    let mut server = Server::bind(socket, file, vectors)
        .map_err(|e| format!("--socket {}: {e}", socket.display()))?;
    if on_demand {
        server = server.exit_when_idle(FIRST_CLIENT_WITHIN);
    }
    catch_signals();
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    std::thread::spawn(move || {
        while !interrupted() {
            std::thread::sleep(Duration::from_millis(50));
        }
        stop2.store(true, Ordering::SeqCst);
    });
    let what = match src {
        Source::Shm(name, size) => format!("/dev/shm/{name} ({size} bytes)"),
        Source::File(p) => p.display().to_string(),
    };
    eprintln!(
        "intervm: ivshmem server (pid {}) on {} sharing {what}, {vectors} vectors per peer{}",
        std::process::id(),
        socket.display(),
        if on_demand {
            " (on demand: exits when its last peer leaves)"
        } else {
            ""
        }
    );
    server.run(stop).map_err(|e| e.to_string())
}

/// Starts `intervm ivshmem-server` on demand for `rv`, sharing `backing`,
/// as a process of its own (its own process group, so a Ctrl-C meant for
/// one member does not take the others' doorbells with it), logging to
/// `rv.log`. Returns once it is spawned.
pub fn start_on_demand(
    rv: &Rendezvous,
    backing: &Path,
    vectors: usize,
) -> interrupt_doorbell::Result<()> {
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};
    let io = |what: &str| {
        let what = what.to_string();
        move |e| interrupt_doorbell::Error::Io(what, e)
    };
    let exe = std::env::current_exe().map_err(io("locating the intervm binary"))?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&rv.log)
        .map_err(io(&rv.log.display().to_string()))?;
    let mut cmd = Command::new(exe);
    cmd.arg("ivshmem-server")
        .arg("--on-demand")
        .arg("--socket")
        .arg(&rv.socket)
        .arg("--file")
        .arg(backing)
        .arg("--vectors")
        .arg(vectors.to_string())
        .stdin(Stdio::null())
        .stdout(log.try_clone().map_err(io("log"))?)
        .stderr(log)
        .process_group(0);
    // SAFETY: the closure runs in the child between fork and exec and makes
    // one async-signal-safe system call. It marks every descriptor above
    // stdio close-on-exec, so the server inherits none of this VMM's
    // (eventfds, received fds): it would otherwise hold them, and what they
    // keep alive, until its last peer leaves. Older kernels without
    // CLOSE_RANGE_CLOEXEC refuse it harmlessly.
    unsafe {
        cmd.pre_exec(|| {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                u32::MAX,
                libc::CLOSE_RANGE_CLOEXEC,
            );
            Ok(())
        });
    }
    if std::env::var_os("RUST_LOG").is_none() {
        cmd.env("RUST_LOG", "info");
    }
    let mut child = cmd.spawn().map_err(io("starting intervm ivshmem-server"))?;
    log::info!(
        "started an ivshmem server (pid {}) on {}",
        child.id(),
        rv.socket.display()
    );
    // Reap it if it exits while this process runs; otherwise init does.
    std::thread::spawn(move || child.wait());
    Ok(())
}
