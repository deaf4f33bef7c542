//! Driving the probe's shared-memory workloads from the host: the boot-info
//! arguments of a send or receive, the results it leaves, and the stream
//! checksum a correct transfer must produce.

pub use intervm_protocol::notify::Notify;
use intervm_protocol::notify::SPIN_US_PVM;
use intervm_protocol::probe::{
    results, shmem_args, shmem_frame_bytes, shmem_source_bytes, BootInfo, Workload,
    SHMEM_CORRUPT_HEAD, SHMEM_FORGE, SHMEM_HOLD, SHMEM_QUIET, SHMEM_ZERO_COPY,
};
use intervm_protocol::ring::{self, RingError};

/// What one probe does on a shared-memory channel.
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
    /// Send to and receive from every member whose bit is set, all at once
    /// ([`Workload::ShmemExchange`]).
    Exchange {
        /// Bitmask of peer member indices.
        with: u32,
    },
}

/// A shared-memory send or receive for the probe guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmemTask {
    /// Which ivshmem function on the guest's bus (0 = the first).
    pub device_index: u32,
    /// The VM's member index in the channel.
    pub me: u32,
    /// Send or receive.
    pub role: Role,
    /// Bytes to send, or to receive from each sender.
    pub bytes: u64,
    /// Payload bytes per frame (send) or the largest frame accepted (receive).
    pub chunk: u64,
    /// Payload pattern seed (send).
    pub seed: u64,
    /// A peer whose heartbeat stops for this long is reported gone.
    pub timeout_ms: u64,
    /// How long to wait for peers to join.
    pub join_timeout_ms: u64,
    /// Act as a hostile sender that corrupts its head index halfway.
    pub corrupt_head: bool,
    /// Repeat the transfer this many times (for timing small sizes).
    pub rounds: u64,
    /// How the two sides wake each other ([`Notify::Never`], polling, by
    /// default); the other modes need an ivshmem-doorbell device.
    pub notify: Notify,
    /// Polling budget of [`Notify::Adaptive`], µs.
    pub spin_us: u64,
    /// Sender: idle this long after the start line (receiver idle time).
    pub start_delay_ms: u64,
    /// Stress: largest random delay per frame, TSC cycles.
    pub jitter_cycles: u64,
    /// Sender: after the start line, send nothing until the host writes a
    /// non-zero `shmem_args::RELEASE` (tests: let the receiver sleep first).
    pub hold: bool,
    /// Print nothing (exit counting).
    pub quiet: bool,
    /// Fill (send) or read (receive) frames in place, not through a
    /// buffer ([`SHMEM_ZERO_COPY`]).
    pub zero_copy: bool,
    /// Sender: forge frames on the rings of other pairs instead of
    /// sending ([`SHMEM_FORGE`]).
    pub forge: bool,
    /// Receiver from one sender: 0 for one transfer ended by the first
    /// error; N for N complete transfers from a sender that may leave,
    /// crash or be restarted meanwhile (see [`Transfers`]).
    pub transfers: u64,
    /// With `transfers`: the stream checksum each complete transfer must
    /// have ([`expected_stream`]).
    pub expect_stream: u64,
    /// [`Role::Exchange`] with doorbells: MSI-X vectors each member
    /// enables; a member rings peer `m` on vector `me % vectors`.
    pub vectors: u32,
}

impl ShmemTask {
    /// Defaults: first device, 64 KiB frames, 2 s peer timeout, 60 s to join.
    pub fn new(me: u32, role: Role, bytes: u64) -> Self {
        Self {
            device_index: 0,
            me,
            role,
            bytes,
            chunk: 64 << 10,
            seed: 0,
            timeout_ms: 2000,
            join_timeout_ms: 60_000,
            corrupt_head: false,
            rounds: 1,
            notify: Notify::Never,
            spin_us: SPIN_US_PVM,
            start_delay_ms: 0,
            jitter_cycles: 0,
            hold: false,
            quiet: false,
            zero_copy: false,
            forge: false,
            transfers: 0,
            expect_stream: 0,
            vectors: 1,
        }
    }

