//! `IvshmemDoorbell`: QEMU's `ivshmem-doorbell` guest interface.
//!
//! BAR0: Interrupt Mask (0), Interrupt Status (4, cleared on read),
//! IVPosition (8, this member's peer ID), Doorbell (12, write
//! `peer << 16 | vector`). BAR1: MSI-X table and PBA. BAR2: the shared
//! region. INTx (pin A) is used while the guest has not enabled MSI-X.
//!
//! A doorbell write signals the peer's eventfd for that vector. With the
//! fast path on, every known (peer, vector) is also an `ioeventfd` with
//! datamatch on the Doorbell register, so KVM signals the eventfd without
//! leaving the kernel; the peer's eventfd is its `irqfd`, so the interrupt
//! is injected without the peer's VMM either. The register handler below
//! is the fallback, used when the fast path is off or not registered.

use std::collections::{HashMap, HashSet};
use std::ops::Range;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use kvm_ioctls::{IoEventAddress, VmFd};
use shared_region::SharedRegion;
use vmm_core::events::{EventOps, Events, LoopHandle, MutEventSubscriber, SubscriberId};
use vmm_core::irq::{poll_readable, IntxLine, KvmMsiVectors, MsiVectors};
use vmm_core::pci::{BarKind, BarMemory, BarSpec, Msix, PciConfiguration, PciDevice, PciIds};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::{Error, Result};

pub use intervm_protocol::ivshmem::{
    DOORBELL, INTR_MASK, INTR_STATUS, IV_POSITION, MSIX_BAR, REGS_BAR, REGS_SIZE, SHM_BAR,
};
/// BAR1 size (MSI-X table at 0, PBA at 0x800).
pub const MSIX_BAR_SIZE: u64 = 4096;
const PBA_OFFSET: u64 = 0x800;
/// Most vectors a device offers (the table must fit below the PBA).
pub const MAX_VECTORS: usize = 64;

/// The ivshmem identity (the same as the plain personality's, from
/// [`intervm_protocol::ivshmem`]; this crate does not depend on
/// `shmem-device`).
fn ivshmem_ids() -> PciIds {
    use intervm_protocol::ivshmem as iv;
    PciIds {
        vendor: iv::VENDOR,
        device: iv::DEVICE,
        subsystem_vendor: iv::SUBSYSTEM_VENDOR,
        subsystem: iv::SUBSYSTEM,
        revision: iv::REVISION,
        class: iv::CLASS,
    }
}

/// Counters of what guests did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DoorbellStats {
    /// Doorbells handled by the VMM (the fallback path).
    pub rung: u64,
    /// Doorbells for an absent peer or vector, dropped.
    pub dropped: u64,
    /// Register accesses of a bad width or offset, ignored.
    pub bad_access: u64,
    /// Interrupts delivered through INTx.
    pub intx: u64,
    /// Doorbells whose peer eventfd was full (counted in `rung` too): the
    /// peer had rings pending, so nothing was lost.
    pub saturated: u64,
}

/// Where doorbell writes can be turned into eventfd signals inside the
/// kernel: KVM's `ioeventfd` on a VM (see [`KvmIoEvents`]), or a fake in
/// tests. The device registers one (address, datamatch) per peer and
/// vector on the Doorbell register while BAR0 is placed.
pub trait IoEvents: Send {
    /// Signals `evt` when the guest writes `data` (32 bits) at `addr`.
    fn register(&self, evt: &EventFd, addr: u64, data: u32) -> std::io::Result<()>;
    /// Undoes [`IoEvents::register`].
    fn unregister(&self, evt: &EventFd, addr: u64, data: u32) -> std::io::Result<()>;
}

/// [`IoEvents`] of a KVM VM: MMIO ioeventfds with datamatch.
pub struct KvmIoEvents(
    /// The VM the ioeventfds are registered with.
    pub Arc<VmFd>,
);

