//! Driving the probe's port-I/O workloads from the host. Results use the
//! same records as shared memory ([`crate::shmem::peer_record`],
//! [`crate::shmem::ShmemResult`]); error codes are the device's `R_*`
//! results.

use intervm_protocol::portio::*;
use intervm_protocol::probe::{
    portio_args as a, BootInfo, Workload, PORTIO_MODE_DESCRIPTOR, PORTIO_MODE_PORT,
};

/// What one probe does on a port-I/O channel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// Send to this member.
    Send {
        /// Receiving member index.
        to: u32,
    },
    /// Receive from every member whose bit is set.
    Recv {
        /// Bitmask of sending member indices.
        from: u32,
    },
}

/// A port-I/O send or receive for the probe guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PortioTask {
    /// First port of the channel device.
    pub base: u16,
    /// Send or receive.
    pub role: Role,
    /// Bytes to send, or to receive from each sender.
    pub bytes: u64,
    /// Bytes per message (send).
    pub message: u64,
    /// Descriptor mode instead of port mode.
    pub descriptor: bool,
    /// Port mode: access width (1, 2 or 4).
    pub width: u8,
    /// Port mode: use `rep outs`/`rep ins`.
    pub rep: bool,
    /// Payload pattern seed (send).
    pub seed: u64,
    /// Silence after which a gone peer is reported.
    pub timeout_ms: u64,
    /// How long to wait for peers.
    pub join_timeout_ms: u64,
    /// Receive from one sender: complete transfers to serve across the
    /// sender's restarts (0: one transfer).
    pub transfers: u64,
    /// With `transfers`: the stream checksum of a complete transfer.
    pub expect_stream: u64,
}

impl PortioTask {
    /// Defaults: port mode, 32-bit accesses, 4 KiB messages, ports at
    /// `DEFAULT_BASE`.
    pub fn new(role: Role, bytes: u64) -> Self {
        Self {
            base: DEFAULT_BASE,
            role,
            bytes,
            message: 4096,
            descriptor: false,
            width: 4,
            rep: false,
            seed: 0,
            timeout_ms: 1000,
            join_timeout_ms: 60_000,
            transfers: 0,
            expect_stream: 0,
        }
    }

    /// The boot-info page that makes the probe run this task.
    pub fn boot_info(&self) -> BootInfo {
        let (w, peers) = match self.role {
            Role::Send { to } => (Workload::PortioSend, to as u64),
            Role::Recv { from } => (Workload::PortioRecv, from as u64),
        };
        let mut i = BootInfo::new(w, 0, 0);
        i.args[a::BASE] = self.base as u64;
        i.args[a::PEERS] = peers;
        i.args[a::BYTES] = self.bytes;
        i.args[a::MESSAGE] = self.message;
        i.args[a::MODE] = if self.descriptor {
            PORTIO_MODE_DESCRIPTOR
        } else {
            PORTIO_MODE_PORT
        };
        i.args[a::WIDTH] = self.width as u64;
        i.args[a::REP] = self.rep as u64;
        i.args[a::SEED] = self.seed;
        i.args[a::TIMEOUT_MS] = self.timeout_ms;
        i.args[a::JOIN_TIMEOUT_MS] = self.join_timeout_ms;
        i.args[a::TRANSFERS] = self.transfers;
        i.args[a::EXPECT_STREAM] = self.expect_stream;
        i
    }
}

/// A port-I/O ping-pong in descriptor mode
/// ([`Workload::PortioPingPong`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingPongTask {
    /// First port of the channel device.
    pub base: u16,
    /// The other side's member index.
    pub peer: u32,
    /// Sends first and times each round trip (in the round log).
    pub initiator: bool,
    /// Message bytes.
    pub bytes: u64,
    /// Round trips.
    pub rounds: u64,
    /// Payload pattern seed.
    pub seed: u64,
    /// Silence after which a gone peer is reported.
    pub timeout_ms: u64,
    /// How long to wait for the peer.
    pub join_timeout_ms: u64,
}

impl PingPongTask {
    /// `rounds` round trips of `bytes` with `peer`, ports at `DEFAULT_BASE`.
    pub fn new(peer: u32, initiator: bool, bytes: u64, rounds: u64) -> Self {
        Self {
            base: DEFAULT_BASE,
            peer,
            initiator,
            bytes,
            rounds,
            seed: 0,
            timeout_ms: 1000,
            join_timeout_ms: 60_000,
        }
    }

    /// The boot-info page that makes the probe run this task.
    pub fn boot_info(&self) -> BootInfo {
        let mut i = BootInfo::new(Workload::PortioPingPong, 0, 0);
        i.args[a::BASE] = self.base as u64;
        i.args[a::PEERS] = self.peer as u64;
        i.args[a::BYTES] = self.bytes;
        i.args[a::ROUNDS] = self.rounds;
        i.args[a::INITIATOR] = self.initiator as u64;
        i.args[a::SEED] = self.seed;
        i.args[a::MODE] = PORTIO_MODE_DESCRIPTOR;
        i.args[a::TIMEOUT_MS] = self.timeout_ms;
        i.args[a::JOIN_TIMEOUT_MS] = self.join_timeout_ms;
        i
    }
}

/// Names a device result code.
pub fn error_name(code: u64) -> &'static str {
    u32::try_from(code).map_or("unknown result", result_name)
}
