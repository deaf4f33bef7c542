//! The port-I/O channel device (register map in
//! `intervm_protocol::portio`).

use intervm_protocol::portio::*;
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::link::{Link, LinkError, PeerState};

/// Slots of [`PortioStats::commands`]: one per command code, up to
/// [`C_ACCEPT_PEER`] (slot 0 stays 0).
pub const COMMAND_SLOTS: usize = C_ACCEPT_PEER as usize + 1;

/// What the device has done, for benchmarks and for spotting hostile guests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PortioStats {
    /// Port accesses (one per element of a string instruction).
    pub accesses: u64,
    /// Commands written to `CONTROL`, by code (`commands[C_SEND_DESC as
    /// usize]`), whatever their result; unknown codes count only as
    /// [`PortioStats::errors`].
    pub commands: [u64; COMMAND_SLOTS],
    /// Accesses to the data register.
    pub data_accesses: u64,
    /// Messages sent.
    pub sent: u64,
    /// Payload bytes sent.
    pub sent_bytes: u64,
    /// Messages received (taken from the queues).
    pub received: u64,
    /// Payload bytes received.
    pub received_bytes: u64,
    /// Send commands answered with "would block" (queue full).
    pub would_block: u64,
    /// Commands or accesses that failed (bad width, offset, address, ...).
    pub errors: u64,
    /// Data bytes written past the largest message, dropped.
    pub overflow_bytes: u64,
}

/// A port-I/O channel endpoint for one VM. Register it on a port range of
/// [`PORT_COUNT`] ports (e.g. `Mutex<PortioDevice>` as a `vm_device`
/// `DevicePio`).
pub struct PortioDevice<L: Link, M: GuestMemory> {
    link: L,
    mem: M,
    peer: u32,
    max: usize,
    tx: Vec<u8>,
    rx: Vec<u8>,
    rx_len: usize,
    rx_pos: usize,
    rx_from: u32,
    rx_current: bool,
    desc_addr: u64,
    desc_len: u32,
    result: u32,
    stats: PortioStats,
}

impl<L: Link, M: GuestMemory> PortioDevice<L, M> {
    /// A device sending through `link`, with `mem` as the guest memory
    /// descriptors point into. The selected peer starts as the first other
    /// member.
    pub fn new(link: L, mem: M) -> Self {
        let max = link.max_message();
        let peer = if link.me() == 0 { 1 } else { 0 };
        Self {
            link,
            mem,
            peer,
            max,
            tx: Vec::with_capacity(max),
            rx: vec![0; max],
            rx_len: 0,
            rx_pos: 0,
            rx_from: 0,
            rx_current: false,
            desc_addr: 0,
            desc_len: 0,
            result: R_OK,
            stats: PortioStats::default(),
        }
    }

    /// Counters.
    pub fn stats(&self) -> PortioStats {
        self.stats
    }

    /// The link.
    pub fn link(&self) -> &L {
        &self.link
    }

    fn set_result(&mut self, r: u32) {
        if r != R_OK && r != R_WOULD_BLOCK {
            self.stats.errors += 1;
        }
        self.result = r;
    }

    fn link_result(&mut self, e: LinkError) -> u32 {
        match e {
            LinkError::PeerGone(_) => R_PEER_GONE,
            LinkError::BadPeer(_) => R_BAD_PEER,
            LinkError::TooLarge => R_TOO_LARGE,
            LinkError::Unreadable => R_BAD_ADDRESS,
            LinkError::Broken(p, err) => {
                log::warn!("portio: queue with member {p} is broken: {err}");
                R_BROKEN
            }
        }
    }

    /// Makes a received message current if none is. A message stays
    /// current until its last byte is read, it is received into a
    /// descriptor, or it is discarded (an empty message, which a sender may
    /// use to mark the end of a stream, only by the last two).
    fn fill_rx(&mut self) -> Result<(), LinkError> {
        if self.rx_current {
            return Ok(());
        }
        self.rx_len = 0;
        self.rx_pos = 0;
        if let Some((from, len)) = self.link.recv(&mut self.rx)? {
            self.rx_from = from;
            self.rx_len = len;
            self.rx_current = true;
            self.stats.received += 1;
            self.stats.received_bytes += len as u64;
        }
        Ok(())
    }