impl IoEvents for KvmIoEvents {
    fn register(&self, evt: &EventFd, addr: u64, data: u32) -> std::io::Result<()> {
        self.0
            .register_ioevent(evt, &IoEventAddress::Mmio(addr), data)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
    fn unregister(&self, evt: &EventFd, addr: u64, data: u32) -> std::io::Result<()> {
        self.0
            .unregister_ioevent(evt, &IoEventAddress::Mmio(addr), data)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// Most doorbells to unknown peers a device holds after a rejoin (see
/// [`IvshmemDoorbell::rejoined`]); a guest ringing more is not stored.
pub const MAX_HELD: usize = 4096;

/// One member's ivshmem-doorbell device.
pub struct IvshmemDoorbell {
    config: PciConfiguration,
    msix: Msix,
    region: Arc<SharedRegion>,
    id: u16,
    vectors: usize,
    intr_mask: u32,
    intr_status: u32,
    intx: Option<Box<dyn IntxLine>>,
    peers: HashMap<u16, Vec<EventFd>>,
    /// The in-kernel fast path (`None`: every doorbell through the VMM).
    ioevent_sink: Option<Box<dyn IoEvents>>,
    bar0: Option<u64>,
    ioevents: Vec<(u64, u32, EventFd)>,
    own: Vec<EventFd>,
    /// The receive eventfds `own` replaced at the last rejoin: peers that
    /// have not rejoined yet still ring them (see
    /// [`IvshmemDoorbell::rejoined`]).
    previous_own: Vec<EventFd>,
    /// After a rejoin: doorbells to a peer ID or vector not (yet) known,
    /// held to be delivered if it comes (see [`IvshmemDoorbell::rejoined`]).
    held: Option<HashSet<(u16, usize)>>,
    stats: DoorbellStats,
    stop: Arc<AtomicBool>,
    /// Whether the guest uses INTx, for the watcher. It reads this flag
    /// instead of locking the device, so it never holds the device alive
    /// (or waits on its lock) while the guest uses MSI-X.
    intx_on: Arc<AtomicBool>,
    /// Written when the INTx watcher should look again: the guest may have
    /// switched between MSI-X and INTx, or the device is going away.
    mode_changed: EventFd,
    /// Bumped when the receive eventfds change ([`IvshmemDoorbell::rejoined`]).
    generation: Arc<AtomicU64>,
    /// The INTx watcher in the VM's event loop, taken out when the device
    /// goes (devices from [`IvshmemDoorbell::with_parts`] have none).
    watcher: Option<(LoopHandle, SubscriberId)>,
    /// Pieces of the region the guest may only read.
    read_only: Vec<Range<u64>>,
}

impl IvshmemDoorbell {
    /// A device for peer `id` exposing `region` in VM `vm`, raising its
    /// `own.len()` vectors from the eventfds in `own` (peers write to
    /// clones of them) through KVM irqfds. `fast_path` registers
    /// ioeventfds for doorbells.
    pub fn new(
        vm: &vmm_core::Vm,
        region: Arc<SharedRegion>,
        id: u16,
        own: Vec<EventFd>,
        fast_path: bool,
    ) -> Result<Arc<Mutex<Self>>> {
        check_vectors(own.len())?;
        let clones = own.iter().map(dup_eventfd).collect::<Result<Vec<_>>>()?;
        let vecs = KvmMsiVectors::from_eventfds(vm.gsi_router().clone(), clones)
            .map_err(Error::Vectors)?;
        let ioevents: Option<Box<dyn IoEvents>> =
            fast_path.then(|| Box::new(KvmIoEvents(vm.fd().clone())) as Box<dyn IoEvents>);
        let dev = Self::with_parts(region, id, own, Box::new(vecs), ioevents)?;
        let watcher = Box::new(Self::intx_watcher(&dev)?);
        let sub = vm.events().add(watcher).map_err(Error::Events)?;
        dev.lock().map_err(|_| Error::Poisoned)?.watcher = Some((vm.events().handle(), sub));
        Ok(dev)
    }

    /// A device from its capabilities, for a VMM other than vmm-core's or
    /// for tests: `vectors` delivers MSI-X vector `i` when `own[i]` is
    /// signalled (KVM irqfds in [`IvshmemDoorbell::new`]); `ioevents`, if
    /// any, is where doorbells to known peers are registered to be
    /// signalled in the kernel (otherwise the register handler signals
    /// them).
    pub fn with_parts(
        region: Arc<SharedRegion>,
        id: u16,
        own: Vec<EventFd>,
        vectors: Box<dyn MsiVectors>,
        ioevents: Option<Box<dyn IoEvents>>,
    ) -> Result<Arc<Mutex<Self>>> {
        let vectors_n = own.len();
        check_vectors(vectors_n)?;
        if vectors.len() != vectors_n {
            return Err(Error::Config(format!(
                "{} MSI vectors for {vectors_n} eventfds",
                vectors.len()
            )));
        }
        let mut config = PciConfiguration::new(ivshmem_ids(), 1);
        let bars = [
            (REGS_BAR, BarKind::Mem32, REGS_SIZE),
            (MSIX_BAR, BarKind::Mem32, MSIX_BAR_SIZE),
            (
                SHM_BAR,
                BarKind::Mem64 { prefetchable: true },
                region.size(),
            ),
        ];
        for (i, kind, size) in bars {
            config.add_bar(i, BarSpec { kind, size }).ok_or_else(|| {
                Error::Config(format!(
                    "no room for BAR{i} of {size} bytes in the device's config space"
                ))
            })?;
        }
        // A member may ring itself (as with QEMU's server, whose own-ID
        // notices make this member its own peer).
        let mut self_ring = Vec::with_capacity(vectors_n);
        for e in &own {
            self_ring.push(dup_eventfd(e)?);
        }
        let msix = Msix::new(&mut config, vectors, 1, 0, PBA_OFFSET as u32).ok_or_else(|| {
            Error::Config("no room for the MSI-X capability in the device's config space".into())
        })?;
        let dev = Arc::new(Mutex::new(Self {
            config,
            msix,
            region,
            id,
            vectors: vectors_n,
            intr_mask: 0,
            intr_status: 0,
            intx: None,
            peers: HashMap::from([(id, self_ring)]),
            ioevent_sink: ioevents,
            bar0: None,
            ioevents: Vec::new(),
            own,
            previous_own: Vec::new(),
            held: None,
            stats: DoorbellStats::default(),
            stop: Arc::new(AtomicBool::new(false)),
            intx_on: Arc::new(AtomicBool::new(false)),
            mode_changed: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(|e| Error::Io("creating an eventfd".into(), e))?,
            watcher: None,
            read_only: Vec::new(),
            generation: Arc::new(AtomicU64::new(0)),
        }));
        Ok(dev)
    }

    /// Makes the `read_only` pieces of the region (offsets into it, widened
    /// to pages) read-only to the guest: its writes there exit and are
    /// dropped. A VMM passes the parts of the ring layout other members
    /// write (`Transport::guest_read_only`). Takes effect when the guest
    /// next maps BAR2 (set it before the guest runs).
    pub fn set_guest_read_only(&mut self, read_only: Vec<Range<u64>>) {
        self.read_only = read_only;
    }

    /// The shared memory behind BAR2.
    pub fn region(&self) -> &Arc<SharedRegion> {
        &self.region
    }

    /// This member's peer ID.
    pub fn id(&self) -> u16 {
        self.id
    }

    /// Vectors.
    pub fn vectors(&self) -> usize {
        self.vectors
    }

    /// Counters.
    pub fn stats(&self) -> DoorbellStats {
        self.stats
    }

    /// Clones of this member's receive eventfds, for peers to write to.
    pub fn own_eventfds(&self) -> Result<Vec<EventFd>> {
        self.own.iter().map(dup_eventfd).collect()
    }

    /// Peer `id` can now be rung on `evts.len()` vectors.
    pub fn add_peer(&mut self, id: u16, evts: Vec<EventFd>) {
        if let Some(held) = self.held.as_mut() {
            held.retain(|&(p, v)| match evts.get(v) {
                Some(e) if p == id => {
                    let _ = e.write(1);
                    false
                }
                _ => true,
            });
        }
        self.peers.insert(id, evts);
        self.register_ioevents();
    }

    /// Peer `id` left: its doorbells are dropped from now on, and this
    /// member's guest is woken (vector 0) so that a guest sleeping until
    /// that peer rings looks again and sees it gone instead of sleeping
    /// forever.
    pub fn remove_peer(&mut self, id: u16) {
        if self.peers.remove(&id).is_some() {
            self.register_ioevents();
            self.wake();
        }
    }

    /// Rings this member's own vector 0, so that its guest looks at the
    /// region again: after a peer left, or after the host marked a peer
    /// whose heartbeat stopped as gone.
    pub fn wake(&self) {
        if let Some(e) = self.own.first() {
            let _ = e.write(1);
        }
    }

    /// This member joined a restarted ivshmem server again, as `id`:
    /// doorbells to it now arrive on `own` (vector `i` moves to `own[i]`
    /// in KVM's irqfds and for the INTx watcher; a server with fewer
    /// vectors leaves the rest as they were), and `peers` are the members
    /// there now, with new IDs.
    ///
    /// Peers rejoin one by one, and no doorbell may be lost meanwhile:
    /// - peers not back yet still ring the eventfds this member had: those
    ///   keep raising its vectors until the next rejoin;
    /// - from now on a doorbell to a peer ID (or vector) this member does
    ///   not know is held, up to [`MAX_HELD`] of them, and delivered if
    ///   that peer comes (it may be one that has not rejoined yet);
    /// - a guest may still ring by an ID that is no longer right (its peer
    ///   has not seen or published the new one yet): call
    ///   [`IvshmemDoorbell::wake_all`] once the new ID is published, so
    ///   that this guest and every peer known now look at the region
    ///   again.
    ///
    /// Those are spurious interrupts at worst (vector 0). The guest reads
    /// its new ID from IVPosition.
    pub fn rejoined(
        &mut self,
        id: u16,
        own: Vec<EventFd>,
        peers: HashMap<u16, Vec<EventFd>>,
    ) -> Result<()> {
        if own.is_empty() || own.len() > self.own.len() {
            return Err(Error::Rejoin(format!(
                "{} eventfds for a device of {} vectors",
                own.len(),
                self.own.len()
            )));
        }
        let mut previous = Vec::with_capacity(own.len());
        for (i, e) in own.into_iter().enumerate() {
            self.msix
                .vectors_mut()
                .replace_eventfd(i, dup_eventfd(&e)?)
                .map_err(Error::Rejoin)?;
            previous.push(std::mem::replace(&mut self.own[i], e));
        }
        self.previous_own = previous;
        let self_ring = self
            .own
            .iter()
            .map(dup_eventfd)
            .collect::<Result<Vec<_>>>()?;
        self.peers = peers;
        self.peers.insert(id, self_ring);
        self.id = id;
        self.held = Some(HashSet::new());
        self.register_ioevents();
        // The INTx watcher takes the new eventfds.
        self.generation.fetch_add(1, Ordering::AcqRel);
        let _ = self.mode_changed.write(1);
        Ok(())
    }

    /// Rings vector 0 of this member and of every peer it knows, so that
    /// all of them look at the region again (after
    /// [`IvshmemDoorbell::rejoined`]).
    pub fn wake_all(&self) {
        for evts in self.peers.values() {
            if let Some(e) = evts.first() {
                let _ = e.write(1);
            }
        }
    }

    /// The eventfds the INTx watcher watches: this member's receive
    /// eventfds and those they replaced.
    fn watched_eventfds(&self) -> Result<Vec<EventFd>> {
        self.own
            .iter()
            .chain(&self.previous_own)
            .map(dup_eventfd)
            .collect()
    }

    /// Other peers that can be rung (this member can always ring itself).
    pub fn peers(&self) -> Vec<u16> {
        let mut v: Vec<u16> = self
            .peers
            .keys()
            .copied()
            .filter(|p| *p != self.id)
            .collect();
        v.sort();
        v
    }

    fn unregister_ioevents(&mut self) {
        let Some(sink) = &self.ioevent_sink else {
            return;
        };
        for (addr, data, evt) in self.ioevents.drain(..) {
            if let Err(e) = sink.unregister(&evt, addr, data) {
                log::warn!("ivshmem: unregistering a doorbell ioeventfd: {e}");
            }
        }
    }

    fn register_ioevents(&mut self) {
        self.unregister_ioevents();
        let (Some(bar0), Some(sink)) = (self.bar0, &self.ioevent_sink) else {
            return;
        };
        let addr = bar0 + DOORBELL;
        for (&peer, evts) in &self.peers {
            for (v, evt) in evts.iter().enumerate() {
                let data = intervm_protocol::ivshmem::doorbell(peer, v as u16);
                let Ok(evt) = evt.try_clone() else { continue };
                match sink.register(&evt, addr, data) {
                    Ok(()) => self.ioevents.push((addr, data, evt)),
                    Err(e) => log::warn!(
                        "ivshmem: no in-kernel doorbell for peer {peer} vector {v} ({e}); using the VMM path"
                    ),
                }
            }
        }
    }

    fn ring(&mut self, v: u32) {
        let (peer, vector) = intervm_protocol::ivshmem::doorbell_target(v);
        let vector = vector as usize;
        match self.peers.get(&peer).and_then(|e| e.get(vector)) {
            Some(evt) => {
                self.stats.rung += 1;
                match evt.write(1) {
                    Ok(()) => {}
                    // Its counter is full: the peer has rings pending anyway.
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                        self.stats.saturated += 1
                    }
                    Err(e) => log::warn!("ivshmem: doorbell to peer {peer}: {e}"),
                }
            }
            None => {
                self.stats.dropped += 1;
                if let Some(held) = self.held.as_mut() {
                    if held.len() < MAX_HELD {
                        held.insert((peer, vector));
                    }
                }
            }
        }
    }

    fn update_intx(&mut self) {
        if let Some(l) = &self.intx {
            l.set_level(self.intr_status & self.intr_mask != 0);
        }
    }

    /// The guest takes interrupts through INTx: MSI-X is off and it
    /// unmasked the Interrupt Mask. Until it picks MSI-X or INTx, rings stay
    /// pending in the eventfds (and are delivered by whichever it picks).
    fn uses_intx(&self) -> bool {
        !self.msix.enabled() && self.intr_mask != 0
    }

    /// Wakes the INTx watcher if the guest switched between INTx and MSI-X.
    fn intx_mode_check(&self, before: bool) {
        let now = self.uses_intx();
        if now != before {
            self.intx_on.store(now, Ordering::Release);
            let _ = self.mode_changed.write(1);
        }
    }

    /// Called by the watcher: an interrupt arrived while the guest uses INTx.
    fn intx_event(&mut self) -> bool {
        if !self.uses_intx() {
            return false;
        }
        let mut any = false;
        for e in self.own.iter().chain(&self.previous_own) {
            if poll_readable(e) {
                let _ = e.read();
                any = true;
            }
        }
        if any {
            self.stats.intx += 1;
            self.intr_status |= 1;
            self.update_intx();
        }
        any
    }
}

/// While the guest uses INTx, turns signals on the device's receive
/// eventfds into Interrupt Status + INTx (with MSI-X on, KVM's irqfds
/// consume them instead). An event-loop subscriber
/// ([`vmm_core::events`]): it always watches the device's mode-change
/// eventfd, and the receive eventfds only while the guest uses INTx.
///
/// [`IvshmemDoorbell::new`] puts one into the VM's event loop; a VMM that
/// builds the device with [`IvshmemDoorbell::with_parts`] and wants INTx
/// puts [`IvshmemDoorbell::intx_watcher`] into its own `event-manager`.
pub struct IntxWatcher {
    /// Only an INTx signal takes a (short-lived) strong reference: a
    /// device dropped by its owner is dropped there, with its ioeventfds.
    dev: Weak<Mutex<IvshmemDoorbell>>,
    stop: Arc<AtomicBool>,
    intx_on: Arc<AtomicBool>,
    wake: EventFd,
    own: Vec<EventFd>,
    watching: bool,
    generation: Arc<AtomicU64>,
    /// The generation `own` is from.
    seen: u64,
}

impl IntxWatcher {
    fn watch_own(&mut self, on: bool, ops: &mut EventOps) {
        if on == self.watching {
            return;
        }
        for e in &self.own {
            let ev = Events::new(e, EventSet::IN);
            let r = if on { ops.add(ev) } else { ops.remove(ev) };
            if let Err(e) = r {
                log::warn!("ivshmem: INTx watcher: {e}");
            }
        }
        self.watching = on;
    }

    /// The device is gone or unusable: watch nothing more.
    fn retire(&mut self, ops: &mut EventOps) {
        self.watch_own(false, ops);
        let _ = ops.remove(Events::new(&self.wake, EventSet::IN));
    }
}

impl MutEventSubscriber for IntxWatcher {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new(&self.wake, EventSet::IN)) {
            log::warn!("ivshmem: INTx watcher: {e}");
        }
        self.watch_own(self.intx_on.load(Ordering::Acquire), ops);
    }

    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if self.stop.load(Ordering::Acquire) {
            return self.retire(ops);
        }
        let intx = self.intx_on.load(Ordering::Acquire);
        if events.fd() == self.wake.as_raw_fd() {
            let _ = self.wake.read();
            let now = self.generation.load(Ordering::Acquire);
            if now != self.seen {
                // New receive eventfds (the device rejoined a server).
                let Some(d) = self.dev.upgrade() else {
                    return self.retire(ops);
                };
                let Ok(own) = d.lock().map(|g| g.watched_eventfds()) else {
                    return self.retire(ops);
                };
                match own {
                    Ok(own) => {
                        self.watch_own(false, ops);
                        self.own = own;
                        self.seen = now;
                    }
                    Err(e) => log::warn!("ivshmem: INTx watcher: {e}"),
                }
            }
            return self.watch_own(intx, ops);
        }
        if !intx {
            // Switched to MSI-X; the wake-up is on its way, act now.
            return self.watch_own(false, ops);
        }
        let Some(d) = self.dev.upgrade() else {
            return self.retire(ops);
        };
        let Ok(mut g) = d.lock() else {
            return self.retire(ops);
        };
        g.intx_event();
    }
}

