//! Interrupt plumbing: GSI routing, irqfds, MSI vectors and INTx lines.
//!
//! `KVM_SET_GSI_ROUTING` replaces the whole table, so [`GsiRouter`] keeps
//! every route: the default IOAPIC/PIC pin routes plus one MSI route per
//! allocated vector. Each MSI vector is an [`EventFd`] bound to its GSI with
//! an irqfd, so a write to the eventfd (from the VMM, or from another VM's
//! ioeventfd in the kernel) injects the MSI without a userspace exit.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_entry__bindgen_ty_1, kvm_irq_routing_irqchip,
    kvm_irq_routing_msi, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::layout::IOAPIC_PINS;
use crate::{Error, Result};

/// An MSI message: address and data as programmed by the guest.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MsiMessage {
    /// Message address (low 32 bits are 0xfeeX_XXXX on x86).
    pub address: u64,
    /// Message data (vector and delivery mode).
    pub data: u32,
}

/// Owns the VM's GSI routing table.
pub struct GsiRouter {
    vm: Arc<VmFd>,
    /// The MSI route of each allocated GSI that points somewhere.
    routes: BTreeMap<u32, MsiMessage>,
    next_gsi: u32,
    free: Vec<u32>,
    /// Times the table was written to KVM.
    commits: u64,
}

fn msi_route(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            msi: kvm_irq_routing_msi {
                address_lo: msg.address as u32,
                address_hi: (msg.address >> 32) as u32,
                data: msg.data,
                ..Default::default()
            },
        },
        ..Default::default()
    }
}

fn irqchip_route(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        u: kvm_irq_routing_entry__bindgen_ty_1 {
            irqchip: kvm_irq_routing_irqchip { irqchip: chip, pin },
        },
        ..Default::default()
    }
}

