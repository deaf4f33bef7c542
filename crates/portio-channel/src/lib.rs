//! The port-I/O inter-VM channel.
//!
//! Guests exchange messages through a block of I/O ports that the VMM
//! traps: bytes go out with `out` (8, 16 or 32 bits, or `rep outs`) and a
//! send command, and come in with `in`; or, in descriptor mode, a whole
//! guest buffer moves in one exit. No guest kernel change is needed: a
//! Linux program gets the ports with `iopl(3)`/`ioperm`. The register map
//! is `intervm_protocol::portio`, shared with the probe guest and
//! `intervm-guest`.
//!
//! - [`device`]: [`PortioDevice`], a `vm_device::MutDevicePio`. Every value
//!   the guest writes is checked: unknown offsets and wrong widths read
//!   all-ones and are ignored, descriptors must lie in guest RAM, lengths
//!   are bounded, and each outcome lands in the `RESULT` register.
//! - [`link`]: where messages go. [`RingLink`] is one bounded queue per
//!   ordered pair of members over the intervm ring protocol in a shared
//!   region (`shared_region::Transport`): a memfd for members in one
//!   process, a `/dev/shm` object for members in separate processes. A full
//!   queue is reported to the guest ("would block"), never dropped; a peer
//!   that exits or whose VMM is killed is reported as gone.
#![deny(missing_docs)]

pub mod device;
pub mod link;

pub use device::{PortioDevice, PortioStats};
pub use link::{Fill, Link, LinkError, PeerState, RingLink, Take};