impl IvshmemDoorbell {
    /// The INTx watcher of `dev`, to put into an event loop (see
    /// [`IntxWatcher`]).
    pub fn intx_watcher(dev: &Arc<Mutex<Self>>) -> Result<IntxWatcher> {
        let g = dev.lock().map_err(|_| Error::Poisoned)?;
        Ok(IntxWatcher {
            dev: Arc::downgrade(dev),
            stop: g.stop.clone(),
            intx_on: g.intx_on.clone(),
            wake: dup_eventfd(&g.mode_changed)?,
            own: g.watched_eventfds()?,
            watching: false,
            generation: g.generation.clone(),
            seen: g.generation.load(Ordering::Acquire),
        })
    }
}

impl Drop for IvshmemDoorbell {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.mode_changed.write(1);
        if let Some((events, id)) = self.watcher.take() {
            events.remove_later(id);
        }
        self.unregister_ioevents();
    }
}

impl PciDevice for IvshmemDoorbell {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn config_written(&mut self, _reg: usize) {
        let before = self.uses_intx();
        self.msix.config_written(&self.config);
        self.intx_mode_check(before);
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        match (bar, offset, data.len()) {
            (REGS_BAR, INTR_MASK, 4) => data.copy_from_slice(&self.intr_mask.to_le_bytes()),
            (REGS_BAR, INTR_STATUS, 4) => {
                data.copy_from_slice(&self.intr_status.to_le_bytes());
                self.intr_status = 0;
                self.update_intx();
            }
            (REGS_BAR, IV_POSITION, 4) => data.copy_from_slice(&(self.id as u32).to_le_bytes()),
            (REGS_BAR, DOORBELL, 4) => data.fill(0),
            (MSIX_BAR, o, _) if o < PBA_OFFSET => self.msix.read_table(o, data),
            (MSIX_BAR, o, _) => self.msix.read_pba(o - PBA_OFFSET, data),
            _ => {
                self.stats.bad_access += 1;
                data.fill(0xff);
            }
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        match (bar, offset, data) {
            (REGS_BAR, _, [a, b, c, d]) => {
                let v = u32::from_le_bytes([*a, *b, *c, *d]);
                match offset {
                    INTR_MASK => {
                        let before = self.uses_intx();
                        self.intr_mask = v;
                        self.update_intx();
                        self.intx_mode_check(before);
                    }
                    INTR_STATUS => {
                        self.intr_status = v;
                        self.update_intx();
                    }
                    DOORBELL => self.ring(v),
                    _ => self.stats.bad_access += 1,
                }
            }
            (MSIX_BAR, o, _) if o < PBA_OFFSET => self.msix.write_table(o, data),
            _ => self.stats.bad_access += 1,
        }
    }

