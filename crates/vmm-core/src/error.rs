//! The error type of vmm-core.

use std::io;

/// Everything that can go wrong while building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `/dev/kvm` could not be opened.
    #[error("cannot open /dev/kvm: {0} (is the kvm module loaded and do you have access?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// What was being done.
        op: &'static str,
        /// The errno.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// A required KVM capability is missing.
    #[error("KVM lacks the capability {0}")]
    MissingCapability(&'static str),
    /// Guest memory could not be created.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A memory size or address is unusable.
    #[error("invalid memory layout: {0}")]
    Layout(String),
    /// Loading a guest image failed.
    #[error("loading the guest image: {0}")]
    Load(String),
    /// Registering a device failed.
    #[error("device registration: {0}")]
    Device(String),
    /// PCI bus errors (no slot left, no BAR space).
    #[error("PCI: {0}")]
    Pci(String),
    /// Host I/O error (eventfds, threads, files).
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: String,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// An invalid argument from the embedding program.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
}

impl Error {
    pub(crate) fn kvm(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { op, source }
    }
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Error {
        let what = what.into();
        move |source| Error::Io { what, source }
    }
}

/// Result alias for vmm-core.
pub type Result<T> = std::result::Result<T, Error>;
