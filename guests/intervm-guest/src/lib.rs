//! The guest userspace side of intervm's channels, as a library (the
//! `intervm-guest` binary is a thin CLI over it): messages between guest
//! programs ([`channel`]: open a region, send, receive), bulk transfers
//! over shared memory through sysfs `resource2` or UIO ([`shmem`]), and
//! the port-I/O channel ([`portio`]).
#![deny(missing_docs)]

pub mod channel;
pub mod costs;
pub mod pci;
pub mod portio;
pub mod power;
pub mod shmem;
#[cfg(target_arch = "x86_64")]
pub mod syscall_entry;
pub mod uio;

/// What a sender sends, over any channel.
pub enum Payload {
    /// `size` bytes of the seeded test pattern (as the probe sends).
    Pattern {
        /// Seed.
        seed: u64,
        /// Bytes.
        size: u64,
    },
    /// A file's bytes, then the channel's end-of-stream marker (an empty
    /// frame or message).
    File(std::path::PathBuf),
}

/// Errors of the tool.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file or device operation failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// The device was not found or is unusable.
    #[error("{0}")]
    NoDevice(String),
    /// The ring protocol reported an error.
    #[error("{0}")]
    Ring(intervm_protocol::ring::RingError),
    /// `format` refused a region in use.
    #[error("{0} member(s) are alive in this region; use --force to format it anyway")]
    InUse(usize),
    /// The port-I/O device answered with this result code.
    #[error("port-I/O channel: {}", port_error(*.0))]
    Port(u32),
    /// Descriptor mode could not get a physically contiguous buffer for a
    /// whole message (messages are never split: their boundaries are part
    /// of the channel's contract).
    #[error(
        "descriptor mode needs {want} physically contiguous bytes per message, \
         but only {got} could be had; reserve 2 MiB huge pages (hugepages=N on \
         the kernel command line) or send messages of at most {got} bytes (--message)"
    )]
    NoContiguousBuffer {
        /// The message size asked for.
        want: usize,
        /// The largest contiguous buffer obtained.
        got: usize,
    },
    /// A bad size argument.
    #[error("{0}")]
    Usage(String),
    /// A wait for a peer ran out of time (the peer is alive, but did not
    /// answer in time).
    #[error("timed out: {0}")]
    Timeout(String),
    /// `shmem check-protection`: this guest can write what it must only
    /// read, or cannot write its own section.
    #[error("region not protected as an intervm VMM maps it: {0}")]
    Unprotected(String),
    /// Received bytes differ from the test pattern (`--verify-seed`).
    #[error("payload differs from the pattern with seed {seed} at byte {offset}")]
    Mismatch {
        /// The pattern seed checked against.
        seed: u64,
        /// First differing byte of the stream.
        offset: u64,
    },
}

/// Names a port-I/O result code.
pub fn port_error(r: u32) -> &'static str {
    intervm_protocol::portio::result_name(r)
}

/// A zeroed buffer of `len` bytes whose pages are already faulted in, so
/// that a timed transfer does not pay for first touches (a page fault runs
/// emulated kernel code on PVM: about 2.5 ms each, measured by `costs`).
pub fn touched_buffer(len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    for i in (0..len).step_by(4096) {
        // SAFETY: `i < len`, inside the vector; a volatile write so the
        // touch is not optimised away.
        unsafe { std::ptr::write_volatile(v.as_mut_ptr().add(i), 0) };
    }
    v
}

/// [`touched_buffer`] of a length a peer decides: one this process cannot
/// have is an error, not an abort.
pub fn try_touched_buffer(len: usize) -> Result<Vec<u8>, Error> {
    let mut v = Vec::new();
    v.try_reserve_exact(len).map_err(|e| {
        Error::Io(
            format!("a buffer of {len} bytes"),
            std::io::Error::new(std::io::ErrorKind::OutOfMemory, e),
        )
    })?;
    // Writing the zeros faults every page in.
    v.resize(len, 0);
    Ok(v)
}