    fn finish_rx(&mut self) {
        self.rx_pos = self.rx_len;
        self.rx_current = false;
    }

    /// [`Self::fill_rx`], with a link error reported in RESULT; false
    /// then (no message is current).
    fn take_rx(&mut self) -> bool {
        match self.fill_rx() {
            Ok(()) => true,
            Err(e) => {
                let r = self.link_result(e);
                self.set_result(r);
                false
            }
        }
    }

    fn rx_left(&mut self) -> u32 {
        self.take_rx();
        (self.rx_len - self.rx_pos) as u32
    }

    fn status(&mut self) -> u32 {
        let mut s = 0;
        let _ = self.rx_left();
        if self.rx_current {
            s |= S_RX_READY;
        }
        match self.link.peer_state(self.peer) {
            PeerState::Present => s |= S_PEER_PRESENT,
            PeerState::Gone => s |= S_PEER_GONE,
            PeerState::Replaced => s |= S_PEER_GONE | S_PEER_NEW,
            PeerState::Absent => {}
        }
        if self.peer != self.link.me() && matches!(self.link.room(self.peer), Ok(n) if n > 0) {
            s |= S_TX_ROOM;
        }
        if self.result != R_OK {
            s |= S_ERROR;
        }
        s
    }

    fn send(&mut self, msg_from_desc: bool) {
        if self.peer == self.link.me() || self.peer >= self.link.members() {
            return self.set_result(R_BAD_PEER);
        }
        if msg_from_desc {
            return self.send_desc();
        }
        let sent = self.link.send(self.peer, &self.tx);
        if self.sent(sent, self.tx.len()) {
            self.tx.clear();
        }
    }

    /// Counts and answers the outcome of sending a `len`-byte message;
    /// returns whether it went.
    fn sent(&mut self, outcome: Result<bool, LinkError>, len: usize) -> bool {
        match outcome {
            Ok(true) => {
                self.stats.sent += 1;
                self.stats.sent_bytes += len as u64;
                self.set_result(R_OK);
                true
            }
            Ok(false) => {
                self.stats.would_block += 1;
                self.set_result(R_WOULD_BLOCK);
                false
            }
            Err(e) => {
                let r = self.link_result(e);
                self.set_result(r);
                false
            }
        }
    }

    /// [`C_SEND_DESC`]: the guest's buffer is copied once, straight into
    /// the queue to the peer. A descriptor in guest RAM drops the bytes
    /// written to [`DATA`] before it, whatever the outcome; on "would
    /// block" the guest still has its buffer and sends it again.
    fn send_desc(&mut self) {
        let (len, addr) = (self.desc_len as usize, self.desc_addr);
        if len > self.max {
            return self.set_result(R_TOO_LARGE);
        }
        // The whole range is checked before any of it is read.
        if !self
            .mem
            .check_range(GuestAddress(addr), len, vm_memory::Permissions::Read)
        {
            return self.set_result(R_BAD_ADDRESS);
        }
        self.tx.clear();
        let mem = &self.mem;
        let mut fill = |off: usize, piece: &mut [u8]| {
            piece.is_empty()
                || addr
                    .checked_add(off as u64)
                    .is_some_and(|at| mem.read_slice(piece, GuestAddress(at)).is_ok())
        };
        let sent = self.link.send_with(self.peer, len, &mut fill);
        self.sent(sent, len);
    }

    /// [`C_RECV_DESC`] with no message current: the next one goes straight
    /// from the queue into the guest's buffer, if it fits and the buffer is
    /// guest RAM. Returns whether one did; otherwise `recv_desc` takes the
    /// next message as current and answers as for any.
    fn recv_desc_in_place(&mut self) -> Result<bool, LinkError> {
        let (addr, room) = (self.desc_addr, self.desc_len as usize);
        let mem = &self.mem;
        let mut take = |_from: u32, a: &[u8], b: &[u8]| {
            let len = a.len() + b.len();
            if len > room
                || !mem.check_range(GuestAddress(addr), len, vm_memory::Permissions::Write)
            {
                return false;
            }
            // In guest RAM, checked above: the writes cannot fail half way.
            let second = addr.checked_add(a.len() as u64);
            mem.write_slice(a, GuestAddress(addr)).is_ok()
                && (b.is_empty()
                    || second.is_some_and(|at| mem.write_slice(b, GuestAddress(at)).is_ok()))
        };
        let Some((from, len)) = self.link.recv_with(&mut take)? else {
            return Ok(false);
        };
        self.stats.received += 1;
        self.stats.received_bytes += len as u64;
        self.rx_from = from;
        self.rx_len = 0;
        self.rx_pos = 0;
        self.desc_len = len as u32;
        Ok(true)
    }

