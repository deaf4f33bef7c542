//! Attaching a doorbell device to a VM when an ivshmem server owns the
//! region and hands out peer IDs: the sequence a VMM runs, in one place.
//!
//! [`attach_session`] puts the device for an open [`Session`] on the VM's
//! PCI bus, hands it the peers the server announced and follows the
//! server's later notices, then joins the ring protocol. [`from_server`]
//! does the whole of it for a server at a socket: connect, map the region
//! it shares (checking its size), attach the ring transport, attach.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use shared_region::{Membership, SharedRegion, Transport};

use crate::client::{self, OnRejoin, Reconnect, Rejoin, Session};
use crate::device::IvshmemDoorbell;
use crate::{Error, Result};

/// A doorbell device on a VM's PCI bus and the VM's ring membership.
pub struct Attached {
    /// The device (already added to the VM).
    pub device: Arc<Mutex<IvshmemDoorbell>>,
    /// This member's place in the ring protocol; dropping it leaves.
    pub membership: Membership,
}

/// Puts a doorbell device for `session` into `vm`, on `t`'s region,
/// follows the server's peer notices for it, and joins the ring protocol
/// as member `me`. `fast_path`: in-kernel doorbells where KVM allows.
///
/// When the server goes away the device joins it again through
/// `reconnect` (`None`: the same socket), and the member's new doorbell
/// ID is published in the region for its peers.
pub fn attach_session(
    vm: &vmm_core::Vm,
    t: &Transport,
    mut session: Session,
    me: u32,
    fast_path: bool,
    reconnect: Option<Reconnect>,
) -> Result<Attached> {
    // The device owns the receive eventfds from here (the follower needs
    // only the connection).
    let own = std::mem::take(&mut session.own);
    let device = IvshmemDoorbell::new(vm, t.region().clone(), session.id, own, fast_path)?;
    device
        .lock()
        .map_err(|_| Error::Poisoned)?
        .set_guest_read_only(t.guest_read_only(me));
    // The guest published its ID from IVPosition when it joined; after a
    // rejoin the host publishes the new one for it.
    let (region, ring, geo) = (t.region().clone(), t.ring_region(), t.geometry());
    let on_rejoin: OnRejoin = Box::new(move |id| {
        let _keep_mapped = &region;
        if let Err(e) = ring.set_doorbell_id(&geo, me, id) {
            log::warn!("publishing doorbell ID {id} of member {me}: {e}");
        }
    });
    let rejoin = Rejoin {
        reconnect,
        on_rejoin: Some(on_rejoin),
    };
    session.follow_with(Arc::downgrade(&device), vm.events(), rejoin)?;
    let membership = t.join(me)?;
    vm.add_pci_device(device.clone())
        .map_err(|source| Error::AddDevice {
            vm: vm.name().to_string(),
            source,
        })?;
    Ok(Attached { device, membership })
}

/// A channel whose region and doorbells come from an ivshmem server.
#[derive(Clone, Debug)]
pub struct ServerChannel {
    /// The server's socket.
    pub socket: PathBuf,
    /// A name for the region in messages.
    pub name: String,
    /// Interrupt vectors per member.
    pub vectors: usize,
    /// The region size this member expects (`None`: whatever the server
    /// shares).
    pub size: Option<u64>,
    /// Members of the ring protocol on the region.
    pub members: u32,
    /// Ring data bytes, rings at the region's end (`None`: rings that
    /// fill the region); see `shared_region::Transport::attach_rings`.
    pub ring_bytes: Option<u64>,
    /// In-kernel doorbells where KVM allows.
    pub fast_path: bool,
}

/// What [`from_server`] set up.
pub struct FromServer {
    /// The region's ring transport (shared by every member this process
    /// attaches to the channel).
    pub transport: Transport,
    /// The device and membership of the VM.
    pub attached: Attached,
}

/// Connects to the server of `c`, maps the region it shares, checks its
/// size, attaches the ring transport and then the VM as member `me`.
pub fn from_server(vm: &vmm_core::Vm, c: &ServerChannel, me: u32) -> Result<FromServer> {
    let session = client::connect(&c.socket, c.vectors)?;
    let shm = session
        .shm
        .try_clone()
        .map_err(|e| Error::Io("duplicating the region fd".into(), e))?;
    let region = SharedRegion::from_file(shm, format!("{} (from {})", c.name, c.socket.display()))?;
    if let Some(asked) = c.size.filter(|s| *s != region.size()) {
        return Err(Error::SizeMismatch {
            socket: c.socket.clone(),
            shared: region.size(),
            asked,
        });
    }
    let transport = Transport::attach_rings(Arc::new(region), c.members, c.ring_bytes)?;
    let attached = attach_session(vm, &transport, session, me, c.fast_path, None)?;
    Ok(FromServer {
        transport,
        attached,
    })
}