    fn bar_memory(&self, bar: usize) -> Option<BarMemory> {
        (bar == SHM_BAR).then(|| {
            // SAFETY: the region's mapping lives as long as its Arc, the
            // owner.
            unsafe {
                BarMemory::new(
                    self.region.clone(),
                    self.region.host_addr(),
                    self.region.size(),
                )
            }
            .with_read_only(self.read_only.clone())
        })
    }

    fn bar_moved(&mut self, bar: usize, addr: Option<u64>) {
        if bar == REGS_BAR {
            self.bar0 = addr;
            self.register_ioevents();
        }
    }

    fn set_intx(&mut self, line: Box<dyn IntxLine>) {
        self.intx = Some(line);
    }
}

fn check_vectors(n: usize) -> Result<()> {
    if n == 0 || n > MAX_VECTORS {
        return Err(Error::Config(format!("{n} vectors (1..={MAX_VECTORS})")));
    }
    Ok(())
}

/// Another descriptor of the same eventfd (each user of a doorbell's
/// eventfd holds its own).
pub(crate) fn dup_eventfd(e: &EventFd) -> Result<EventFd> {
    e.try_clone()
        .map_err(|e| Error::Io("duplicating a doorbell eventfd".into(), e))
}

/// Fresh receive eventfds for a member that is not given any by a server.
pub fn new_eventfds(n: usize) -> Result<Vec<EventFd>> {
    (0..n)
        .map(|_| {
            EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
                .map_err(|e| Error::Io("creating an eventfd".into(), e))
        })
        .collect()
}

#[allow(dead_code)]
fn _assert_send() {
    fn is_send<T: Send>() {}
    is_send::<IvshmemDoorbell>();
}

#[cfg(test)]
mod tests {
    //! The device model without KVM: fake MSI vectors, ioeventfd sink and
    //! INTx line stand in for the kernel.
    use super::*;
    use shared_region::Backing;
    use std::time::{Duration, Instant};
    use vmm_core::irq::MsiMessage;