    fn recv_desc(&mut self) {
        if !self.rx_current {
            match self.recv_desc_in_place() {
                Ok(true) => return self.set_result(R_OK),
                Ok(false) => {}
                Err(e) => {
                    let r = self.link_result(e);
                    return self.set_result(r);
                }
            }
        }
        if !self.take_rx() {
            return;
        }
        if !self.rx_current {
            return self.set_result(R_NO_MESSAGE);
        }
        let left = self.rx_len - self.rx_pos;
        if left > self.desc_len as usize {
            return self.set_result(R_TOO_LARGE);
        }
        let msg = &self.rx[self.rx_pos..self.rx_len];
        if self
            .mem
            .write_slice(msg, GuestAddress(self.desc_addr))
            .is_err()
        {
            return self.set_result(R_BAD_ADDRESS);
        }
        self.desc_len = left as u32;
        self.finish_rx();
        self.set_result(R_OK);
    }

    fn command(&mut self, c: u32) {
        if (C_SEND..=C_ACCEPT_PEER).contains(&c) {
            self.stats.commands[c as usize] += 1;
        }
        match c {
            C_SEND => self.send(false),
            C_SEND_DESC => self.send(true),
            C_RECV_DESC => self.recv_desc(),
            C_RESET => {
                self.tx.clear();
                self.finish_rx();
                self.set_result(R_OK);
            }
            C_DISCARD_RX => {
                if self.take_rx() {
                    self.finish_rx();
                    self.set_result(R_OK);
                }
            }
            C_ACCEPT_PEER => self.accept_peer(),
            _ => self.set_result(R_BAD_COMMAND),
        }
    }

    /// [`C_ACCEPT_PEER`]: takes the selected peer's incarnation that is
    /// there now; a message of the one before it still current here goes.
    fn accept_peer(&mut self) {
        if self.peer == self.link.me() || self.peer >= self.link.members() {
            return self.set_result(R_BAD_PEER);
        }
        match self.link.accept(self.peer) {
            Ok(true) => {
                if self.rx_current && self.rx_from == self.peer {
                    self.finish_rx();
                }
                self.set_result(R_OK);
            }
            Ok(false) => self.set_result(R_OK),
            Err(e) => {
                let r = self.link_result(e);
                self.set_result(r);
            }
        }
    }

    fn read_data(&mut self, data: &mut [u8]) {
        self.stats.data_accesses += 1;
        if !self.take_rx() {
            // No message is current (one was being fetched): RESULT says why.
            data.fill(0);
            return;
        }
        let left = self.rx_len - self.rx_pos;
        if left == 0 {
            data.fill(0);
            return self.set_result(R_NO_MESSAGE);
        }
        let n = left.min(data.len());
        data[..n].copy_from_slice(&self.rx[self.rx_pos..self.rx_pos + n]);
        data[n..].fill(0);
        self.rx_pos += n;
        if self.rx_pos == self.rx_len {
            self.rx_current = false;
        }
    }

    fn write_data(&mut self, data: &[u8]) {
        self.stats.data_accesses += 1;
        let room = self.max - self.tx.len();
        let n = room.min(data.len());
        self.tx.extend_from_slice(&data[..n]);
        if n < data.len() {
            self.stats.overflow_bytes += (data.len() - n) as u64;
            self.set_result(R_TOO_LARGE);
        }
    }