    /// The boot-info page that makes the probe run this task.
    pub fn boot_info(&self) -> BootInfo {
        let (workload, peers) = match self.role {
            Role::Send { to } => (Workload::ShmemSend, to as u64),
            Role::Recv { from } => (Workload::ShmemRecv, from as u64),
            Role::Exchange { with } => (Workload::ShmemExchange, with as u64),
        };
        let mut info = BootInfo::new(workload, 0, 0);
        let a = &mut info.args;
        a[shmem_args::DEVICE_INDEX] = self.device_index as u64;
        a[shmem_args::ME] = self.me as u64;
        a[shmem_args::PEERS] = peers;
        a[shmem_args::BYTES] = self.bytes;
        a[shmem_args::CHUNK] = self.chunk;
        a[shmem_args::SEED] = self.seed;
        a[shmem_args::TIMEOUT_MS] = self.timeout_ms;
        a[shmem_args::JOIN_TIMEOUT_MS] = self.join_timeout_ms;
        a[shmem_args::ROUNDS] = self.rounds;
        a[shmem_args::FLAGS] = if self.corrupt_head {
            SHMEM_CORRUPT_HEAD
        } else {
            0
        } | self.notify.probe_flags()
            | if self.quiet { SHMEM_QUIET } else { 0 }
            | if self.hold { SHMEM_HOLD } else { 0 }
            | if self.zero_copy { SHMEM_ZERO_COPY } else { 0 }
            | if self.forge { SHMEM_FORGE } else { 0 };
        a[shmem_args::SPIN_US] = self.spin_us;
        a[shmem_args::START_DELAY_MS] = self.start_delay_ms;
        a[shmem_args::JITTER_CYCLES] = self.jitter_cycles;
        a[shmem_args::TRANSFERS] = self.transfers;
        a[shmem_args::EXPECT_STREAM] = self.expect_stream;
        if let Role::Exchange { .. } = self.role {
            // An exchange has no `transfers`; the slot carries its vectors.
            a[shmem_args::VECTORS] = self.vectors as u64;
        }
        info
    }
}

/// A ping-pong between two probes on a shared-memory channel
/// ([`Workload::ShmemPingPong`]): latency, one message in flight.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PingPongTask {
    /// Which ivshmem function on the guest's bus (0 = the first).
    pub device_index: u32,
    /// The VM's member index in the channel.
    pub me: u32,
    /// The other side's member index.
    pub peer: u32,
    /// Sends first and times each round trip (in the round log).
    pub initiator: bool,
    /// Bounce one word in the member table instead of ring messages: the
    /// cache-line floor the ring is measured against.
    pub line: bool,
    /// `rounds` of the floor first, then `rounds` of ring messages, in the
    /// same boot (the round log holds both, in that order).
    pub floor_first: bool,
    /// The floor carries the message too: copied beside the word, with no
    /// ring protocol (`SHMEM_PP_COPY`).
    pub copy_floor: bool,
    /// Message bytes (ignored with `line`).
    pub bytes: u64,
    /// Round trips.
    pub rounds: u64,
    /// Payload pattern seed.
    pub seed: u64,
    /// A peer whose heartbeat stops for this long is reported gone.
    pub timeout_ms: u64,
    /// How long to wait for the peer to join.
    pub join_timeout_ms: u64,
    /// Doorbells (on a doorbell device): ring after every message
    /// (`Always`), or only a side that declared it sleeps after polling
    /// `spin_us` (`Adaptive`); `Never` polls.
    pub notify: Notify,
    /// Adaptive: how long a side polls before it sleeps.
    pub spin_us: u64,
}

impl PingPongTask {
    /// `rounds` round trips of `bytes` between `me` and `peer`.
    pub fn new(me: u32, peer: u32, initiator: bool, bytes: u64, rounds: u64) -> Self {
        Self {
            device_index: 0,
            me,
            peer,
            initiator,
            line: false,
            floor_first: false,
            copy_floor: false,
            bytes,
            rounds,
            seed: 0,
            timeout_ms: 2000,
            join_timeout_ms: 60_000,
            notify: Notify::Never,
            spin_us: SPIN_US_PVM,
        }
    }

    /// The boot-info page that makes the probe run this task.
    pub fn boot_info(&self) -> BootInfo {
        use intervm_protocol::probe::{
            SHMEM_PP_COPY, SHMEM_PP_FLOOR_FIRST, SHMEM_PP_INITIATOR, SHMEM_PP_LINE,
        };
        let mut info = BootInfo::new(Workload::ShmemPingPong, 0, 0);
        let a = &mut info.args;
        a[shmem_args::DEVICE_INDEX] = self.device_index as u64;
        a[shmem_args::ME] = self.me as u64;
        a[shmem_args::PEERS] = self.peer as u64;
        a[shmem_args::BYTES] = self.bytes;
        a[shmem_args::ROUNDS] = self.rounds;
        a[shmem_args::SEED] = self.seed;
        a[shmem_args::TIMEOUT_MS] = self.timeout_ms;
        a[shmem_args::JOIN_TIMEOUT_MS] = self.join_timeout_ms;
        a[shmem_args::SPIN_US] = self.spin_us;
        a[shmem_args::FLAGS] = self.notify.probe_flags()
            | if self.initiator {
                SHMEM_PP_INITIATOR
            } else {
                0
            }
            | if self.line { SHMEM_PP_LINE } else { 0 }
            | if self.floor_first {
                SHMEM_PP_FLOOR_FIRST
            } else {
                0
            }
            | if self.copy_floor { SHMEM_PP_COPY } else { 0 };
        info
    }
}

