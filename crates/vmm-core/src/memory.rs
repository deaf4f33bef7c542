//! Guest RAM and KVM memory slots.
//!
//! RAM comes from `vm-memory` ([`GuestMemoryMmap`]), anonymous or backed by
//! a memfd. Extra host memory (for example a shared-memory BAR) is mapped
//! into the guest through [`MemorySlots`], which hands out KVM slot numbers
//! and (un)maps with `KVM_SET_USER_MEMORY_REGION`.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_READONLY};
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion, GuestRegionMmap};

use crate::layout;
use crate::{Error, Result};

/// Guest memory type used throughout vmm-core.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<()>;

/// Where guest RAM comes from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum RamBacking {
    /// Private anonymous memory.
    #[default]
    Anonymous,
    /// A sealed-size memfd (lets another process map the RAM, e.g. a debugger).
    Memfd,
}

/// Creates guest RAM of `size` bytes laid out by [`layout::ram_ranges`].
pub fn create_ram(size: u64, backing: RamBacking) -> Result<GuestMemoryMmap> {
    if size == 0 || !size.is_multiple_of(4096) {
        return Err(Error::Layout(format!(
            "memory size {size} is not a non-zero multiple of 4 KiB"
        )));
    }
    if size > layout::MAX_RAM {
        return Err(Error::Layout(format!(
            "memory size {size} exceeds the maximum of {} bytes",
            layout::MAX_RAM
        )));
    }
    let ranges = layout::ram_ranges(size);
    match backing {
        RamBacking::Anonymous => {
            let r: Vec<_> = ranges
                .iter()
                .map(|&(a, l)| (GuestAddress(a), l as usize))
                .collect();
            GuestMemoryMmap::from_ranges(&r).map_err(|e| Error::Memory(e.to_string()))
        }
        RamBacking::Memfd => {
            let fd = memfd("intervm-ram", size)?;
            let file = Arc::new(fd);
            let mut off = 0u64;
            let mut r = Vec::new();
            for (a, l) in ranges {
                r.push((
                    GuestAddress(a),
                    l as usize,
                    Some(vm_memory::FileOffset::from_arc(file.clone(), off)),
                ));
                off += l;
            }
            GuestMemoryMmap::from_ranges_with_files(r).map_err(|e| Error::Memory(e.to_string()))
        }
    }
}

/// Creates an anonymous memfd of `size` bytes
/// ([`shrink_guard::memfd`], with this crate's error).
pub fn memfd(name: &str, size: u64) -> Result<std::fs::File> {
    shrink_guard::memfd(name, size).map_err(Error::io("memfd_create"))
}

/// Registers every RAM region with KVM (slots 0..n) and returns the slot
/// allocator for everything else.
pub fn register_ram(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<MemorySlots> {
    let mut next = 0;
    for region in mem.iter() {
        let region: &GuestRegionMmap<()> = region;
        let r = kvm_userspace_memory_region {
            slot: next,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which the
        // caller keeps alive for as long as the VM exists.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION (RAM)"))?;
        next += 1;
    }
    Ok(MemorySlots {
        inner: Arc::new(Mutex::new(SlotState {
            free: Vec::new(),
            next,
        })),
    })
}

struct SlotState {
    free: Vec<u32>,
    next: u32,
}

/// Maps extra host memory into the guest: KVM slot numbers and
/// `KVM_SET_USER_MEMORY_REGION` calls for memory BARs.
#[derive(Clone)]
pub struct MemorySlots {
    inner: Arc<Mutex<SlotState>>,
}

impl MemorySlots {
    /// Maps `len` bytes at host address `host` to guest address `gpa`,
    /// writable by the guest or (`read_only`) not: its writes then exit to
    /// the VMM as MMIO. Returns the slot to pass to [`MemorySlots::unmap`].
    ///
    /// # Safety
    /// `host..host+len` must stay mapped until `unmap` is called (or the VM
    /// is destroyed).
    pub unsafe fn map(
        &self,
        vm: &VmFd,
        gpa: u64,
        host: u64,
        len: u64,
        read_only: bool,
    ) -> Result<u32> {
        let slot = {
            let mut s = self
                .inner
                .lock()
                .map_err(|_| Error::Memory("slot lock poisoned".into()))?;
            match s.free.pop() {
                Some(x) => x,
                None => {
                    s.next += 1;
                    s.next - 1
                }
            }
        };
        let r = kvm_userspace_memory_region {
            slot,
            flags: if read_only { KVM_MEM_READONLY } else { 0 },
            guest_phys_addr: gpa,
            memory_size: len,
            userspace_addr: host,
        };
        // SAFETY: the caller guarantees the host range outlives the mapping.
        if let Err(e) = unsafe { vm.set_user_memory_region(r) } {
            self.release(slot);
            return Err(Error::Kvm {
                op: "KVM_SET_USER_MEMORY_REGION (map)",
                source: e,
            });
        }
        Ok(slot)
    }

    /// Removes the mapping of `slot`.
    pub fn unmap(&self, vm: &VmFd, slot: u32) -> Result<()> {
        let r = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: a zero-sized region deletes the slot; no memory is touched.
        unsafe { vm.set_user_memory_region(r) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION (unmap)"))?;
        self.release(slot);
        Ok(())
    }

    fn release(&self, slot: u32) {
        if let Ok(mut s) = self.inner.lock() {
            s.free.push(slot);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn rejects_bad_sizes() {
        assert!(create_ram(0, RamBacking::Anonymous).is_err());
        assert!(create_ram(4097, RamBacking::Anonymous).is_err());
        assert!(create_ram(layout::MAX_RAM + 4096, RamBacking::Anonymous).is_err());
    }

    #[test]
    fn memfd_ram_is_usable() {
        let m = create_ram(1 << 20, RamBacking::Memfd).unwrap();
        m.write_obj(0xdead_beef_u32, GuestAddress(0x1000)).unwrap();
        assert_eq!(
            m.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
    }
}