    fn read_reg(&mut self, offset: u16) -> Option<u32> {
        Some(match offset {
            STATUS => self.status(),
            RX_LEN => self.rx_left(),
            TX_SPACE => match self.link.room(self.peer) {
                Ok(n) => n as u32,
                Err(_) => 0,
            },
            PEER => self.peer,
            ME => self.link.me(),
            MEMBERS => self.link.members(),
            DESC_ADDR_LO => self.desc_addr as u32,
            DESC_ADDR_HI => (self.desc_addr >> 32) as u32,
            DESC_LEN => self.desc_len,
            RESULT => self.result,
            RX_FROM => self.rx_from,
            TX_LEN => self.tx.len() as u32,
            MAX_MESSAGE => self.max as u32,
            _ => return None,
        })
    }

    fn write_reg(&mut self, offset: u16, v: u32) -> bool {
        match offset {
            CONTROL => self.command(v),
            PEER => {
                self.peer = v;
                let ok = v != self.link.me() && v < self.link.members();
                self.set_result(if ok { R_OK } else { R_BAD_PEER });
            }
            DESC_ADDR_LO => self.desc_addr = (self.desc_addr & !0xffff_ffff) | v as u64,
            DESC_ADDR_HI => self.desc_addr = (self.desc_addr & 0xffff_ffff) | (v as u64) << 32,
            DESC_LEN => self.desc_len = v,
            _ => return false,
        }
        true
    }
}

