//! The boot ABI of the intervm probe guest.
//!
//! The VMM loads the probe ELF, builds identity page tables and enters it in
//! 64-bit mode at CPL0 (see `vmm_core::boot::probe`). Before the first
//! instruction it fills a [`BootInfo`] page at [`BOOT_INFO_GPA`] that tells
//! the probe which [`Workload`] to run. The probe writes its results back
//! into the same page and powers off through the debug-exit port, so a test
//! reads results from guest memory instead of parsing console text.

/// Guest-physical address of the [`BootInfo`] page.
pub const BOOT_INFO_GPA: u64 = 0x5000;

/// `BootInfo::magic`: ASCII "IVMPROBE", little endian.
pub const BOOT_INFO_MAGIC: u64 = u64::from_le_bytes(*b"IVMPROBE");

/// Version of this layout; bumped on any incompatible change.
pub const BOOT_INFO_VERSION: u32 = 1;

/// Debug device port range base (see `vmm_core::devices::debug`).
pub const DEBUG_PORT_BASE: u16 = 0x500;
/// Offset of the scratch register inside the debug port range: a write
/// stores the value, a read returns it. Used for exit round-trip timing.
pub const DEBUG_SCRATCH_OFFSET: u16 = 0;
/// Offset of the exit register: writing value `v` powers the VM off with
/// exit code `v`.
pub const DEBUG_EXIT_OFFSET: u16 = 4;
/// Size of the debug port range.
pub const DEBUG_PORT_LEN: u16 = 8;

/// Exit code the probe uses for success.
pub const EXIT_OK: u32 = 0;
/// Exit code base for a fatal CPU exception: `EXIT_EXCEPTION_BASE + vector`.
pub const EXIT_EXCEPTION_BASE: u32 = 0x100;
/// Exit code for a workload failure; details are in `BootInfo::results`.
pub const EXIT_FAILED: u32 = 0x200;
/// Exit code for a `BootInfo` the probe does not understand.
pub const EXIT_BAD_BOOT_INFO: u32 = 0x201;

/// First interrupt vector the probe uses for device interrupts (MSI-X vector
/// `n` of the device under test is programmed to IDT vector
/// `IRQ_VECTOR_BASE + n`).
pub const IRQ_VECTOR_BASE: u8 = 0x40;
/// IDT vector used for INTx (routed through the IOAPIC).
pub const INTX_VECTOR: u8 = 0x60;
/// Spurious-interrupt vector programmed into the LAPIC SVR.
pub const SPURIOUS_VECTOR: u8 = 0xff;