/// What a probe reports about one peer of a transfer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PeerRecord {
    /// Payload bytes moved.
    pub bytes: u64,
    /// Frames moved.
    pub frames: u64,
    /// `ring::fold` of the frame checksums.
    pub stream: u64,
    /// Guest TSC at the last frame.
    pub last_tsc: u64,
}

/// The results of a shared-memory task, read from the boot-info page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ShmemResult {
    /// `RingError::code` and detail of the error that stopped the task.
    pub error: Option<(u64, u64)>,
    /// Guest TSC at the start line.
    pub start_tsc: u64,
    /// Guest TSC at the last byte.
    pub end_tsc: u64,
    /// Polls that found the ring full (send) or empty (receive).
    pub waits: u64,
    /// Doorbells this side rang (doorbell channels).
    pub doorbells: u64,
    /// Times this side slept waiting for a doorbell.
    pub sleeps: u64,
    /// Sleep declarations this side made in rings; the peer rings at most
    /// once per declaration.
    pub declared: u64,
    /// Guest TSC frequency.
    pub tsc_khz: u64,
    /// Rounds completed (receiver).
    pub rounds: u64,
    /// TSC cycles of the fastest and slowest round (receiver).
    pub round_cycles: (u64, u64),
    /// A receiver with [`ShmemTask::transfers`]: how its transfers ended.
    pub transfers: Transfers,
}

/// How the transfers of a receiver with [`ShmemTask::transfers`] ended.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Transfers {
    /// Complete, with the expected checksum.
    pub ok: u64,
    /// Left by the sender (crashed, killed, stopped) before their end;
    /// reported, never counted as received.
    pub lost: u64,
    /// Ended by a ring error or with a wrong checksum.
    pub bad: u64,
    /// Bytes interrupted transfers left in the ring, dropped before the
    /// next one started.
    pub stale_bytes: u64,
}

impl ShmemResult {
    /// Decodes the results of `info`.
    pub fn from_info(info: &BootInfo) -> Self {
        let r = &info.results;
        Self {
            error: (r[results::SHM_ERROR] != 0)
                .then(|| (r[results::SHM_ERROR], r[results::SHM_ERROR_DETAIL])),
            start_tsc: r[results::SHM_START_TSC],
            end_tsc: r[results::SHM_END_TSC],
            waits: r[results::SHM_WAITS],
            doorbells: r[results::SHM_DOORBELLS],
            sleeps: r[results::SHM_SLEEPS],
            declared: r[results::SHM_DECLARED],
            tsc_khz: info.tsc_khz,
            rounds: r[results::SHM_ROUNDS],
            round_cycles: (r[results::SHM_ROUND_MIN], r[results::SHM_ROUND_MAX]),
            transfers: Transfers {
                ok: r[results::SHM_TRANSFERS_OK],
                lost: r[results::SHM_TRANSFERS_LOST],
                bad: r[results::SHM_TRANSFERS_BAD],
                stale_bytes: r[results::SHM_STALE_BYTES],
            },
        }
    }

    /// `cycles` in seconds, if the TSC frequency is known.
    pub fn cycles_to_seconds(&self, cycles: u64) -> Option<f64> {
        (self.tsc_khz > 0).then(|| cycles as f64 / (self.tsc_khz as f64 * 1e3))
    }

    /// Start-to-last-byte time in seconds, if the TSC frequency is known.
    pub fn seconds(&self) -> Option<f64> {
        (self.tsc_khz > 0 && self.end_tsc >= self.start_tsc)
            .then(|| (self.end_tsc - self.start_tsc) as f64 / (self.tsc_khz as f64 * 1e3))
    }
}

/// The record a probe left for `peer` (what it sent to the peer, or, on a
/// receiver or an exchange, what it received from it).
pub fn peer_record(info: &BootInfo, peer: u32) -> PeerRecord {
    record_at(info, results::SHM_PEER_FIRST, peer)
}

/// What an exchange ([`Role::Exchange`]) sent to `peer`.
pub fn sent_record(info: &BootInfo, peer: u32) -> PeerRecord {
    record_at(info, results::SHM_SENT_FIRST, peer)
}

/// Interrupts an exchange ([`Role::Exchange`]) took on MSI-X vector `v`.
pub fn vector_irqs(info: &BootInfo, v: u32) -> u64 {
    info.results
        .get(results::SHM_VECTOR_IRQS + v as usize)
        .copied()
        .filter(|_| (v as u64) < intervm_protocol::probe::EXCHANGE_MAX_VECTORS)
        .unwrap_or(0)
}