    /// Fake vectors: count triggers.
    struct Vectors(usize);
    impl MsiVectors for Vectors {
        fn len(&self) -> usize {
            self.0
        }
        fn configure(&mut self, _index: usize, _msg: Option<MsiMessage>) {}
        fn trigger(&self, _index: usize) {}
        fn pending(&self, _index: usize) -> bool {
            false
        }
        fn replace_eventfd(
            &mut self,
            _index: usize,
            _evt: EventFd,
        ) -> std::result::Result<(), String> {
            Ok(())
        }
    }

    /// What was registered as an ioeventfd: (address, datamatch).
    type Registered = Arc<Mutex<Vec<(u64, u32)>>>;

    struct Sink(Registered);
    impl IoEvents for Sink {
        fn register(&self, _evt: &EventFd, addr: u64, data: u32) -> std::io::Result<()> {
            self.0.lock().unwrap().push((addr, data));
            Ok(())
        }
        fn unregister(&self, _evt: &EventFd, addr: u64, data: u32) -> std::io::Result<()> {
            let mut g = self.0.lock().unwrap();
            let i = g
                .iter()
                .position(|r| *r == (addr, data))
                .expect("registered");
            g.remove(i);
            Ok(())
        }
    }

    struct Line(Arc<AtomicBool>);
    impl IntxLine for Line {
        fn set_level(&self, asserted: bool) {
            self.0.store(asserted, Ordering::SeqCst);
        }
    }