/// What the probe should do after boot.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Workload {
    /// Print a greeting (argument 0: a number to include) and exit 0.
    Hello = 1,
    /// Time port-I/O exits: `args[0]` iterations of `out` to the debug
    /// scratch port at CPL3, then at CPL0. Results: [`results::PIO_CPL3_CYCLES`],
    /// [`results::PIO_CPL0_CYCLES`], [`results::PIO_ITERATIONS`].
    PioRoundTrip = 2,
    /// Enumerate PCI bus 0 and size every BAR; see [`results::PCI_COUNT`].
    PciScan = 3,
    /// Find the device `args[0]` (vendor << 16 | device), enable MSI-X with
    /// `args[1]` vectors, set state [`State::Ready`], wait until
    /// `args[2]` interrupts, reading BAR0 offset `args[3]` (the device's
    /// interrupt-status register) to ack each one before the EOI.arrived on vector 0 (by `hlt` at CPL0), then exit.
    MsixWait = 4,
    /// Find the device `args[0]`, route its INTx through the IOAPIC, set
    /// state [`State::Ready`], and wait for `args[2]` interrupts; after each
    /// one it reads BAR0 offset `args[3]` (the device's interrupt-status
    /// register, which must deassert the line) and then EOIs. `args[1]`
    /// bit 0: program the IOAPIC pin edge- instead of level-triggered (PVM
    /// does not inject level-triggered IOAPIC interrupts); bit 1: poll at
    /// CPL3 instead of halting.
    IntxWait = 5,
    /// Find the device `args[0]`, move its BAR `args[1]` to address
    /// `args[2]`, and check the pattern `args[3]` (a u64) that the host put
    /// at offset 0 of the BAR's backing memory is visible there. With
    /// `args[4]` non-zero, then write it at offset 8 of each of the BAR's
    /// first `args[5]` pages (the host checks which writes landed).
    BarMove = 6,
    /// Raise a CPU exception at CPL3: `args[0]` = 0 (#DE, divide by zero),
    /// 13 (#GP, non-canonical address) or 14 (#PF, unmapped address); 255
    /// triple-faults instead (the VMM sees a shutdown).
    Fault = 7,
    /// Send over the shared-memory ring transport at CPL3, polling BAR2 of
    /// an ivshmem device. Arguments in [`shmem_args`], results in
    /// [`results`] (`SHM_*`).
    ShmemSend = 8,
    /// Receive over the shared-memory ring transport from every member in
    /// the peer bitmask, polling. Arguments in [`shmem_args`], results in
    /// [`results`] (`SHM_*`, one record per peer).
    ShmemRecv = 9,
    /// Send over the port-I/O channel at CPL3. Arguments in
    /// [`portio_args`]; results in [`results`] (`SHM_*`, the transfer
    /// results shared by every channel workload).
    PortioSend = 10,
    /// Receive over the port-I/O channel at CPL3 from every member in the
    /// peer bitmask. Arguments in [`portio_args`].
    PortioRecv = 11,
    /// Doorbell ping-pong on an ivshmem-doorbell device: arguments in
    /// [`doorbell_args`], results `DB_*` in [`results`].
    DoorbellPingPong = 12,
    /// Run the `args[0]` tasks of the table at [`TASK_TABLE_GPA`] in order
    /// (each a [`TaskEntry`]), stopping at the first that fails.
    Sequence = 13,
    /// A hostile guest: random accesses of random widths to every PCI
    /// function's config space and BARs, the port-I/O block, doorbells to
    /// random peers and vectors, random words in its shared regions.
    /// Arguments in [`chaos_args`]; results `CHAOS_*` in [`results`].
    Chaos = 14,
    /// Ping-pong with one peer over the shared-memory ring: the initiator
    /// sends a message of `BYTES` and waits for it to come back, `ROUNDS`
    /// times; each round trip goes to the round log ([`ROUND_LOG_GPA`]).
    /// With [`SHMEM_PP_LINE`], one word each way in the member table
    /// instead of the ring: the cache-line floor. Arguments in
    /// [`shmem_args`] (`PEERS` is the peer's member index).
    ShmemPingPong = 15,
    /// All pairs at once: send `BYTES` to every member in the `PEERS`
    /// bitmask and receive `BYTES` from each of them, over their rings of
    /// one region, interleaved in one loop. With doorbells
    /// (`FLAGS` notify bits), the member enables [`shmem_args::VECTORS`]
    /// MSI-X vectors and rings member `m` on vector `me % VECTORS`, so a
    /// member's interrupts say which peer rang. Results: one receive record
    /// per peer at [`results::SHM_PEER_FIRST`], one send record per peer at
    /// [`results::SHM_SENT_FIRST`], interrupts per vector at
    /// [`results::SHM_VECTOR_IRQS`].
    ShmemExchange = 16,
    /// Port-I/O ping-pong in descriptor mode: the initiator sends a
    /// `BYTES` message to `PEERS` (the peer's member index) and waits for
    /// the echo, `ROUNDS` times, comparing each echo byte for byte and
    /// logging each round trip in the round log; the other side echoes.
    /// Arguments in [`portio_args`].
    PortioPingPong = 17,
}

/// Arguments of [`Workload::Chaos`].
pub mod chaos_args {
    /// Seed of the random sequence (the same seed, the same accesses).
    pub const SEED: usize = 0;
    /// Number of accesses.
    pub const OPS: usize = 1;
    /// First port of the port-I/O block to hit (0: none).
    pub const PORT_BASE: usize = 2;
}

impl Workload {
    /// Decodes a raw workload number.
    pub fn from_u32(v: u32) -> Option<Self> {
        Some(match v {
            1 => Self::Hello,
            2 => Self::PioRoundTrip,
            3 => Self::PciScan,
            4 => Self::MsixWait,
            5 => Self::IntxWait,
            6 => Self::BarMove,
            7 => Self::Fault,
            8 => Self::ShmemSend,
            9 => Self::ShmemRecv,
            10 => Self::PortioSend,
            11 => Self::PortioRecv,
            12 => Self::DoorbellPingPong,
            13 => Self::Sequence,
            14 => Self::Chaos,
            15 => Self::ShmemPingPong,
            16 => Self::ShmemExchange,
            17 => Self::PortioPingPong,
            _ => return None,
        })
    }
}

