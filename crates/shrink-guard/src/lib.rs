//! Surviving a shared file shrunk under a mapping.
//!
//! A region shared with other processes (a `/dev/shm` object, a file, a
//! descriptor from an ivshmem server) can be truncated by any of them. The
//! next access to a page past the new end raises SIGBUS in this process, and
//! a guest access to it makes `KVM_RUN` fail with `EFAULT`; either would end
//! every VM here, because of one peer.
//!
//! A [`Guarded`] mapping turns that into a *lost* region instead:
//! - a SIGBUS whose address lies in a guarded mapping replaces the whole
//!   mapping, in the signal handler, with private zeroed memory at the same
//!   address (`MAP_FIXED`), marks it lost and returns, so the access is
//!   retried and succeeds on the private copy;
//! - a vCPU loop whose `KVM_RUN` fails with `EFAULT` calls [`recover`],
//!   which does the same to every guarded mapping whose file became too
//!   short, and runs the guest again. The guest then reads zeros there.
//!
//! Whoever owns the mapping checks [`Guarded::lost`] and reports the
//! channel lost; nothing else in the process is affected.
//!
//! The first [`guard`] installs a process-wide SIGBUS handler. A SIGBUS
//! outside every guarded mapping, or one sent rather than raised by a
//! fault, goes to the handler that was installed before it (an embedding
//! VMM's own), called with the same arguments (its flags and mask are not
//! replayed); without one, the default action ends the process, as
//! without this crate (a sent SIGBUS the process ignored stays ignored). A handler
//! installed *after* the first [`guard`] replaces this one: chain to it
//! from there, or guard nothing.
//!
//! ```
//! use std::os::fd::AsRawFd;
//! let file = shrink_guard::memfd("example", 1 << 16)?;
//! // SAFETY: maps the whole memfd shared; unmapped below.
//! let p = unsafe {
//!     libc::mmap(std::ptr::null_mut(), 1 << 16, libc::PROT_READ | libc::PROT_WRITE,
//!                libc::MAP_SHARED, file.as_raw_fd(), 0)
//! } as *mut u8;
//! assert_ne!(p as *mut libc::c_void, libc::MAP_FAILED);
//! let g = shrink_guard::guard(p, 1 << 16, file.as_raw_fd(), 0).expect("a free slot");
//! file.set_len(0)?; // what a hostile peer would do
//! // SAFETY: inside the mapping, which is private zeros after the fault.
//! assert_eq!(unsafe { p.add(8192).read_volatile() }, 0);
//! assert!(g.lost());
//! drop(g);
//! // SAFETY: unmaps what was mapped above.
//! unsafe { libc::munmap(p.cast(), 1 << 16) };
//! # Ok::<(), std::io::Error>(())
//! ```

use std::os::fd::{FromRawFd, RawFd};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock};

/// How many mappings can be guarded at once.
pub const MAX_GUARDED: usize = 64;

struct Slot {
    start: AtomicUsize,
    /// 0 while the slot is free; written last on registration, first on
    /// removal, so the signal handler never sees a half-filled slot.
    len: AtomicUsize,
    fd: AtomicI32,
    offset: AtomicUsize,
    lost: AtomicBool,
}

#[allow(clippy::declare_interior_mutable_const)]
const FREE: Slot = Slot {
    start: AtomicUsize::new(0),
    len: AtomicUsize::new(0),
    fd: AtomicI32::new(-1),
    offset: AtomicUsize::new(0),
    lost: AtomicBool::new(false),
};

static SLOTS: [Slot; MAX_GUARDED] = [FREE; MAX_GUARDED];
/// Serialises registration, removal and [`recover`] (never the handler).
static REGISTRY: Mutex<()> = Mutex::new(());

/// A guarded mapping; dropping it stops guarding (drop it before the
/// mapping is unmapped).
#[derive(Debug)]
pub struct Guarded {
    slot: usize,
}

/// Guards `len` bytes mapped shared at `addr` from `fd` at `offset`. The
/// mapping and `fd` must stay valid until the returned value is dropped.
/// `None` when [`MAX_GUARDED`] mappings are guarded already (the mapping
/// then works as before, unguarded) or the handler cannot be installed.
pub fn guard(addr: *mut u8, len: usize, fd: RawFd, offset: u64) -> Option<Guarded> {
    if len == 0 || !install() {
        return None;
    }
    let _g = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let slot = SLOTS
        .iter()
        .position(|s| s.len.load(Ordering::Acquire) == 0)?;
    let s = &SLOTS[slot];
    s.start.store(addr as usize, Ordering::Relaxed);
    s.fd.store(fd, Ordering::Relaxed);
    s.offset.store(offset as usize, Ordering::Relaxed);
    s.lost.store(false, Ordering::Relaxed);
    s.len.store(len, Ordering::Release);
    Some(Guarded { slot })
}

