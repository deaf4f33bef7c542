//! The register map of the port-I/O channel device.
//!
//! A block of [`PORT_COUNT`] ports at a configurable base (default
//! [`DEFAULT_BASE`]). Offsets below are from the base. Every register except
//! [`DATA`] is 32 bits wide; other widths read all-ones, are ignored when
//! written, and set [`RESULT`] to [`R_BAD_ACCESS`].
//!
//! **Port mode.** The sender writes a message's bytes to [`DATA`] with
//! `out` of any width (or `rep outs`), then writes [`C_SEND`] to
//! [`CONTROL`]; the bytes become one message to the peer selected in
//! [`PEER`]. The receiver reads [`RX_LEN`] (the unread bytes of the current
//! message, pulling the next one in if none is current) and then reads that
//! many bytes from [`DATA`] with `in` of any width (or `rep ins`); a message
//! is done when its last byte is read, and bytes past its end read as zero.
//! [`RX_FROM`] tells which member sent the current message.
//!
//! **Descriptor mode.** The sender writes a guest-physical address to
//! [`DESC_ADDR_LO`]/[`DESC_ADDR_HI`] and a length to [`DESC_LEN`], then
//! [`C_SEND_DESC`]: the VMM copies that whole buffer as one message in one
//! exit. [`C_RECV_DESC`] copies the current message (all of it, or nothing
//! if it is longer than [`DESC_LEN`]) to the buffer and sets [`DESC_LEN`]
//! to its length. Buffers must lie in guest RAM. The VMM copies straight
//! between the buffer and its queue to the peer; a message that fails its
//! checksum on the way in answers [`R_BROKEN`], and the buffer then holds
//! bytes that must not be used.
//!
//! An empty message (a send command with nothing written) is delivered
//! too: [`STATUS`] shows [`S_RX_READY`] with [`RX_LEN`] 0 until
//! [`C_DISCARD_RX`] or [`C_RECV_DESC`] takes it. Tools use it to mark the
//! end of a stream.
//!
//! **Start convention** (probe guest and `intervm-guest`): the receiver
//! sends each sender a one-byte message and starts its clock; a sender
//! discards it and starts sending.
//!
//! **Restarts.** A member whose VMM restarts (killed, then run again) is a
//! new *incarnation* of it. The device tells its guest when the one it was
//! talking to is gone: from then on the peer shows [`S_PEER_GONE`] (sends
//! to it fail with [`R_PEER_GONE`]) even once the new incarnation is up,
//! and nothing of the new one is delivered, until the guest writes
//! [`C_ACCEPT_PEER`] with that peer selected. Messages the old incarnation
//! sent are delivered until then, and dropped by the accept; messages sent
//! to an incarnation that died are lost with it. So a transfer never runs
//! on from one incarnation into the next: a guest that accepts starts a new
//! one. The first incarnation a device sees of each peer is accepted
//! without a command.
//!
//! After each command [`RESULT`] holds an `R_*` code. Sending never drops a
//! message: when the peer's queue is full the result is [`R_WOULD_BLOCK`]
//! and the message stays pending, to be sent again with the same command.

/// Default first port.
pub const DEFAULT_BASE: u16 = 0x5000;
/// Ports the device occupies.
pub const PORT_COUNT: u16 = 0x40;