/// Progress of the probe, in `BootInfo::state`, for a host that waits for
/// the guest to reach a point (for example before sending interrupts).
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Written by the VMM before boot.
    Booting = 0,
    /// The probe reached CPL3 and is running its workload.
    Running = 1,
    /// The workload is ready for the host's part (e.g. interrupts enabled).
    Ready = 2,
    /// The workload finished; results are final.
    Done = 3,
}

/// Argument slots of [`Workload::ShmemSend`] and [`Workload::ShmemRecv`].
pub mod shmem_args {
    /// Which ivshmem function to use: the n-th `1af4:1110` on bus 0.
    pub const DEVICE_INDEX: usize = 0;
    /// This VM's member index in the channel.
    pub const ME: usize = 1;
    /// Send: the receiving member. Receive: bitmask of sending members.
    pub const PEERS: usize = 2;
    /// Bytes to send (send) or to receive from each peer (receive).
    pub const BYTES: usize = 3;
    /// Send: payload bytes per frame. Receive: buffer size (largest frame).
    pub const CHUNK: usize = 4;
    /// Seed of the payload pattern (`ring::fill_pattern`).
    pub const SEED: usize = 5;
    /// A peer whose heartbeat does not move for this long is gone.
    pub const TIMEOUT_MS: usize = 6;
    /// [`super::SHMEM_CORRUPT_HEAD`] and friends.
    pub const FLAGS: usize = 7;
    /// How long to wait for peers to join before giving up.
    pub const JOIN_TIMEOUT_MS: usize = 8;
    /// Repeat the transfer this many times (0 or 1: once), each round
    /// started by the receiver; for timing small transfers.
    pub const ROUNDS: usize = 9;
    /// Adaptive notification: how long to poll before sleeping, in µs.
    pub const SPIN_US: usize = 10;
    /// Sender: wait this long after the start line before sending (to
    /// measure an idle receiver).
    pub const START_DELAY_MS: usize = 11;
    /// Stress: at most this many TSC cycles of random delay before each
    /// frame (sender) or receive (receiver); 0: none.
    pub const JITTER_CYCLES: usize = 12;
    /// Sender with [`super::SHMEM_HOLD`]: 0 until the host lets the first
    /// frame go by writing any other value here while the probe runs.
    pub const RELEASE: usize = 13;
    /// Receiver from one sender: 0 for one transfer that ends at the first
    /// error (the default); N to receive N complete transfers from a
    /// sender that may leave, crash or be restarted between or during
    /// them. An interrupted transfer is counted
    /// (`results::SHM_TRANSFERS_LOST`) and the receiver waits, for up to
    /// `JOIN_TIMEOUT_MS`, for the sender's next transfer or incarnation.
    pub const TRANSFERS: usize = 14;
    /// With [`TRANSFERS`]: the stream checksum (`ring::fold` of the frame
    /// checksums) every complete transfer must have; one that differs is
    /// counted in `results::SHM_TRANSFERS_BAD`.
    pub const EXPECT_STREAM: usize = 15;
    /// [`super::Workload::ShmemExchange`]: MSI-X vectors every member
    /// enables (1 to [`super::EXCHANGE_MAX_VECTORS`]); a member rings a
    /// peer on vector `ME % VECTORS`. The slot of [`TRANSFERS`], which an
    /// exchange does not use.
    pub const VECTORS: usize = TRANSFERS;
}

/// Most MSI-X vectors a [`Workload::ShmemExchange`] member enables: one
/// per member of the largest region.
pub const EXCHANGE_MAX_VECTORS: u64 = crate::ring::MAX_MEMBERS as u64;

