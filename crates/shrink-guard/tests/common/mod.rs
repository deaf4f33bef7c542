//! What the test binaries of this crate share.

use std::os::fd::AsRawFd;

/// A memfd of `len` bytes mapped shared where the kernel chooses; the
/// mapping lives until the process ends.
pub fn mapped(name: &str, len: usize) -> (std::fs::File, *mut u8) {
    let f = shrink_guard::memfd(name, len as u64).unwrap();
    // SAFETY: maps the whole memfd shared where the kernel chooses.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            f.as_raw_fd(),
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    (f, p as *mut u8)
}