/// Data register (8, 16 or 32 bits; `rep ins/outs`).
pub const DATA: u16 = 0x00;
/// Status bits (`S_*`).
pub const STATUS: u16 = 0x04;
/// Read: unread bytes of the current received message (0: none waiting).
pub const RX_LEN: u16 = 0x08;
/// Read: the largest message the selected peer's queue takes right now.
pub const TX_SPACE: u16 = 0x0c;
/// Write: a command (`C_*`).
pub const CONTROL: u16 = 0x10;
/// Read/write: the member messages are sent to.
pub const PEER: u16 = 0x14;
/// Read: this VM's member index.
pub const ME: u16 = 0x18;
/// Read: number of members in the channel.
pub const MEMBERS: u16 = 0x1c;
/// Read/write: descriptor guest-physical address, low 32 bits.
pub const DESC_ADDR_LO: u16 = 0x20;
/// Read/write: descriptor guest-physical address, high 32 bits.
pub const DESC_ADDR_HI: u16 = 0x24;
/// Read/write: descriptor length (after `C_RECV_DESC`: the message length).
pub const DESC_LEN: u16 = 0x28;
/// Read: result of the last command (`R_*`).
pub const RESULT: u16 = 0x2c;
/// Read: the member that sent the current received message.
pub const RX_FROM: u16 = 0x30;
/// Read: bytes written to [`DATA`] for the pending outgoing message.
pub const TX_LEN: u16 = 0x34;
/// Read: the largest message the channel carries.
pub const MAX_MESSAGE: u16 = 0x38;

/// Status: a received message is waiting (or partly read).
pub const S_RX_READY: u32 = 1 << 0;
/// Status: the selected peer's queue has room for a message.
pub const S_TX_ROOM: u32 = 1 << 1;
/// Status: the selected peer has joined and is alive.
pub const S_PEER_PRESENT: u32 = 1 << 2;
/// Status: the selected peer left or died.
pub const S_PEER_GONE: u32 = 1 << 3;
/// Status: the last command failed ([`RESULT`] is not [`R_OK`]).
pub const S_ERROR: u32 = 1 << 4;
/// Status (with [`S_PEER_GONE`]): the selected peer's incarnation this
/// device talked to is gone and a new one is there, waiting for
/// [`C_ACCEPT_PEER`].
pub const S_PEER_NEW: u32 = 1 << 5;

/// Command: send the bytes written to [`DATA`] as one message.
pub const C_SEND: u32 = 1;
/// Command: drop the pending outgoing message and the current received one.
pub const C_RESET: u32 = 2;
/// Command: drop the current received message.
pub const C_DISCARD_RX: u32 = 3;
/// Command: send the descriptor buffer as one message.
pub const C_SEND_DESC: u32 = 4;
/// Command: receive the current message into the descriptor buffer.
pub const C_RECV_DESC: u32 = 5;
/// Command: accept the incarnation of the selected peer that is there now
/// (see "Restarts" above): it shows present again, its messages flow, and
/// whatever the incarnation before it left unread is dropped.
pub const C_ACCEPT_PEER: u32 = 6;

/// Result: done.
pub const R_OK: u32 = 0;
/// Result: the peer's queue is full; the message is still pending.
pub const R_WOULD_BLOCK: u32 = 1;
/// Result: the selected peer left or died.
pub const R_PEER_GONE: u32 = 2;
/// Result: the descriptor is not in guest RAM.
pub const R_BAD_ADDRESS: u32 = 3;
/// Result: the message is larger than the channel carries, or than the
/// receive buffer.
pub const R_TOO_LARGE: u32 = 4;
/// Result: no message is waiting.
pub const R_NO_MESSAGE: u32 = 5;
/// Result: [`PEER`] names no other member.
pub const R_BAD_PEER: u32 = 6;
/// Result: unknown command.
pub const R_BAD_COMMAND: u32 = 7;
/// Result: an access of the wrong width or at no register.
pub const R_BAD_ACCESS: u32 = 8;
/// Result: the transport to the peer is broken (corrupt queue).
pub const R_BROKEN: u32 = 9;

/// A short description of result code `r`.
pub const fn result_name(r: u32) -> &'static str {
    match r {
        R_OK => "ok",
        R_WOULD_BLOCK => "queue full",
        R_PEER_GONE => "peer gone",
        R_BAD_ADDRESS => "descriptor outside guest RAM",
        R_TOO_LARGE => "message too large",
        R_NO_MESSAGE => "no message",
        R_BAD_PEER => "bad peer",
        R_BAD_COMMAND => "bad command",
        R_BAD_ACCESS => "bad register access",
        R_BROKEN => "queue broken",
        _ => "unknown result",
    }
}