impl Guarded {
    /// True once the file was found shrunk and the mapping replaced by
    /// private memory.
    pub fn lost(&self) -> bool {
        SLOTS[self.slot].lost.load(Ordering::Acquire)
    }
}

impl Drop for Guarded {
    fn drop(&mut self) {
        let _g = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
        let s = &SLOTS[self.slot];
        s.len.store(0, Ordering::Release);
        s.fd.store(-1, Ordering::Relaxed);
    }
}

/// Replaces `[start, start + len)` by private zeroed memory. Async-signal
/// safe (one system call).
fn replace(start: usize, len: usize) -> bool {
    // SAFETY: the range is a live mapping of ours (a guarded slot); mapping
    // anonymous memory over it with MAP_FIXED keeps every pointer into it
    // valid, now to private memory.
    let p = unsafe {
        libc::mmap(
            start as *mut libc::c_void,
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
            -1,
            0,
        )
    };
    p != libc::MAP_FAILED
}

/// After `KVM_RUN` failed with `EFAULT`: replaces every guarded mapping
/// whose file no longer covers it, marking it lost. True when one was
/// (run the guest again); false when the fault has another cause.
pub fn recover() -> bool {
    let _g = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let mut any = false;
    for s in &SLOTS {
        let len = s.len.load(Ordering::Acquire);
        if len == 0 || s.lost.load(Ordering::Acquire) {
            continue;
        }
        // SAFETY: a zeroed stat buffer for fstat to fill.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: fstat on a descriptor the slot's owner keeps open while
        // registered (we hold the registry lock); it writes only `st`.
        let ok = unsafe { libc::fstat(s.fd.load(Ordering::Relaxed), &mut st) } == 0;
        let needed = s.offset.load(Ordering::Relaxed) + len;
        if ok
            && (st.st_size as u64) < needed as u64
            && take(s, s.start.load(Ordering::Relaxed), len)
        {
            any = true;
        }
    }
    any
}

/// Marks slot `s` lost and replaces its mapping, once: the first caller
/// (a fault's handler or [`recover`]) does it, so a mapping is never
/// replaced twice (which would zero what was written to the private copy
/// in between). False when the replacement failed (the slot is then not
/// lost) or another caller did it.
fn take(s: &Slot, start: usize, len: usize) -> bool {
    if s.lost
        .compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return false;
    }
    if replace(start, len) {
        return true;
    }
    s.lost.store(false, Ordering::Release);
    false
}

/// The SIGBUS action in place before [`install`]: where a fault outside
/// every guarded mapping goes. Read and set before the handler is
/// installed.
static PREVIOUS: OnceLock<libc::sigaction> = OnceLock::new();

