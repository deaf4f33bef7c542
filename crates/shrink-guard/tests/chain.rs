//! A SIGBUS outside every guarded mapping reaches the handler the process
//! had before the first guard (an embedding VMM's own). Its own test binary:
//! the handler order is per process, and this one must install first.

mod common;

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicUsize, Ordering};

const LEN: usize = 1 << 16;

/// The embedder's mapping, which its own handler repairs.
static THEIRS: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);

extern "C" fn embedders_handler(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    CALLS.fetch_add(1, Ordering::SeqCst);
    // SAFETY: the kernel passes a valid siginfo for an SA_SIGINFO handler.
    let addr = unsafe { (*info).si_addr() } as usize;
    let start = THEIRS.load(Ordering::SeqCst);
    if addr >= start && addr - start < LEN {
        // SAFETY: replaces the embedder's own mapping with private memory.
        unsafe {
            libc::mmap(
                start as *mut libc::c_void,
                LEN,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_FIXED,
                -1,
                0,
            )
        };
    }
}

#[test]
fn a_fault_outside_guarded_mappings_reaches_the_handler_installed_before() {
    // SAFETY: a zeroed sigaction, filled in; the handler only touches
    // atomics and calls mmap.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = embedders_handler as *const () as usize;
        sa.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut sa.sa_mask);
        assert_eq!(libc::sigaction(libc::SIGBUS, &sa, std::ptr::null_mut()), 0);
    }
    let (ours_file, ours) = common::mapped("guarded", LEN);
    let (theirs_file, theirs) = common::mapped("embedders", LEN);
    THEIRS.store(theirs as usize, Ordering::SeqCst);
    let g = shrink_guard::guard(ours, LEN, ours_file.as_raw_fd(), 0).unwrap();

    // The embedder's file shrinks: its handler runs and repairs its mapping
    // (before the chaining, the guard's handler reset SIGBUS to the default
    // and this process died).
    theirs_file.set_len(0).unwrap();
    // SAFETY: inside the embedder's mapping (private after its handler).
    let v = unsafe {
        theirs.add(4096).write_volatile(5);
        theirs.add(4096).read_volatile()
    };
    assert_eq!(v, 5);
    assert_eq!(CALLS.load(Ordering::SeqCst), 1);
    assert!(!g.lost(), "the guarded mapping was not touched");

    // A SIGBUS sent (not a fault) is not the guard's either, even if it
    // names no address at all.
    // SAFETY: raise() on this thread; the handlers above return.
    assert_eq!(unsafe { libc::raise(libc::SIGBUS) }, 0);
    assert_eq!(CALLS.load(Ordering::SeqCst), 2);
    assert!(!g.lost());

    // Our file shrinks: the guard handles it, not the embedder.
    ours_file.set_len(0).unwrap();
    // SAFETY: inside the guarded mapping (private after the guard's handler).
    assert_eq!(unsafe { ours.add(4096).read_volatile() }, 0);
    assert!(g.lost());
    assert_eq!(
        CALLS.load(Ordering::SeqCst),
        2,
        "the embedder saw our fault"
    );
    drop(g);
}