/// Argument slots of [`Workload::PortioSend`] and [`Workload::PortioRecv`].
pub mod portio_args {
    /// First port of the channel device.
    pub const BASE: usize = 0;
    /// Send: the receiving member. Receive: bitmask of sending members.
    pub const PEERS: usize = 1;
    /// Bytes to send, or to receive from each sender.
    pub const BYTES: usize = 2;
    /// Bytes per message (send; the receiver takes any size).
    pub const MESSAGE: usize = 3;
    /// [`super::PORTIO_MODE_PORT`] or [`super::PORTIO_MODE_DESCRIPTOR`].
    pub const MODE: usize = 4;
    /// Port mode: access width, 1, 2 or 4 bytes.
    pub const WIDTH: usize = 5;
    /// Port mode: 1 to use `rep outs`/`rep ins` instead of one `out`/`in`
    /// per element.
    pub const REP: usize = 6;
    /// Seed of the payload pattern.
    pub const SEED: usize = 7;
    /// Give up when the peer is reported gone and nothing arrived for this
    /// long.
    pub const TIMEOUT_MS: usize = 8;
    /// How long to wait for the start message (send) or for the peers to
    /// be present (receive).
    pub const JOIN_TIMEOUT_MS: usize = 9;
    /// Receive (one sender): serve this many complete transfers of
    /// [`BYTES`] from a sender that may restart meanwhile (0: one transfer,
    /// as before). A transfer whose sender goes is counted in
    /// `results::SHM_TRANSFERS_LOST`; the receiver accepts the sender's
    /// next incarnation (`C_ACCEPT_PEER`) and waits for it up to
    /// [`JOIN_TIMEOUT_MS`].
    pub const TRANSFERS: usize = 10;
    /// With [`TRANSFERS`]: the stream checksum each complete transfer must
    /// have (a `ring::fold` of message checksums); others count in
    /// `results::SHM_TRANSFERS_BAD`.
    pub const EXPECT_STREAM: usize = 11;
    /// Ping-pong: round trips.
    pub const ROUNDS: usize = 12;
    /// Ping-pong: 1 on the side that sends first and times.
    pub const INITIATOR: usize = 13;
}

/// Port-I/O transfers move bytes through the data register.
pub const PORTIO_MODE_PORT: u64 = 0;
/// Port-I/O transfers move whole buffers with descriptors.
pub const PORTIO_MODE_DESCRIPTOR: u64 = 1;

/// Guest-physical address of the probe's payload buffer for shared-memory
/// transfers (source when sending, destination when receiving).
pub const SHMEM_BUF_GPA: u64 = 32 << 20;
/// Largest payload buffer; bigger transfers stream it repeatedly.
pub const SHMEM_BUF_MAX: u64 = 16 << 20;

/// Guest-physical address of the round log: a receiving shared-memory
/// probe writes the TSC cycles of its round `r` (1-based; from its "go" to
/// the last frame of the round) as a `u64` at slot `r - 1`, for the first
/// [`ROUND_LOG_MAX`] rounds, so a benchmark can tell the first (cold)
/// transfer of a boot from the warm ones and take percentiles.
pub const ROUND_LOG_GPA: u64 = 0x40000;
/// Rounds the round log holds (it ends below the EBDA at `0x9fc00`).
pub const ROUND_LOG_MAX: u64 = 0x40000 / 8;

/// Payload bytes per frame a sender uses for a requested `chunk`, given the
/// transfer size and the ring's largest message.
pub const fn shmem_frame_bytes(chunk: u64, bytes: u64, max_payload: u64) -> u64 {
    let c = if chunk == 0 { 1 } else { chunk };
    let c = if c > max_payload { max_payload } else { c };
    let b = if bytes == 0 { 1 } else { bytes };
    if c > b {
        b
    } else {
        c
    }
}

/// Bytes of the sender's source buffer: `min(bytes, SHMEM_BUF_MAX)` rounded
/// down to whole frames. The sender streams it repeatedly, one frame of
/// `frame` bytes at a time, so frame `i` carries source bytes
/// `(i * frame) % len ..`.
pub const fn shmem_source_bytes(bytes: u64, frame: u64) -> u64 {
    let b = if bytes < SHMEM_BUF_MAX {
        bytes
    } else {
        SHMEM_BUF_MAX
    };
    b / frame * frame
}

/// Where frame `index` of a test-pattern stream starts in the pattern. A
/// sender of `bytes` in frames of `frame` bytes streams its source buffer
/// ([`shmem_source_bytes`]) repeatedly, so frame `index` carries the
/// pattern ([`crate::ring::fill_pattern`]) from this position on; a receiver
/// checks every byte with it.
pub const fn pattern_frame_pos(bytes: u64, frame: u64, index: u64) -> u64 {
    let frame = if frame == 0 { 1 } else { frame };
    let frames = shmem_source_bytes(bytes, frame) / frame;
    if frames == 0 {
        0
    } else {
        index % frames * frame
    }
}