extern "C" fn on_sigbus(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: errno is this thread's; saved and restored around the calls
    // below, as a handler must.
    let errno = unsafe { *libc::__errno_location() };
    on_sigbus_inner(sig, info, ctx);
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

fn on_sigbus_inner(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let (code, addr) = unsafe { ((*info).si_code, (*info).si_addr() as usize) };
    // A fault has a positive code; kill(2), sigqueue(3) and friends do not,
    // and their si_addr means nothing.
    let fault = code > 0;
    for s in SLOTS.iter().filter(|_| fault) {
        let len = s.len.load(Ordering::Acquire);
        let start = s.start.load(Ordering::Relaxed);
        if len != 0 && addr >= start && addr - start < len {
            if take(s, start, len) || s.lost.load(Ordering::Acquire) {
                // Replaced, here or by another thread: retry the access.
                return;
            }
            break;
        }
    }
    // Not ours: the handler from before, if there was one (reading a
    // OnceLock that is set is an atomic load, async-signal-safe).
    if let Some(old) = PREVIOUS.get() {
        let h = old.sa_sigaction;
        if h != libc::SIG_DFL && h != libc::SIG_IGN {
            if old.sa_flags & libc::SA_SIGINFO != 0 {
                // SAFETY: an SA_SIGINFO action's handler has this type; it
                // gets the arguments the kernel gave us.
                let f: extern "C" fn(libc::c_int, *mut libc::siginfo_t, *mut libc::c_void) =
                    unsafe { std::mem::transmute(h) };
                f(sig, info, ctx);
            } else {
                // SAFETY: a plain action's handler takes the signal number.
                let f: extern "C" fn(libc::c_int) = unsafe { std::mem::transmute(h) };
                f(sig);
            }
            return;
        }
    }
    let ignored = PREVIOUS
        .get()
        .is_some_and(|old| old.sa_sigaction == libc::SIG_IGN);
    if !fault && ignored {
        // A sent SIGBUS the process ignores: nothing to do.
        return;
    }
    // The default action: a fault's retried access takes it (an ignored
    // SIGBUS from a fault would be retried for ever: it kills too); a sent
    // signal is raised again to take it.
    // SAFETY: signal() and raise() are async-signal-safe.
    unsafe {
        libc::signal(libc::SIGBUS, libc::SIG_DFL);
        if !fault {
            libc::raise(libc::SIGBUS);
        }
    }
}

/// Installs the SIGBUS handler once, keeping the previous action for
/// faults that are not ours; false when that failed.
fn install() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let fail = |what: &str| {
            log::warn!(
                "cannot handle SIGBUS ({what}: {}); a peer that shrinks a shared region will end \
                 this process",
                std::io::Error::last_os_error()
            );
            false
        };
        // The action now, kept before ours replaces it, so that a fault
        // that is not ours finds it from the first moment.
        // SAFETY: a zeroed sigaction for the kernel to fill.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: reads the current action into `old`; changes nothing.
        if unsafe { libc::sigaction(libc::SIGBUS, std::ptr::null(), &mut old) } != 0 {
            return fail("reading the current action");
        }
        let _ = PREVIOUS.set(old);
        // SAFETY: a zeroed sigaction, filled in below.
        let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
        sa.sa_sigaction = on_sigbus as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        // SAFETY: installs a handler that only touches atomics, makes
        // async-signal-safe calls (mmap, signal, raise), saves errno, and
        // calls the previous handler, which had to be async-signal-safe
        // already.
        let r = unsafe {
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut())
        };
        if r != 0 {
            return fail("installing the handler");
        }
        true
    })
}

/// Creates an anonymous shared file (`memfd_create`, close-on-exec) of
/// `size` bytes: memory to map, guard and hand to other processes.
pub fn memfd(name: &str, size: u64) -> std::io::Result<std::fs::File> {
    let cname = std::ffi::CString::new(name).map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("memfd name {name:?} holds a NUL byte"),
        )
    })?;
    // SAFETY: memfd_create with a valid NUL-terminated name; the returned fd
    // is owned by the File below.
    let fd = unsafe { libc::memfd_create(cname.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor we own.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    file.set_len(size)?;
    Ok(file)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    const LEN: usize = 1 << 16;

    /// A 64 KiB memfd mapped shared (unmapped by [`unmap`]).
    fn mapped() -> (std::fs::File, *mut u8) {
        let f = memfd("guard-test", LEN as u64).unwrap();
        // SAFETY: maps the whole memfd shared at an address of the kernel's
        // choosing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        (f, p as *mut u8)
    }

    fn unmap(p: *mut u8) {
        // SAFETY: unmaps what `mapped` mapped.
        unsafe { libc::munmap(p as *mut libc::c_void, LEN) };
    }

    #[test]
    fn a_shrunk_file_turns_the_mapping_private_instead_of_killing_the_process() {
        let (f, p) = mapped();
        let g = guard(p, LEN, f.as_raw_fd(), 0).unwrap();
        // SAFETY: inside the mapping.
        unsafe { p.add(8192).write_volatile(7) };
        assert!(!g.lost());
        // Another process shrinks it; the next access would be SIGBUS.
        f.set_len(4096).unwrap();
        // SAFETY: inside the mapping (now private memory after the fault).
        let v = unsafe {
            p.add(8192).write_volatile(9);
            p.add(8192).read_volatile()
        };
        assert_eq!(v, 9);
        assert!(g.lost());
        // The file is untouched by writes to the private copy.
        assert_eq!(f.metadata().unwrap().len(), 4096);
        drop(g);
        unmap(p);
    }

    #[test]
    fn recover_finds_a_shrunk_file_without_a_fault() {
        let (f, p) = mapped();
        let g = guard(p, LEN, f.as_raw_fd(), 0).unwrap();
        f.set_len(0).unwrap();
        assert!(recover());
        assert!(g.lost());
        // SAFETY: the private copy is mapped at the same place.
        assert_eq!(unsafe { p.add(100).read_volatile() }, 0);
        drop(g);
        unmap(p);
    }
}
