//! A mapping of a shared file that "another process" truncates: without a
//! guard the next access would kill this process with SIGBUS; guarded, it
//! reads zeros from a private copy and reports the mapping lost.
//!
//! Run: `cargo run -p shrink-guard --example shrunk_by_a_peer` (no KVM or
//! files needed).

use std::os::fd::AsRawFd;

fn main() -> std::io::Result<()> {
    const LEN: usize = 1 << 20;
    let file = shrink_guard::memfd("shrunk-by-a-peer", LEN as u64)?;
    // SAFETY: maps the whole memfd shared where the kernel chooses; it is
    // unmapped at the end, after the guard is dropped.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            LEN,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let p = p as *mut u8;
    let Some(guard) = shrink_guard::guard(p, LEN, file.as_raw_fd(), 0) else {
        eprintln!("could not guard the mapping (no SIGBUS handler?)");
        std::process::exit(1);
    };
    // SAFETY: inside the mapping.
    unsafe { p.add(LEN / 2).write_volatile(42) };
    println!("before: byte at 512 KiB = 42, lost = {}", guard.lost());

    // What a hostile or crashed peer does to a shared file.
    file.set_len(4096)?;
    // SAFETY: inside the mapping; past the file's new end, so this faults
    // and the guard swaps in private zeros before the read is retried.
    let v = unsafe { p.add(LEN / 2).read_volatile() };
    println!(
        "after the peer shrank the file: byte = {v}, lost = {}",
        guard.lost()
    );

    drop(guard);
    // SAFETY: unmaps what was mapped above; no pointer into it is used after.
    unsafe { libc::munmap(p.cast(), LEN) };
    Ok(())
}