fn record_at(info: &BootInfo, first: usize, peer: u32) -> PeerRecord {
    let b = first + peer as usize * results::SHM_RECORD_LEN;
    let r = info.results.get(b..b + 4).unwrap_or(&[0; 4]);
    PeerRecord {
        bytes: r[0],
        frames: r[1],
        stream: r[2],
        last_tsc: r[3],
    }
}

/// Names a ring error code the way `RingError` does.
pub fn error_name(code: u64) -> &'static str {
    const ALL: [RingError; 11] = [
        RingError::RegionTooSmall { needed: 0, have: 0 },
        RingError::BadGeometry,
        RingError::NotInitialized,
        RingError::BadMember(0),
        RingError::CorruptIndex(0),
        RingError::CorruptLength(0),
        RingError::BadChecksum { seq: 0 },
        RingError::BadSequence {
            expected: 0,
            found: 0,
        },
        RingError::TooLarge(0),
        RingError::PeerGone(0),
        RingError::NotWritable,
    ];
    const NAMES: [&str; 11] = [
        "region too small",
        "bad geometry",
        "region not formatted",
        "bad member",
        "corrupt ring index",
        "corrupt frame length",
        "bad checksum",
        "bad sequence",
        "message too large",
        "peer gone",
        "region header read-only",
    ];
    ALL.iter()
        .position(|e| e.code() == code)
        .map_or("unknown error", |i| NAMES[i])
}

/// The stream checksum a probe sending `bytes` with `seed` produces with
/// frames of `frame` payload bytes (see
/// `intervm_protocol::probe::shmem_frame_bytes`), computed independently on
/// the host.
pub fn expected_stream(seed: u64, bytes: u64, frame: u64) -> u64 {
    let src_len = shmem_source_bytes(bytes, frame);
    if src_len == 0 {
        return 0;
    }
    let mut src = vec![0u8; src_len as usize];
    ring::fill_pattern(seed, 0, &mut src);
    let sums: Vec<u64> = src.chunks(frame as usize).map(ring::checksum).collect();
    let frames = bytes.div_ceil(frame);
    let mut stream = 0;
    let mut left = bytes;
    for i in 0..frames as usize {
        let sum = if left >= frame {
            sums[i % sums.len()]
        } else {
            // A short last frame: the head of the next source frame.
            let start = (i % sums.len()) * frame as usize;
            ring::checksum(&src[start..start + left as usize])
        };
        stream = ring::fold(stream, sum);
        left = left.saturating_sub(frame);
    }
    stream
}

/// The frame size a sender will use (re-exported policy).
pub fn frame_bytes(chunk: u64, bytes: u64, max_payload: u64) -> u64 {
    shmem_frame_bytes(chunk, bytes, max_payload)
}

pub use intervm_protocol::ring::seed_for;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expected_stream_matches_a_direct_computation() {
        // 3.5 frames of 4 KiB: the source holds the 3 whole frames, and the
        // short last frame repeats the head of the source.
        let (seed, frame, bytes) = (9, 4096u64, 4096 * 3 + 2048);
        let mut src = vec![0u8; 3 * 4096];
        ring::fill_pattern(seed, 0, &mut src);
        let mut want = 0;
        for c in src.chunks(frame as usize).chain([&src[..2048]]) {
            want = ring::fold(want, ring::checksum(c));
        }
        assert_eq!(expected_stream(seed, bytes, frame), want);
        assert_ne!(expected_stream(seed + 1, bytes, frame), want);
    }

    #[test]
    fn tasks_encode_their_arguments() {
        let mut t = ShmemTask::new(2, Role::Recv { from: 0b11 }, 1 << 20);
        t.device_index = 1;
        let i = t.boot_info();
        assert_eq!(i.workload, Workload::ShmemRecv as u32);
        assert_eq!(i.args[shmem_args::PEERS], 0b11);
        assert_eq!(i.args[shmem_args::DEVICE_INDEX], 1);
        assert_eq!(error_name(RingError::PeerGone(1).code()), "peer gone");
        let mut x = ShmemTask::new(0, Role::Exchange { with: 0b110 }, 4096);
        x.vectors = 3;
        let i = x.boot_info();
        assert_eq!(i.workload, Workload::ShmemExchange as u32);
        assert_eq!(i.args[shmem_args::PEERS], 0b110);
        assert_eq!(i.args[shmem_args::VECTORS], 3);
        assert_ne!(seed_for("a", "bc"), seed_for("ab", "c"));
    }
}