impl GsiRouter {
    /// A router with KVM's default pin routes for GSIs 0..24. Call after
    /// `KVM_CREATE_IRQCHIP`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        Self {
            vm,
            routes: BTreeMap::new(),
            next_gsi: IOAPIC_PINS,
            free: Vec::new(),
            commits: 0,
        }
    }

    fn entries(&self) -> Vec<kvm_irq_routing_entry> {
        let mut v = Vec::new();
        for gsi in 0..IOAPIC_PINS {
            v.push(irqchip_route(gsi, KVM_IRQCHIP_IOAPIC, gsi));
            if gsi < 8 {
                v.push(irqchip_route(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
            } else if gsi < 16 {
                v.push(irqchip_route(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
            }
        }
        v.extend(self.routes.iter().map(|(&gsi, &msg)| msi_route(gsi, msg)));
        v
    }

    fn commit(&mut self) -> Result<()> {
        let entries = self.entries();
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| Error::Device(format!("building GSI routing table: {e:?}")))?;
        self.commits += 1;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(Error::kvm("KVM_SET_GSI_ROUTING"))
    }

    /// How many times the table was written to KVM (each write replaces
    /// the whole table, so a guest must not be able to cause one per
    /// register write: see [`GsiRouter::set_msi`]).
    pub fn commits(&self) -> u64 {
        self.commits
    }

    /// Allocates a GSI for an MSI route (not yet pointing anywhere useful).
    pub fn allocate(&mut self) -> Result<u32> {
        let gsi = match self.free.pop() {
            Some(g) => g,
            None => {
                self.next_gsi += 1;
                self.next_gsi - 1
            }
        };
        if gsi >= 4096 {
            return Err(Error::Device("out of GSIs".into()));
        }
        Ok(gsi)
    }

    /// Points `gsi` at `msg` (installs or replaces its MSI route). A route
    /// that already points there is left alone: a guest that masks and
    /// unmasks a vector over and over (each unmask sets its route) causes
    /// no table rewrite.
    pub fn set_msi(&mut self, gsi: u32, msg: MsiMessage) -> Result<()> {
        if self.routes.get(&gsi) == Some(&msg) {
            return Ok(());
        }
        let before = self.routes.insert(gsi, msg);
        let r = self.commit();
        if r.is_err() {
            // KVM kept the old table: so does this copy of it.
            match before {
                Some(b) => self.routes.insert(gsi, b),
                None => self.routes.remove(&gsi),
            };
        }
        r
    }

    /// Removes the route of `gsi` and returns it to the pool.
    pub fn release(&mut self, gsi: u32) -> Result<()> {
        let had = self.routes.remove(&gsi).is_some();
        self.free.push(gsi);
        if had {
            self.commit()
        } else {
            Ok(())
        }
    }

    /// Installs the default routes (call once after creating the irqchip).
    pub fn install_defaults(&mut self) -> Result<()> {
        self.commit()
    }

    /// The VM these routes belong to.
    pub fn vm(&self) -> &Arc<VmFd> {
        &self.vm
    }
}

/// Something that sets how a device's MSI(-X) vectors are delivered.
///
/// Device models (see [`crate::pci::msix`]) talk to this trait only, so they
/// can be unit tested with a fake and embedded in other VMMs.
pub trait MsiVectors: Send {
    /// Number of vectors.
    fn len(&self) -> usize;
    /// True when there are no vectors.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Vector `index` now delivers `msg`, or nothing (`None`: masked or
    /// disabled). Interrupts raised while masked stay pending and are
    /// delivered when the vector is enabled again.
    fn configure(&mut self, index: usize, msg: Option<MsiMessage>);
    /// Raises vector `index` (pending if masked).
    fn trigger(&self, index: usize);
    /// True when vector `index` has an undelivered interrupt.
    fn pending(&self, index: usize) -> bool;
    /// Vector `index` is raised by `evt` from now on (an ivshmem server
    /// that restarted hands out new eventfds). The eventfd it replaces
    /// still raises the vector until the next replacement, for peers that
    /// have not yet learnt of it. Implementations that cannot do this say so.
    fn replace_eventfd(&mut self, index: usize, evt: EventFd) -> std::result::Result<(), String> {
        let _ = evt;
        Err(format!(
            "vector {index}: these vectors cannot change eventfds"
        ))
    }
}

struct KvmVector {
    evt: EventFd,
    /// The eventfd `evt` replaced (see [`MsiVectors::replace_eventfd`]):
    /// it still raises the vector, so that a peer that has not yet learnt
    /// of the replacement is not lost. Dropped at the next replacement.
    previous: Option<EventFd>,
    gsi: u32,
    bound: bool,
}

impl KvmVector {
    /// The eventfds that raise this vector.
    fn eventfds(&self) -> impl Iterator<Item = &EventFd> {
        std::iter::once(&self.evt).chain(self.previous.as_ref())
    }
}

/// [`MsiVectors`] on KVM: one eventfd + GSI + irqfd per vector.
pub struct KvmMsiVectors {
    router: Arc<Mutex<GsiRouter>>,
    vectors: Vec<KvmVector>,
}

impl KvmMsiVectors {
    /// Allocates `count` vectors (eventfds and GSIs; no route until configured).
    pub fn new(router: Arc<Mutex<GsiRouter>>, count: usize) -> Result<Self> {
        let mut vectors = Vec::with_capacity(count);
        {
            let mut r = router
                .lock()
                .map_err(|_| Error::Device("GSI router lock poisoned".into()))?;
            for _ in 0..count {
                let evt = EventFd::new(EFD_NONBLOCK | libc::EFD_CLOEXEC)
                    .map_err(Error::io("eventfd for MSI vector"))?;
                vectors.push(KvmVector {
                    evt,
                    previous: None,
                    gsi: r.allocate()?,
                    bound: false,
                });
            }
        }
        Ok(Self { router, vectors })
    }

    /// `evts.len()` vectors raised by the given eventfds (for example ones an
    /// ivshmem server handed out), each with a fresh GSI.
    pub fn from_eventfds(router: Arc<Mutex<GsiRouter>>, evts: Vec<EventFd>) -> Result<Self> {
        let mut vectors = Vec::with_capacity(evts.len());
        {
            let mut r = router
                .lock()
                .map_err(|_| Error::Device("GSI router lock poisoned".into()))?;
            for evt in evts {
                vectors.push(KvmVector {
                    evt,
                    previous: None,
                    gsi: r.allocate()?,
                    bound: false,
                });
            }
        }
        Ok(Self { router, vectors })
    }

    /// The eventfd that raises vector `index`; hand it to another VM's
    /// ioeventfd for an in-kernel doorbell.
    pub fn eventfd(&self, index: usize) -> Option<&EventFd> {
        self.vectors.get(index).map(|v| &v.evt)
    }

    fn try_configure(&mut self, index: usize, msg: Option<MsiMessage>) -> Result<()> {
        let Some(v) = self.vectors.get_mut(index) else {
            return Ok(());
        };
        let mut router = self
            .router
            .lock()
            .map_err(|_| Error::Device("GSI router lock poisoned".into()))?;
        match msg {
            Some(m) => {
                router.set_msi(v.gsi, m)?;
                if !v.bound {
                    // Registering delivers an interrupt already pending in the eventfd.
                    for e in v.eventfds() {
                        router
                            .vm()
                            .register_irqfd(e, v.gsi)
                            .map_err(Error::kvm("KVM_IRQFD"))?;
                    }
                    v.bound = true;
                }
            }
            None => {
                if v.bound {
                    for e in v.eventfds() {
                        router
                            .vm()
                            .unregister_irqfd(e, v.gsi)
                            .map_err(Error::kvm("KVM_IRQFD (deassign)"))?;
                    }
                    v.bound = false;
                }
            }
        }
        Ok(())
    }
}

impl MsiVectors for KvmMsiVectors {
    fn len(&self) -> usize {
        self.vectors.len()
    }

    fn configure(&mut self, index: usize, msg: Option<MsiMessage>) {
        if let Err(e) = self.try_configure(index, msg) {
            log::warn!("MSI vector {index}: {e}");
        }
    }

    fn trigger(&self, index: usize) {
        if let Some(v) = self.vectors.get(index) {
            if let Err(e) = v.evt.write(1) {
                log::warn!("MSI vector {index}: eventfd write: {e}");
            }
        }
    }

    fn pending(&self, index: usize) -> bool {
        match self.vectors.get(index) {
            Some(v) if !v.bound => v.eventfds().any(poll_readable),
            _ => false,
        }
    }

    fn replace_eventfd(&mut self, index: usize, evt: EventFd) -> std::result::Result<(), String> {
        let Some(v) = self.vectors.get_mut(index) else {
            return Err(format!("no vector {index}"));
        };
        if v.bound {
            let r = self.router.lock().map_err(|_| "GSI router lock poisoned")?;
            // The new one first: registering delivers what it has pending.
            r.vm()
                .register_irqfd(&evt, v.gsi)
                .map_err(|e| format!("vector {index}: KVM_IRQFD: {e}"))?;
            if let Some(old) = &v.previous {
                let _ = r.vm().unregister_irqfd(old, v.gsi);
            }
        }
        v.previous = Some(std::mem::replace(&mut v.evt, evt));
        Ok(())
    }
}

impl Drop for KvmMsiVectors {
    fn drop(&mut self) {
        if let Ok(mut r) = self.router.lock() {
            for v in &self.vectors {
                if v.bound {
                    for e in v.eventfds() {
                        let _ = r.vm().unregister_irqfd(e, v.gsi);
                    }
                }
                let _ = r.release(v.gsi);
            }
        }
    }
}

/// True when the eventfd has a non-zero count (without consuming it).
pub fn poll_readable(evt: &EventFd) -> bool {
    use std::os::fd::AsRawFd;
    let mut p = libc::pollfd {
        fd: evt.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd, zero timeout.
    let n = unsafe { libc::poll(&mut p, 1, 0) };
    n == 1 && p.revents & libc::POLLIN != 0
}

/// A level-triggered interrupt line (PCI INTx) into the IOAPIC.
pub trait IntxLine: Send + Sync {
    /// Asserts (`true`) or deasserts the line.
    fn set_level(&self, asserted: bool);
}

/// [`IntxLine`] on KVM's in-kernel IOAPIC (`KVM_IRQ_LINE`).
pub struct KvmIntxLine {
    vm: Arc<VmFd>,
    gsi: u32,
}

impl KvmIntxLine {
    /// The line for IOAPIC pin `gsi`.
    pub fn new(vm: Arc<VmFd>, gsi: u32) -> Self {
        Self { vm, gsi }
    }
}

impl IntxLine for KvmIntxLine {
    fn set_level(&self, asserted: bool) {
        if let Err(e) = self.vm.set_irq_line(self.gsi, asserted) {
            log::warn!("INTx GSI {}: {e}", self.gsi);
        }
    }
}