    fn device(id: u16, vectors: usize, sink: Option<Registered>) -> Arc<Mutex<IvshmemDoorbell>> {
        let region = Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).unwrap());
        let own = new_eventfds(vectors).unwrap();
        let ioevents = sink.map(|r| Box::new(Sink(r)) as Box<dyn IoEvents>);
        IvshmemDoorbell::with_parts(region, id, own, Box::new(Vectors(vectors)), ioevents).unwrap()
    }

    fn read(d: &mut IvshmemDoorbell, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.bar_read(REGS_BAR, off, &mut b);
        u32::from_le_bytes(b)
    }

    fn write(d: &mut IvshmemDoorbell, off: u64, v: u32) {
        d.bar_write(REGS_BAR, off, &v.to_le_bytes());
    }

    fn doorbell(peer: u16, vector: u16) -> u32 {
        intervm_protocol::ivshmem::doorbell(peer, vector)
    }

    fn clones(evts: &[EventFd]) -> Vec<EventFd> {
        evts.iter().map(|e| e.try_clone().unwrap()).collect()
    }

    #[test]
    fn after_a_rejoin_doorbells_to_unknown_peers_are_held_until_they_come() {
        let dev = device(3, 2, None);
        let mut d = dev.lock().unwrap();
        // Before any rejoin a doorbell to nobody is dropped (as QEMU does).
        write(&mut d, DOORBELL, doorbell(9, 1));
        let early = new_eventfds(2).unwrap();
        d.add_peer(9, clones(&early));
        assert!(early[1].read().is_err(), "not delivered later");
        let own = new_eventfds(2).unwrap();
        d.rejoined(4, clones(&own), HashMap::new()).unwrap();
        assert_eq!(read(&mut d, IV_POSITION), 4);
        assert!(
            d.peers().is_empty(),
            "the old peers are gone with the old server"
        );
        write(&mut d, DOORBELL, doorbell(4, 1));
        assert_eq!(own[1].read().unwrap(), 1, "ringing itself at the new ID");
        write(&mut d, DOORBELL, doorbell(7, 1));
        // Peer 7 comes with vector 0 first: vector 1's doorbell waits.
        let p7 = new_eventfds(2).unwrap();
        d.add_peer(7, clones(&p7[..1]));
        assert!(p7[0].read().is_err());
        d.add_peer(7, clones(&p7));
        assert_eq!(p7[1].read().unwrap(), 1, "held, then delivered");
        d.add_peer(7, clones(&p7));
        assert!(p7[1].read().is_err(), "delivered once");
        assert_eq!(d.stats().dropped, 2);
        // A guest ringing ever more IDs is not stored beyond the cap.
        for id in 0..(MAX_HELD as u32 + 100) {
            write(
                &mut d,
                DOORBELL,
                doorbell(1000 + (id / 4) as u16, (id % 4) as u16),
            );
        }
        assert_eq!(d.held.as_ref().map(HashSet::len), Some(MAX_HELD));
        // After the new ID is published everyone looks again.
        d.wake_all();
        assert_eq!(own[0].read().unwrap(), 1);
        assert_eq!(p7[0].read().unwrap(), 1);
    }

    #[test]
    fn doorbells_reach_known_peers_and_the_rest_is_dropped_and_counted() {
        let dev = device(3, 2, None);
        let mut d = dev.lock().unwrap();
        assert_eq!(read(&mut d, IV_POSITION), 3);
        assert_eq!(read(&mut d, DOORBELL), 0, "write-only");
        let peer = new_eventfds(2).unwrap();
        d.add_peer(5, peer.iter().map(|e| e.try_clone().unwrap()).collect());
        assert_eq!(d.peers(), vec![5]);
        write(&mut d, DOORBELL, doorbell(5, 1));
        assert_eq!(peer[1].read().unwrap(), 1);
        assert!(peer[0].read().is_err(), "only the vector rung");
        for v in [doorbell(5, 2), doorbell(9, 0), u32::MAX] {
            write(&mut d, DOORBELL, v);
        }
        // A bad width, a bad offset, a write to the read-only IVPosition.
        d.bar_write(REGS_BAR, DOORBELL, &[1, 0]);
        d.bar_write(REGS_BAR, 0x80, &[0; 4]);
        write(&mut d, IV_POSITION, 7);
        let s = d.stats();
        assert_eq!((s.rung, s.dropped, s.bad_access), (1, 3, 3), "{s:?}");
        assert_eq!(read(&mut d, IV_POSITION), 3);
        d.remove_peer(5);
        write(&mut d, DOORBELL, doorbell(5, 1));
        assert_eq!(d.stats().dropped, 4, "a peer that left");
        assert_eq!(d.own_eventfds().unwrap()[0].read().unwrap(), 1, "woken");
    }

    #[test]
    fn a_full_peer_counter_is_counted_not_waited_for() {
        let dev = device(0, 1, None);
        let mut d = dev.lock().unwrap();
        let peer = new_eventfds(1).unwrap();
        // An eventfd counter one below its maximum: the next write would
        // block a blocking fd.
        peer[0].write(u64::MAX - 1).unwrap();
        d.add_peer(1, vec![peer[0].try_clone().unwrap()]);
        write(&mut d, DOORBELL, doorbell(1, 0));
        let s = d.stats();
        assert_eq!((s.rung, s.saturated), (1, 1), "{s:?}");
    }

    #[test]
    fn the_fast_path_follows_bar0_and_the_peer_table() {
        let reg = Registered::default();
        let dev = device(0, 2, Some(reg.clone()));
        let mut d = dev.lock().unwrap();
        let now = || {
            let mut v = reg.lock().unwrap().clone();
            v.sort();
            v
        };
        assert!(now().is_empty(), "nothing before BAR0 is placed");
        d.bar_moved(REGS_BAR, Some(0x8000_0000));
        let at = 0x8000_0000 + DOORBELL;
        // Itself (a member may ring itself), both vectors.
        assert_eq!(now(), vec![(at, doorbell(0, 0)), (at, doorbell(0, 1))]);
        d.add_peer(4, new_eventfds(2).unwrap());
        assert_eq!(now().len(), 4);
        assert!(now().contains(&(at, doorbell(4, 1))));
        d.bar_moved(REGS_BAR, Some(0x9000_0000));
        assert!(now().iter().all(|(a, _)| *a == 0x9000_0000 + DOORBELL));
        assert_eq!(now().len(), 4);
        d.remove_peer(4);
        assert_eq!(now().len(), 2);
        d.bar_moved(REGS_BAR, None);
        assert!(now().is_empty(), "BAR0 unmapped: nothing left registered");
        d.bar_moved(REGS_BAR, Some(0x8000_0000));
        drop(d);
        drop(dev);
        assert!(
            now().is_empty(),
            "a dropped device leaves nothing registered"
        );
    }

    #[test]
    fn intx_raises_status_and_the_line_until_status_is_read() {
        let dev = device(0, 1, None);
        // A device built from parts has its watcher put into a loop by
        // its VMM.
        let events = vmm_core::events::EventLoop::start("intx-test").unwrap();
        events
            .add(Box::new(IvshmemDoorbell::intx_watcher(&dev).unwrap()))
            .unwrap();
        let level = Arc::new(AtomicBool::new(false));
        let own = {
            let mut d = dev.lock().unwrap();
            d.set_intx(Box::new(Line(level.clone())));
            // MSI-X stays off; unmasking INTx makes the device use it.
            write(&mut d, INTR_MASK, 1);
            d.own_eventfds().unwrap()
        };
        own[0].write(1).unwrap();
        let t0 = Instant::now();
        while !level.load(Ordering::SeqCst) {
            assert!(t0.elapsed() < Duration::from_secs(60), "INTx never raised");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut d = dev.lock().unwrap();
        assert_eq!(d.stats().intx, 1);
        assert_eq!(read(&mut d, INTR_STATUS), 1);
        assert!(
            !level.load(Ordering::SeqCst),
            "reading status lowers the line"
        );
        assert_eq!(read(&mut d, INTR_STATUS), 0, "cleared on read");
    }

    #[test]
    fn vector_counts_are_checked() {
        let region = Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).unwrap());
        for n in [0, MAX_VECTORS + 1] {
            let r = IvshmemDoorbell::with_parts(
                region.clone(),
                0,
                new_eventfds(n).unwrap(),
                Box::new(Vectors(n)),
                None,
            );
            assert!(r.is_err(), "{n} vectors");
        }
        let r = IvshmemDoorbell::with_parts(
            region,
            0,
            new_eventfds(2).unwrap(),
            Box::new(Vectors(3)),
            None,
        );
        assert!(r.is_err(), "vectors and eventfds differ");
    }
}