/// Guest RAM a probe needs to send or receive `bytes` (its buffer lies at
/// [`SHMEM_BUF_GPA`]).
pub const fn shmem_min_memory(bytes: u64) -> u64 {
    let b = if bytes < SHMEM_BUF_MAX {
        bytes
    } else {
        SHMEM_BUF_MAX
    };
    SHMEM_BUF_GPA + b
}

/// `shmem_args::FLAGS` bit of [`Workload::ShmemPingPong`]: this side
/// sends first and times the round trips.
pub const SHMEM_PP_INITIATOR: u64 = 32;
/// `shmem_args::FLAGS` bit of [`Workload::ShmemPingPong`]: bounce one
/// word in each side's member-table entry instead of ring messages.
pub const SHMEM_PP_LINE: u64 = 64;
/// `shmem_args::FLAGS` bit of [`Workload::ShmemPingPong`]: `ROUNDS`
/// round trips of the floor ([`SHMEM_PP_LINE`]) first, then `ROUNDS` of
/// ring messages, in one boot (round log slots `1..=ROUNDS`, then
/// `ROUNDS + 1..=2 * ROUNDS`).
pub const SHMEM_PP_FLOOR_FIRST: u64 = 128;
/// `shmem_args::FLAGS` bit of [`Workload::ShmemPingPong`]: the floor
/// ([`SHMEM_PP_LINE`]) carries the message too. Before publishing its
/// word, a side copies its `BYTES` message to the start of its own
/// ring's data area (no frame, no index, no checksum); after seeing the
/// peer's word, it copies the peer's message out of the peer's ring. The
/// floor of any protocol that signals with a word beside the data.
pub const SHMEM_PP_COPY: u64 = 1024;

/// `shmem_args::FLAGS` bit of [`Notify::Always`](crate::notify::Notify):
/// the sender rings the receiver (vector 0) after each frame; the receiver
/// enables MSI-X and sleeps on its interrupt when every ring is empty,
/// instead of spinning. Set it through `Notify::probe_flags`.
pub const SHMEM_NOTIFY: u64 = 2;

/// Argument slots of [`Workload::DoorbellPingPong`].
pub mod doorbell_args {
    /// Which ivshmem function to use (the n-th `1af4:1110`).
    pub const DEVICE_INDEX: usize = 0;
    /// The peer ID to ring.
    pub const PEER: usize = 1;
    /// Round trips.
    pub const ROUNDS: usize = 2;
    /// 1: ring first (the initiator); 0: answer.
    pub const INITIATOR: usize = 3;
    /// `DB_*` flags.
    pub const FLAGS: usize = 4;
    /// The vector to ring on the peer (and to wait on here).
    pub const VECTOR: usize = 5;
    /// With [`super::DB_BY_REGION`]: this side's member index in the ring
    /// region of BAR2.
    pub const ME: usize = 6;
    /// With [`super::DB_BY_REGION`]: how long to wait for the peer to
    /// publish its doorbell ID, in milliseconds.
    pub const JOIN_TIMEOUT_MS: usize = 7;
}

/// `shmem_args::FLAGS` bit of [`Notify::Adaptive`](crate::notify::Notify):
/// both sides poll for `shmem_args::SPIN_US`, then declare in the ring that
/// they sleep and wait for a doorbell; each side rings the other only when
/// it declared so. Needs ivshmem-doorbell devices (like [`SHMEM_NOTIFY`]).
pub const SHMEM_ADAPTIVE: u64 = 4;

/// `shmem_args::FLAGS` bit: print nothing (so that a host counting VM
/// exits sees only the transfer's own).
pub const SHMEM_QUIET: u64 = 8;

/// `shmem_args::FLAGS` bit (sender): after the start line, send nothing
/// until the host writes a non-zero `shmem_args::RELEASE`. Tests use it to
/// let the receiver go to sleep first (a receiver updates
/// `results::SHM_SLEEPS` as it goes), whatever the scheduling.
pub const SHMEM_HOLD: u64 = 16;

/// `shmem_args::FLAGS` bit of a transfer: frames are filled and read in
/// place (`ring::Producer::try_reserve`, `ring::Consumer::try_borrow`).
/// A sender writes its prepared payload straight into each reserved frame
/// (the one copy left: the sender producing its message), which the
/// commit then sums in place; a receiver sums each frame where it lies
/// instead of copying it out (no copy).
pub const SHMEM_ZERO_COPY: u64 = 256;

