//! Doorbell members inside one `intervm` process, wired directly: each
//! device learns every other member's receive eventfds, no server needed.

use std::sync::{Arc, Mutex};

use crate::{Error, IvshmemDoorbell, Result};

/// Connects every pair of `members` both ways (peer IDs are the devices'
/// own IDs).
pub fn wire(members: &[Arc<Mutex<IvshmemDoorbell>>]) -> Result<()> {
    fn lock(d: &Arc<Mutex<IvshmemDoorbell>>) -> Result<std::sync::MutexGuard<'_, IvshmemDoorbell>> {
        d.lock().map_err(|_| Error::Poisoned)
    }
    let mut own = Vec::new();
    for d in members {
        let g = lock(d)?;
        own.push((g.id(), g.own_eventfds()?));
    }
    for d in members {
        let mut g = lock(d)?;
        let me = g.id();
        for (id, evts) in &own {
            if *id != me {
                let clones = evts
                    .iter()
                    .map(crate::device::dup_eventfd)
                    .collect::<Result<Vec<_>>>()?;
                g.add_peer(*id, clones);
            }
        }
    }
    Ok(())
}

/// Member `id` left the group: the others drop its doorbells and their
/// guests are woken to notice.
pub fn leave(members: &[Arc<Mutex<IvshmemDoorbell>>], id: u16) {
    for d in members {
        if let Ok(mut g) = d.lock() {
            if g.id() != id {
                g.remove_peer(id);
            }
        }
    }
}
