//! The shared region behind every intervm channel kind, and the host side
//! of the ring protocol that runs in it.
//!
//! - [`region`]: the host memory object shared by every member, from a POSIX
//!   shm name, a file, a hugetlbfs file or an anonymous memfd, mapped once
//!   per process and guarded against another process shrinking it
//!   (the `shrink-guard` crate).
//! - [`transport`]: the host side of the intervm ring protocol
//!   (`intervm_protocol::ring`): formatting a region, joining as a member,
//!   heartbeats and leave notices so peers see a dead VM instead of hanging.
//!
//! `shmem-device` puts a region in a guest as an ivshmem-plain PCI device,
//! `interrupt-doorbell` as an ivshmem-doorbell device, and
//! `portio-channel` keeps its per-pair queues in one; each depends on this
//! crate, not on the others.
#![deny(missing_docs)]

pub mod region;
pub mod transport;

pub use region::{is_shm_name, Backing, SharedRegion};
pub use transport::{Membership, Transport};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The region size is unusable.
    #[error("shared region size {0} is not a power of two of at least 4 KiB")]
    BadSize(u64),
    /// An existing backing has a different size.
    #[error("{path}: exists with {found} bytes, but the channel wants {wanted} (refusing to resize a region another program may be using)")]
    SizeMismatch {
        /// Backing path.
        path: String,
        /// Size found.
        found: u64,
        /// Size configured.
        wanted: u64,
    },
    /// Opening, sizing or mapping the backing failed.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// An existing backing this process should not trust with a region.
    #[error("{path}: {why}")]
    UntrustedBacking {
        /// Backing path.
        path: String,
        /// What is wrong and what to do.
        why: String,
    },
    /// A bad shm name.
    #[error("shm name {0:?}: use 1-200 characters, no '/'")]
    BadName(String),
    /// The ring transport refused the region.
    #[error("{path}: {source}")]
    Ring {
        /// Backing path (or label).
        path: String,
        /// What the ring protocol said.
        source: intervm_protocol::ring::RingError,
    },
    /// The region was formatted for another number of members.
    #[error(
        "{path}: in use, formatted for {found} members, this channel has {wanted} \
         (members killed without leaving count as in use for {} s)",
        transport::STALE_AFTER_MS / 1000
    )]
    MemberMismatch {
        /// Backing path.
        path: String,
        /// Members in the header.
        found: u32,
        /// Members configured.
        wanted: u32,
    },
    /// The region, in use, was formatted with rings of another size.
    #[error(
        "{path}: in use with rings of {found} bytes, this channel asks for {wanted} \
         (members killed without leaving count as in use for {} s)",
        transport::STALE_AFTER_MS / 1000
    )]
    RingMismatch {
        /// Backing path.
        path: String,
        /// Ring data bytes in the header.
        found: u64,
        /// Ring data bytes configured.
        wanted: u64,
    },
    /// Between this process's attach and its join, another one formatted
    /// the region again with another layout (it found nobody alive yet:
    /// members started at once with different channel settings).
    #[error(
        "{path}: formatted again by another process since this one attached \
         ({found}; this one uses {wanted}); do all members use the same channel settings?"
    )]
    Reformatted {
        /// Backing path.
        path: String,
        /// The layout in the header now.
        found: String,
        /// The layout this process attached with.
        wanted: String,
    },
}

impl Error {
    /// Wraps a ring protocol error about the region at `path` (for
    /// `map_err`).
    pub fn ring(path: &str) -> impl Fn(intervm_protocol::ring::RingError) -> Self + Copy + '_ {
        move |source| Error::Ring {
            path: path.to_string(),
            source,
        }
    }
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