/// Doorbell flag: use INTx (IOAPIC, Interrupt Status) instead of MSI-X.
pub const DB_INTX: u64 = 1;
/// Doorbell flag: program the INTx pin edge-triggered (PVM does not inject
/// level-triggered IOAPIC interrupts).
pub const DB_EDGE: u64 = 2;
/// Doorbell flag: wait by polling the interrupt counter at CPL3 instead of
/// halting.
pub const DB_POLL: u64 = 4;
/// Doorbell flag: `doorbell_args::PEER` is the peer's member index in the
/// ring region of BAR2, not its doorbell ID. The probe publishes its own
/// doorbell ID (IVPosition) there as member `doorbell_args::ME`, once it
/// takes interrupts, and rings the ID the peer published (waiting for it up
/// to `doorbell_args::JOIN_TIMEOUT_MS`). Needed when an ivshmem server
/// hands out the IDs, and a start line: neither side rings before the
/// other listens.
pub const DB_BY_REGION: u64 = 8;

/// `shmem_args::FLAGS` bit: the sender behaves like a hostile guest and,
/// after sending half its bytes, writes an impossible head index.
pub const SHMEM_CORRUPT_HEAD: u64 = 1;

/// `shmem_args::FLAGS` bit: the sender is a forger. Instead of sending, it
/// writes a well-formed frame (8 bytes, sequence number 0, its checksum)
/// at the head of every ring between two other members and publishes it
/// there, as if that ring's producer had sent it, then formats the region
/// afresh, then exits. It reports in `results::SHM_FORGED` how many of
/// those rings took the frame (their head moved), and in
/// `results::SHM_ERROR` why formatting was refused (0: it was not).
pub const SHMEM_FORGE: u64 = 512;

/// Number of 64-bit argument slots.
pub const ARG_SLOTS: usize = 16;
/// Number of 64-bit result slots.
pub const RESULT_SLOTS: usize = 256;

/// Indices into `BootInfo::results`.
pub mod results {
    /// TSC cycles for all CPL3 iterations of the PIO loop.
    pub const PIO_CPL3_CYCLES: usize = 0;
    /// TSC cycles for all CPL0 iterations of the PIO loop.
    pub const PIO_CPL0_CYCLES: usize = 1;
    /// Iterations run at each level.
    pub const PIO_ITERATIONS: usize = 2;

    /// [`super::Workload::Chaos`]: accesses made.
    pub const CHAOS_OPS: usize = 0;
    /// [`super::Workload::Chaos`]: PCI functions found at the start.
    pub const CHAOS_FUNCTIONS: usize = 1;
    /// [`super::Workload::Chaos`]: accesses skipped because no device was
    /// there to hit (a function without that BAR, or a BAR moved outside
    /// the PCI windows).
    pub const CHAOS_SKIPPED: usize = 2;

    /// Number of PCI functions found on bus 0.
    pub const PCI_COUNT: usize = 0;
    /// First per-function record; each is [`PCI_RECORD_LEN`] slots:
    /// `bdf`, `vendor << 16 | device`, `class << 8 | header type`, then
    /// six BAR sizes (0 = unimplemented), then the capability-ID bitmap
    /// (bit n set = capability n present).
    pub const PCI_FIRST: usize = 1;
    /// Slots per PCI function record.
    pub const PCI_RECORD_LEN: usize = 10;
    /// Most functions recorded.
    pub const PCI_MAX: usize = 24;

    /// Interrupts counted on the watched vector.
    pub const IRQ_COUNT: usize = 0;
    /// TSC when the probe declared itself ready.
    pub const IRQ_READY_TSC: usize = 1;
    /// TSC when the last interrupt was seen at CPL3.
    pub const IRQ_DONE_TSC: usize = 2;

    /// 1 when the pattern was found at the moved BAR.
    pub const BAR_MOVE_OK: usize = 0;
    /// The value read at the new address.
    pub const BAR_MOVE_SEEN: usize = 1;