impl<L: Link, M: GuestMemory + Send> MutDevicePio for PortioDevice<L, M> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        self.stats.accesses += 1;
        if offset == DATA {
            return self.read_data(data);
        }
        let v = match data.len() {
            4 => self.read_reg(offset),
            _ => None,
        };
        match v {
            Some(v) => data.copy_from_slice(&v.to_le_bytes()),
            None => {
                data.fill(0xff);
                self.set_result(R_BAD_ACCESS);
            }
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        self.stats.accesses += 1;
        if offset == DATA {
            return self.write_data(data);
        }
        let ok = match data {
            [a, b, c, d] => self.write_reg(offset, u32::from_le_bytes([*a, *b, *c, *d])),
            _ => false,
        };
        if !ok {
            self.set_result(R_BAD_ACCESS);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::Take;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};
    use vm_memory::GuestMemoryMmap;

    /// Queues between members in memory, two messages deep.
    #[derive(Default)]
    struct Net {
        queues: Vec<VecDeque<(u32, Vec<u8>)>>,
        gone: Vec<bool>,
    }

    struct FakeLink {
        me: u32,
        net: Arc<Mutex<Net>>,
    }

    const DEPTH: usize = 2;
    const MAX: usize = 64;

    impl Link for FakeLink {
        fn me(&self) -> u32 {
            self.me
        }
        fn members(&self) -> u32 {
            self.net.lock().unwrap().queues.len() as u32
        }
        fn max_message(&self) -> usize {
            MAX
        }
        fn peer_state(&self, peer: u32) -> PeerState {
            match self.net.lock().unwrap().gone.get(peer as usize) {
                Some(true) => PeerState::Gone,
                Some(false) => PeerState::Present,
                None => PeerState::Gone,
            }
        }
        fn room(&mut self, peer: u32) -> Result<usize, LinkError> {
            let n = self.net.lock().unwrap();
            let q = n
                .queues
                .get(peer as usize)
                .ok_or(LinkError::BadPeer(peer))?;
            Ok(if q.len() < DEPTH { MAX } else { 0 })
        }
        fn send(&mut self, peer: u32, msg: &[u8]) -> Result<bool, LinkError> {
            let mut n = self.net.lock().unwrap();
            if n.gone.get(peer as usize) == Some(&true) {
                return Err(LinkError::PeerGone(peer));
            }
            let q = n
                .queues
                .get_mut(peer as usize)
                .ok_or(LinkError::BadPeer(peer))?;
            if q.len() >= DEPTH {
                return Ok(false);
            }
            q.push_back((self.me, msg.to_vec()));
            Ok(true)
        }
        fn recv(&mut self, buf: &mut [u8]) -> Result<Option<(u32, usize)>, LinkError> {
            let mut n = self.net.lock().unwrap();
            Ok(n.queues[self.me as usize].pop_front().map(|(from, m)| {
                buf[..m.len()].copy_from_slice(&m);
                (from, m.len())
            }))
        }
        fn recv_with(&mut self, take: Take<'_>) -> Result<Option<(u32, usize)>, LinkError> {
            let mut n = self.net.lock().unwrap();
            let q = &mut n.queues[self.me as usize];
            let Some((from, m)) = q.front() else {
                return Ok(None);
            };
            // Offered in two pieces, as a ring that wraps would.
            let (a, b) = m.split_at(m.len() / 2);
            if !take(*from, a, b) {
                return Ok(None);
            }
            let (from, m) = (*from, m.len());
            q.pop_front();
            Ok(Some((from, m)))
        }
    }

    type Dev = PortioDevice<FakeLink, GuestMemoryMmap>;

    /// Three members; guest RAM at 0..1 MiB and 2..3 MiB (a hole between).
    fn devices() -> (Vec<Dev>, Arc<Mutex<Net>>) {
        let net = Arc::new(Mutex::new(Net {
            queues: vec![VecDeque::new(); 3],
            gone: vec![false; 3],
        }));
        let devs = (0..3)
            .map(|me| {
                let mem = GuestMemoryMmap::<()>::from_ranges(&[
                    (GuestAddress(0), 1 << 20),
                    (GuestAddress(2 << 20), 1 << 20),
                ])
                .unwrap();
                PortioDevice::new(
                    FakeLink {
                        me,
                        net: net.clone(),
                    },
                    mem,
                )
            })
            .collect();
        (devs, net)
    }

    fn rd(d: &mut Dev, off: u16) -> u32 {
        let mut b = [0u8; 4];
        d.pio_read(PioAddress(0x5000), off, &mut b);
        u32::from_le_bytes(b)
    }

    fn wr(d: &mut Dev, off: u16, v: u32) {
        d.pio_write(PioAddress(0x5000), off, &v.to_le_bytes());
    }

    #[test]
    fn messages_keep_their_boundaries_at_every_width() {
        let (mut d, _) = devices();
        let (a, rest) = d.split_at_mut(1);
        let (a, b) = (&mut a[0], &mut rest[0]);
        // 7 bytes as a dword, a word and a byte; then a 3-byte message.
        a.pio_write(PioAddress(0), DATA, &[1, 2, 3, 4]);
        a.pio_write(PioAddress(0), DATA, &[5, 6]);
        a.pio_write(PioAddress(0), DATA, &[7]);
        assert_eq!(rd(a, TX_LEN), 7);
        wr(a, CONTROL, C_SEND);
        assert_eq!(rd(a, RESULT), R_OK);
        a.pio_write(PioAddress(0), DATA, &[8, 9, 10]);
        wr(a, CONTROL, C_SEND);
        assert_eq!(rd(b, RX_LEN), 7);
        assert_eq!(rd(b, RX_FROM), 0);
        let mut w = [0u8; 4];
        b.pio_read(PioAddress(0), DATA, &mut w);
        assert_eq!(w, [1, 2, 3, 4]);
        b.pio_read(PioAddress(0), DATA, &mut w);
        assert_eq!(
            w,
            [5, 6, 7, 0],
            "bytes past the end of a message read as zero"
        );
        assert_eq!(rd(b, RX_LEN), 3, "the next message is separate");
        let mut one = [0u8; 1];
        for want in [8, 9, 10] {
            b.pio_read(PioAddress(0), DATA, &mut one);
            assert_eq!(one[0], want);
        }
        assert_eq!(rd(b, RX_LEN), 0);
        b.pio_read(PioAddress(0), DATA, &mut w);
        assert_eq!((w, rd(b, RESULT)), ([0; 4], R_NO_MESSAGE));
    }

    #[test]
    fn an_empty_message_is_seen_and_must_be_discarded() {
        let (mut d, _) = devices();
        wr(&mut d[0], CONTROL, C_SEND);
        d[0].pio_write(PioAddress(0), DATA, &[9]);
        wr(&mut d[0], CONTROL, C_SEND);
        assert_eq!(rd(&mut d[1], RX_LEN), 0);
        assert_ne!(
            rd(&mut d[1], STATUS) & S_RX_READY,
            0,
            "an empty message is current"
        );
        assert_eq!(
            rd(&mut d[1], RX_LEN),
            0,
            "and does not fall through to the next"
        );
        wr(&mut d[1], CONTROL, C_DISCARD_RX);
        assert_eq!(rd(&mut d[1], RX_LEN), 1);
    }

    #[test]
    fn a_full_queue_blocks_without_dropping() {
        let (mut d, _) = devices();
        for i in 0..DEPTH as u8 {
            d[0].pio_write(PioAddress(0), DATA, &[i]);
            wr(&mut d[0], CONTROL, C_SEND);
            assert_eq!(rd(&mut d[0], RESULT), R_OK);
        }
        assert_eq!(rd(&mut d[0], STATUS) & S_TX_ROOM, 0);
        assert_eq!(rd(&mut d[0], TX_SPACE), 0);
        d[0].pio_write(PioAddress(0), DATA, &[99]);
        wr(&mut d[0], CONTROL, C_SEND);
        assert_eq!(rd(&mut d[0], RESULT), R_WOULD_BLOCK);
        assert_eq!(rd(&mut d[0], TX_LEN), 1, "the message is still pending");
        wr(&mut d[1], CONTROL, C_DISCARD_RX);
        wr(&mut d[0], CONTROL, C_SEND);
        assert_eq!(rd(&mut d[0], RESULT), R_OK);
        assert_eq!(d[0].stats().would_block, 1);
        assert_eq!(d[0].stats().sent, 3);
        assert_eq!(d[0].stats().commands[C_SEND as usize], 4);
        assert_eq!(d[1].stats().commands[C_DISCARD_RX as usize], 1);
    }

    #[test]
    fn peer_selection_reaches_the_third_member() {
        let (mut d, _) = devices();
        wr(&mut d[0], PEER, 2);
        assert_eq!(rd(&mut d[0], RESULT), R_OK);
        d[0].pio_write(PioAddress(0), DATA, &[42]);
        wr(&mut d[0], CONTROL, C_SEND);
        assert_eq!(rd(&mut d[1], RX_LEN), 0);
        assert_eq!(rd(&mut d[2], RX_LEN), 1);
        assert_eq!(rd(&mut d[2], RX_FROM), 0);
        for bad in [0, 3, u32::MAX] {
            wr(&mut d[0], PEER, bad);
            assert_eq!(rd(&mut d[0], RESULT), R_BAD_PEER, "peer {bad}");
            wr(&mut d[0], CONTROL, C_SEND);
            assert_eq!(rd(&mut d[0], RESULT), R_BAD_PEER);
        }
        assert_eq!((rd(&mut d[2], ME), rd(&mut d[2], MEMBERS)), (2, 3));
    }

    #[test]
    fn descriptors_move_whole_buffers_and_are_bounds_checked() {
        let (mut d, _) = devices();
        let msg: Vec<u8> = (0..MAX as u8).collect();
        d[0].mem.write_slice(&msg, GuestAddress(0x1000)).unwrap();
        wr(&mut d[0], DESC_ADDR_LO, 0x1000);
        wr(&mut d[0], DESC_ADDR_HI, 0);
        wr(&mut d[0], DESC_LEN, MAX as u32);
        wr(&mut d[0], CONTROL, C_SEND_DESC);
        assert_eq!(rd(&mut d[0], RESULT), R_OK);
        // Receive into a buffer in the second RAM range.
        wr(&mut d[1], DESC_ADDR_LO, (2 << 20) + 8);
        wr(&mut d[1], DESC_LEN, 10);
        wr(&mut d[1], CONTROL, C_RECV_DESC);
        assert_eq!(
            rd(&mut d[1], RESULT),
            R_TOO_LARGE,
            "buffer smaller than the message"
        );
        wr(&mut d[1], DESC_LEN, 4096);
        wr(&mut d[1], CONTROL, C_RECV_DESC);
        assert_eq!(rd(&mut d[1], RESULT), R_OK);
        assert_eq!(rd(&mut d[1], DESC_LEN), MAX as u32);
        let mut back = vec![0u8; MAX];
        d[1].mem
            .read_slice(&mut back, GuestAddress((2 << 20) + 8))
            .unwrap();
        assert_eq!(back, msg);
        wr(&mut d[1], CONTROL, C_RECV_DESC);
        assert_eq!(rd(&mut d[1], RESULT), R_NO_MESSAGE);
        // Hostile descriptors: in the hole, across the end of RAM, past
        // 4 GiB, longer than a message.
        for (addr, len, want) in [
            ((1u64 << 20) + 16, 8u32, R_BAD_ADDRESS),
            ((3u64 << 20) - 4, 8, R_BAD_ADDRESS),
            (0xffff_ffff_ffff_fff0, 32, R_BAD_ADDRESS),
            (0x1000, MAX as u32 + 1, R_TOO_LARGE),
            (0x1000, u32::MAX, R_TOO_LARGE),
        ] {
            wr(&mut d[0], DESC_ADDR_LO, addr as u32);
            wr(&mut d[0], DESC_ADDR_HI, (addr >> 32) as u32);
            wr(&mut d[0], DESC_LEN, len);
            wr(&mut d[0], CONTROL, C_SEND_DESC);
            assert_eq!(rd(&mut d[0], RESULT), want, "addr {addr:#x} len {len}");
            wr(&mut d[1], DESC_ADDR_LO, addr as u32);
            wr(&mut d[1], DESC_ADDR_HI, (addr >> 32) as u32);
            wr(&mut d[1], DESC_LEN, len);
        }
        assert_eq!(rd(&mut d[1], RX_LEN), 0, "nothing bad was sent");
        // A receive into the hole leaves the message for a good buffer.
        d[0].pio_write(PioAddress(0), DATA, &[1, 2]);
        wr(&mut d[0], CONTROL, C_SEND);
        wr(&mut d[1], DESC_ADDR_LO, (1 << 20) + 16);
        wr(&mut d[1], DESC_LEN, 64);
        wr(&mut d[1], CONTROL, C_RECV_DESC);
        assert_eq!(rd(&mut d[1], RESULT), R_BAD_ADDRESS);
        assert_eq!(rd(&mut d[1], RX_LEN), 2);
    }

    #[test]
    fn hostile_widths_offsets_commands_and_overflow_are_contained() {
        let (mut d, _) = devices();
        let dev = &mut d[0];
        let mut b2 = [0u8; 2];
        dev.pio_read(PioAddress(0), STATUS, &mut b2);
        assert_eq!(b2, [0xff, 0xff]);
        assert_eq!(rd(dev, RESULT), R_BAD_ACCESS);
        dev.pio_write(PioAddress(0), CONTROL, &[1]);
        assert_eq!(rd(dev, RESULT), R_BAD_ACCESS);
        for off in [0x3c, 0x3f, 0x40, 0xffff, 0x02] {
            assert_eq!(rd(dev, off), u32::MAX, "offset {off:#x}");
            wr(dev, off, 1);
        }
        wr(dev, CONTROL, 77);
        assert_eq!(rd(dev, RESULT), R_BAD_COMMAND);
        wr(dev, CONTROL, 0);
        assert_eq!(rd(dev, RESULT), R_BAD_COMMAND);
        assert_eq!(dev.stats().commands, [0; COMMAND_SLOTS], "not commands");
        // Writing more than a message holds: the extra bytes are dropped
        // and counted, and the send still carries a full message.
        for _ in 0..MAX / 4 + 3 {
            dev.pio_write(PioAddress(0), DATA, &[7; 4]);
        }
        assert_eq!(rd(dev, RESULT), R_TOO_LARGE);
        assert_eq!(rd(dev, TX_LEN), MAX as u32);
        assert_eq!(dev.stats().overflow_bytes, 12);
        wr(dev, CONTROL, C_RESET);
        assert_eq!(rd(dev, TX_LEN), 0);
        assert!(dev.stats().errors >= 9);
    }

    #[test]
    fn a_gone_peer_is_reported_not_waited_for() {
        let (mut d, net) = devices();
        assert_ne!(rd(&mut d[0], STATUS) & S_PEER_PRESENT, 0);
        // A message already queued by the peer survives its departure.
        d[1].pio_write(PioAddress(0), DATA, &[5]);
        wr(&mut d[1], CONTROL, C_SEND);
        net.lock().unwrap().gone[1] = true;
        let s = rd(&mut d[0], STATUS);
        assert_ne!(s & S_PEER_GONE, 0);
        assert_ne!(s & S_RX_READY, 0);
        d[0].pio_write(PioAddress(0), DATA, &[1, 2, 3, 4]);
        wr(&mut d[0], CONTROL, C_SEND);
        assert_eq!(rd(&mut d[0], RESULT), R_PEER_GONE);
        assert_eq!(rd(&mut d[0], RX_LEN), 1);
    }

    #[test]
    fn a_corrupt_queue_found_by_a_data_read_or_a_discard_is_reported_broken() {
        use crate::link::RingLink;
        use intervm_protocol::ring::RING_HEADER_BYTES;
        use shared_region::{Backing, SharedRegion, Transport};
        for discard in [false, true] {
            let t = Transport::attach(
                Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).unwrap()),
                2,
            )
            .unwrap();
            let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
            let mut a = PortioDevice::new(RingLink::join(&t, 0).unwrap(), mem);
            let mut b = RingLink::join(&t, 1).unwrap();
            assert!(b.send(0, b"doomed").unwrap());
            // b's VMM (or a bug there) rewrites the frame's length.
            let at = t.ring_region().ring_offset(&t.geometry(), 1, 0).unwrap() + RING_HEADER_BYTES;
            // SAFETY: the first frame's length word, inside the 1 MiB
            // region `t` keeps mapped, 8-byte aligned.
            unsafe {
                t.region()
                    .host_addr()
                    .add(at as usize)
                    .cast::<u32>()
                    .write_volatile(u32::MAX)
            };
            let mut w = [9u8; 4];
            if discard {
                a.pio_write(PioAddress(0), CONTROL, &C_DISCARD_RX.to_le_bytes());
            } else {
                a.pio_read(PioAddress(0), DATA, &mut w);
                assert_eq!(w, [0; 4]);
            }
            let mut r = [0u8; 4];
            a.pio_read(PioAddress(0), RESULT, &mut r);
            assert_eq!(u32::from_le_bytes(r), R_BROKEN, "discard: {discard}");
        }
    }

    #[test]
    fn a_restarted_peer_shows_new_and_its_old_message_goes_with_the_accept() {
        use crate::link::RingLink;
        use shared_region::{Backing, SharedRegion, Transport};
        let t = Transport::attach(
            Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).unwrap()),
            2,
        )
        .unwrap();
        let mem = || GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mut a = PortioDevice::new(RingLink::join(&t, 0).unwrap(), mem());
        let mut b1 = RingLink::join(&t, 1).unwrap();
        let rd = |d: &mut PortioDevice<RingLink, GuestMemoryMmap>, off: u16| {
            let mut v = [0u8; 4];
            d.pio_read(PioAddress(0), off, &mut v);
            u32::from_le_bytes(v)
        };
        assert_ne!(rd(&mut a, STATUS) & S_PEER_PRESENT, 0);
        assert!(b1.send(0, b"old").unwrap());
        // Made current (partly read), then b restarts.
        assert_eq!(rd(&mut a, RX_LEN), 3);
        drop(b1);
        let mut b2 = RingLink::join(&t, 1).unwrap();
        assert!(b2.send(0, b"new!").unwrap());
        let s = rd(&mut a, STATUS);
        assert_eq!(
            s & (S_PEER_GONE | S_PEER_NEW),
            S_PEER_GONE | S_PEER_NEW,
            "{s:#x}"
        );
        assert_eq!(s & S_PEER_PRESENT, 0);
        // Sends to the gone incarnation fail; the accept takes the new one.
        a.pio_write(PioAddress(0), DATA, &[1]);
        a.pio_write(PioAddress(0), CONTROL, &C_SEND.to_le_bytes());
        assert_eq!(rd(&mut a, RESULT), R_PEER_GONE);
        a.pio_write(PioAddress(0), CONTROL, &C_ACCEPT_PEER.to_le_bytes());
        assert_eq!(rd(&mut a, RESULT), R_OK);
        let s = rd(&mut a, STATUS);
        assert_eq!(s & (S_PEER_PRESENT | S_PEER_NEW), S_PEER_PRESENT, "{s:#x}");
        // The old incarnation's current message went; the new one's comes.
        assert_eq!(rd(&mut a, RX_LEN), 4);
        let mut w = [0u8; 4];
        a.pio_read(PioAddress(0), DATA, &mut w);
        assert_eq!(&w, b"new!");
        assert_eq!(a.stats().commands[C_ACCEPT_PEER as usize], 1);
    }
}
