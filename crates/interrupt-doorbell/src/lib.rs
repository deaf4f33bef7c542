//! Shared memory with interrupts: QEMU's `ivshmem-doorbell` device.
//!
//! - [`device`]: [`IvshmemDoorbell`], the PCI function (BAR0 registers,
//!   BAR1 MSI-X, BAR2 shared memory, INTx fallback), with doorbells routed
//!   in the kernel (`ioeventfd` in the sender, `irqfd` in the receiver)
//!   where KVM allows, and through the VMM otherwise.
//! - [`group`]: members of one `intervm` process wired directly, no server.
//! - [`server`] and [`client`]: QEMU's ivshmem-server protocol, so intervm
//!   VMs and QEMU VMs can share one region and ring each other.
//! - [`rendezvous`]: members in different processes meet at a socket named
//!   after their backing, served by a server started on demand.
//! - [`attach`]: the sequence that puts a device for a server's session on
//!   a VM and joins the ring protocol ([`attach::from_server`] does it all
//!   for a server at a socket).
#![deny(missing_docs)]

pub mod attach;
pub mod client;
pub mod device;
pub mod group;
pub mod proto;
pub mod rendezvous;
pub mod server;

pub use device::{DoorbellStats, IvshmemDoorbell};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad device or channel setting.
    #[error("{0}")]
    Config(String),
    /// A system call failed.
    #[error("{0}: {1}")]
    Io(String, #[source] std::io::Error),
    /// No server answers on `socket` (nothing there, nobody listening, or
    /// a server that closed the connection before the handshake).
    #[error("{}: no ivshmem server answers: {source}", socket.display())]
    Unreachable {
        /// The socket tried.
        socket: std::path::PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The peer on a protocol socket misbehaved.
    #[error("protocol: {0}")]
    Protocol(String),
    /// Shared region.
    #[error(transparent)]
    Region(#[from] shared_region::Error),
    /// The server shares a region of another size than the member asked for.
    #[error(
        "the server at {} shares {shared} bytes, not the {asked} asked for",
        socket.display()
    )]
    SizeMismatch {
        /// The server's socket.
        socket: std::path::PathBuf,
        /// The size it shares.
        shared: u64,
        /// The size asked for.
        asked: u64,
    },
    /// A device's lock was poisoned by a thread that panicked holding it.
    #[error("the doorbell device's lock is poisoned (a thread panicked holding it)")]
    Poisoned,
    /// KVM refused the MSI vectors (GSI routes, irqfds).
    #[error("MSI vectors: {0}")]
    Vectors(#[source] vmm_core::Error),
    /// The VM's event loop refused a subscriber (the INTx watcher, the
    /// follower of a server's notices).
    #[error("event loop: {0}")]
    Events(#[source] vmm_core::Error),
    /// A member could not take what a restarted server gave it.
    #[error("rejoining the server: {0}")]
    Rejoin(String),
    /// The VM refused the device.
    #[error("adding the device to vm {vm}: {source}")]
    AddDevice {
        /// The VM.
        vm: String,
        /// Why.
        #[source]
        source: vmm_core::Error,
    },
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