    /// Shared memory: 0, or the `ring::RingError::code` that stopped the
    /// transfer.
    pub const SHM_ERROR: usize = 0;
    /// Shared memory: the member the error concerns, or the bad value.
    pub const SHM_ERROR_DETAIL: usize = 1;
    /// Shared memory: TSC when the transfer started (after the peers joined).
    pub const SHM_START_TSC: usize = 2;
    /// Shared memory: TSC when the last byte was sent or received.
    pub const SHM_END_TSC: usize = 3;
    /// Shared memory: polls that found the ring full (send) or empty (receive).
    pub const SHM_WAITS: usize = 4;
    /// Shared memory: TSC cycles spent preparing the payload (not timed).
    pub const SHM_PREPARE_TSC: usize = 5;
    /// Shared memory (receiver): TSC cycles of the fastest round.
    pub const SHM_ROUND_MIN: usize = 6;
    /// Shared memory (receiver): TSC cycles of the slowest round.
    pub const SHM_ROUND_MAX: usize = 7;
    /// Shared memory (receiver): rounds completed.
    pub const SHM_ROUNDS: usize = 8;
    /// Shared memory: doorbells this side rang.
    pub const SHM_DOORBELLS: usize = 9;
    /// Shared memory: times this side slept waiting for a doorbell (a
    /// receiver updates it before each sleep, so the host can wait for one).
    pub const SHM_SLEEPS: usize = 10;
    /// Shared memory: interrupts this side took.
    pub const SHM_IRQS: usize = 11;
    /// Shared memory: TSC cycles spent copying frames into (send) or out of
    /// (receive) the ring, checksum included.
    pub const SHM_COPY_CYCLES: usize = 12;
    /// Shared memory: TSC cycles spent finding the ring full (send) or
    /// empty (receive): waiting for the peer.
    pub const SHM_WAIT_CYCLES: usize = 13;
    /// Shared memory: sleep declarations this side made in rings (one per
    /// ring declared on; a declaration may end without a sleep when the
    /// ring changed meanwhile). The peer rings at most once per
    /// declaration.
    pub const SHM_DECLARED: usize = 14;
    /// Forging sender ([`super::SHMEM_FORGE`]): rings between two other
    /// members whose head moved when it published a frame there.
    pub const SHM_FORGED: usize = 15;
    /// Shared memory (receiver with `shmem_args::TRANSFERS`): complete
    /// transfers with the expected checksum.
    pub const SHM_TRANSFERS_OK: usize = 100;
    /// ... transfers the sender left (crashed, killed, stopped) before
    /// their end: reported, never counted as received.
    pub const SHM_TRANSFERS_LOST: usize = 101;
    /// ... transfers that ended with a ring error or a wrong checksum.
    pub const SHM_TRANSFERS_BAD: usize = 102;
    /// ... bytes an interrupted transfer left in the ring, dropped before
    /// the next one started (`ring::Consumer::drop_stale`).
    pub const SHM_STALE_BYTES: usize = 103;
    /// Shared memory: first per-peer record; each is [`SHM_RECORD_LEN`]
    /// slots: bytes, frames, stream checksum (`ring::fold` of the frame
    /// checksums), TSC of the last frame. A sender has one record, at its
    /// peer's index; a receiver one per sending peer.
    pub const SHM_PEER_FIRST: usize = 16;
    /// Slots per shared-memory peer record.
    pub const SHM_RECORD_LEN: usize = 4;
    /// [`super::Workload::ShmemExchange`]: first per-peer send record (the
    /// receive records are at [`SHM_PEER_FIRST`]), same layout.
    pub const SHM_SENT_FIRST: usize = 104;
    /// [`super::Workload::ShmemExchange`]: interrupts taken on MSI-X vector
    /// `v`, at `SHM_VECTOR_IRQS + v` (16 slots).
    pub const SHM_VECTOR_IRQS: usize = 168;
    /// Doorbell: interrupts taken.
    pub const DB_IRQS: usize = 0;
    /// Doorbell: round trips done.
    pub const DB_ROUNDS: usize = 1;
    /// Doorbell: TSC cycles of all round trips (initiator).
    pub const DB_TOTAL_CYCLES: usize = 2;
    /// Doorbell: fastest round trip (cycles).
    pub const DB_MIN_CYCLES: usize = 3;
    /// Doorbell: slowest round trip (cycles).
    pub const DB_MAX_CYCLES: usize = 4;
    /// Doorbell: this device's IVPosition.
    pub const DB_IV_POSITION: usize = 5;
    /// Exception vector recorded by the probe's fault handler.
    pub const FAULT_VECTOR: usize = 250;
    /// Error code pushed by the CPU for the fault.
    pub const FAULT_ERROR: usize = 251;
    /// Faulting RIP.
    pub const FAULT_RIP: usize = 252;
    /// CR2 is not read (CPL0 cost); slot reserved.
    pub const FAULT_CR2: usize = 253;
    /// A code naming which check failed, for `EXIT_FAILED`.
    pub const FAIL_REASON: usize = 254;
    /// Detail for `FAIL_REASON`.
    pub const FAIL_DETAIL: usize = 255;
}

/// The boot-info page shared by VMM and probe. `#[repr(C)]`, little endian,
/// fits in one 4 KiB page.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct BootInfo {
    /// [`BOOT_INFO_MAGIC`].
    pub magic: u64,
    /// [`BOOT_INFO_VERSION`].
    pub version: u32,
    /// A [`Workload`] as `u32`.
    pub workload: u32,
    /// Guest RAM size in bytes.
    pub mem_size: u64,
    /// TSC frequency in kHz as KVM reports it (0 if unknown).
    pub tsc_khz: u64,
    /// A [`State`] as `u32`, updated by the probe.
    pub state: u32,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Workload arguments.
    pub args: [u64; ARG_SLOTS],
    /// Workload results, written by the probe.
    pub results: [u64; RESULT_SLOTS],
}

impl BootInfo {
    /// A boot-info page for `workload` with the given arguments.
    pub const fn new(workload: Workload, mem_size: u64, vcpus: u32) -> Self {
        Self {
            magic: BOOT_INFO_MAGIC,
            version: BOOT_INFO_VERSION,
            workload: workload as u32,
            mem_size,
            tsc_khz: 0,
            state: State::Booting as u32,
            vcpus,
            args: [0; ARG_SLOTS],
            results: [0; RESULT_SLOTS],
        }
    }

    /// Byte offset of `state`, for hosts that poll it in guest memory.
    pub const STATE_OFFSET: usize = core::mem::offset_of!(BootInfo, state);
    /// Byte offset of `results`.
    pub const RESULTS_OFFSET: usize = core::mem::offset_of!(BootInfo, results);
    /// Byte offset of `args` in the page.
    pub const ARGS_OFFSET: usize = core::mem::offset_of!(BootInfo, args);
}

const _: () = assert!(core::mem::size_of::<BootInfo>() <= 4096);

/// Guest-physical address of the task table of [`Workload::Sequence`].
pub const TASK_TABLE_GPA: u64 = 0x10000;
/// Most tasks in a sequence.
pub const MAX_TASKS: usize = 8;

/// One task of a [`Workload::Sequence`]: the probe copies `args` into the
/// boot-info page, runs `workload`, and copies the boot-info results back
/// into `results` with its exit code in `exit`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct TaskEntry {
    /// A [`Workload`] as `u32` (not `Sequence`).
    pub workload: u32,
    /// The task's exit code (written by the probe; `u32::MAX`: not run).
    pub exit: u32,
    /// Arguments.
    pub args: [u64; ARG_SLOTS],
    /// Results.
    pub results: [u64; RESULT_SLOTS],
}

impl TaskEntry {
    /// The task `info` describes (its workload and arguments).
    pub const fn from_info(info: &BootInfo) -> Self {
        Self {
            workload: info.workload,
            exit: u32::MAX,
            args: info.args,
            results: [0; RESULT_SLOTS],
        }
    }
}

const _: () =
    assert!(TASK_TABLE_GPA as usize + MAX_TASKS * core::mem::size_of::<TaskEntry>() <= 0x20000);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pattern_frames_wrap_at_the_source_buffer() {
        let frame = 64 << 10;
        let frames = SHMEM_BUF_MAX / frame;
        assert_eq!(pattern_frame_pos(40 << 20, frame, 3), 3 * frame);
        assert_eq!(pattern_frame_pos(40 << 20, frame, frames), 0);
        assert_eq!(pattern_frame_pos(40 << 20, frame, frames + 2), 2 * frame);
        // A source smaller than the limit holds whole frames of it.
        assert_eq!(pattern_frame_pos(3 * 4096 + 5, 4096, 3), 0);
        assert_eq!(pattern_frame_pos(0, 0, 7), 0);
    }
}
