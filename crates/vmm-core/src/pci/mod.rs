//! PCI: configuration space, MSI-X, and a bus with a type-1 host bridge.
//!
//! A device implements [`PciDevice`]: it owns a [`PciConfiguration`] and
//! answers BAR accesses. The [`PciBus`] assigns BAR addresses from the
//! layout's windows (as firmware would), decodes guest BAR moves, and maps
//! memory BARs straight into the guest through a [`PciPlatform`]. Nothing in
//! this module needs KVM except the [`KvmPciPlatform`] implementation, so
//! device models can be tested with fakes and embedded in other VMMs.

pub mod bus;
pub mod config;
pub mod msix;

pub use bus::{KvmPciPlatform, PciBus, PciConfigIo, PciPlatform, PciWindowRouter, SlotInfo};
pub use config::{BarKind, BarSpec, PciConfiguration, PciIds};
pub use msix::Msix;

use std::any::Any;
use std::sync::Arc;

use crate::irq::IntxLine;

/// Host memory that backs a BAR directly: mapped into the guest, so that
/// reads and writes cause no exits, except writes to its read-only pieces,
/// which exit and are dropped (KVM read-only memory slots).
///
/// Made only with the unsafe [`BarMemory::new`], which ties the memory to
/// an owner that keeps it mapped; the bus keeps the value (and so the
/// owner) for as long as KVM maps the memory into the guest. Safe code
/// cannot name any host address:
///
/// ```compile_fail
/// let m = vmm_core::pci::BarMemory::new(std::sync::Arc::new(()), 0x7f00_0000_0000 as *mut u8, 4096);
/// ```
#[derive(Clone)]
pub struct BarMemory {
    host_addr: u64,
    len: u64,
    read_only: Vec<core::ops::Range<u64>>,
    /// Keeps the memory mapped while this value lives.
    _owner: Arc<dyn Any + Send + Sync>,
}

impl std::fmt::Debug for BarMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BarMemory")
            .field("host_addr", &format_args!("{:#x}", self.host_addr))
            .field("len", &self.len)
            .field("read_only", &self.read_only)
            .finish_non_exhaustive()
    }
}

/// One KVM memory slot of a [`BarMemory`], see [`BarMemory::pieces`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BarPiece {
    /// Offset in the BAR.
    pub offset: u64,
    /// Length in bytes.
    pub len: u64,
    /// Whether the guest may only read it.
    pub read_only: bool,
}

impl BarMemory {
    /// `len` bytes at `host_addr`, all writable by the guest, kept mapped
    /// by `owner` (for example the `Arc` of the mapping itself).
    ///
    /// # Safety
    /// `host_addr..host_addr + len` must be memory of this process, mapped
    /// readable and writable, that stays mapped for as long as `owner`
    /// lives: a bus maps it into the guest, which then reads and writes it
    /// at will, until the bus drops this value (and its `owner`).
    pub unsafe fn new(owner: Arc<dyn Any + Send + Sync>, host_addr: *mut u8, len: u64) -> Self {
        Self {
            host_addr: host_addr as u64,
            len,
            read_only: Vec::new(),
            _owner: owner,
        }
    }

    /// The same memory, with `ranges` (offsets into the BAR) readable but
    /// not writable by the guest. Each is widened to whole pages and
    /// clipped to the BAR; overlaps are allowed.
    pub fn with_read_only(mut self, ranges: Vec<core::ops::Range<u64>>) -> Self {
        self.read_only = ranges;
        self
    }

    /// Host virtual address of the first byte.
    pub fn host_addr(&self) -> u64 {
        self.host_addr
    }

    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True for an empty BAR memory.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces the guest may read but not write, as given.
    pub fn read_only(&self) -> &[core::ops::Range<u64>] {
        &self.read_only
    }

    /// Only the first `len` bytes (no more than the BAR the bus decodes).
    pub(crate) fn clip(&mut self, len: u64) {
        self.len = self.len.min(len);
    }

    /// The BAR cut where writability changes, in order, covering it all:
    /// one memory slot each. Read-only pieces are widened to whole pages
    /// and clipped to the BAR.
    pub fn pieces(&self) -> Vec<BarPiece> {
        const PAGE: u64 = 4096;
        let mut ro: Vec<(u64, u64)> = self
            .read_only
            .iter()
            .map(|r| {
                let start = (r.start / PAGE * PAGE).min(self.len);
                let end = r.end.checked_next_multiple_of(PAGE).unwrap_or(u64::MAX);
                (start, end.min(self.len))
            })
            .filter(|(s, e)| s < e)
            .collect();
        ro.sort_unstable();
        fn piece(offset: u64, end: u64, read_only: bool, out: &mut Vec<BarPiece>) {
            if end <= offset {
                return;
            }
            match out.last_mut() {
                Some(last) if last.read_only == read_only && last.offset + last.len == offset => {
                    last.len += end - offset
                }
                _ => out.push(BarPiece {
                    offset,
                    len: end - offset,
                    read_only,
                }),
            }
        }
        let mut out = Vec::new();
        let mut at = 0;
        for (s, e) in ro {
            piece(at, s, false, &mut out);
            piece(s.max(at), e, true, &mut out);
            at = at.max(e);
        }
        piece(at, self.len, false, &mut out);
        out
    }
}

/// A PCI function on the [`PciBus`].
///
/// Accesses arrive as register-level calls with an offset inside the BAR;
/// implementations must accept any offset and width from the guest: bad
/// reads fill `0xff`, bad writes are ignored.
pub trait PciDevice: Send {
    /// The configuration space.
    fn config(&self) -> &PciConfiguration;
    /// The configuration space, mutably (the bus writes guest values through it).
    fn config_mut(&mut self) -> &mut PciConfiguration;
    /// Called after the guest wrote dword register `reg` of the config space.
    fn config_written(&mut self, _reg: usize) {}
    /// A guest read of a trapped BAR.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    /// A guest write to a trapped BAR.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
    /// Host memory to map directly for BAR `bar`, or `None` to trap it
    /// (see the promise [`BarMemory::new`] asks for).
    fn bar_memory(&self, _bar: usize) -> Option<BarMemory> {
        None
    }
    /// BAR `bar` is now decoded at `addr` (`None`: no longer decoded).
    /// Devices that registered ioeventfds on a BAR move them here.
    fn bar_moved(&mut self, _bar: usize, _addr: Option<u64>) {}
    /// Hands the device its INTx line (only for devices with an interrupt pin).
    fn set_intx(&mut self, _line: Box<dyn IntxLine>) {}
}

/// The host bridge at 00:00.0 (Intel 440FX IDs, which every OS accepts).
pub struct HostBridge {
    config: PciConfiguration,
}

impl Default for HostBridge {
    fn default() -> Self {
        let ids = PciIds {
            vendor: 0x8086,
            device: 0x1237,
            subsystem_vendor: 0,
            subsystem: 0,
            revision: 2,
            class: 0x060000,
        };
        Self {
            config: PciConfiguration::new(ids, 0),
        }
    }
}

impl PciDevice for HostBridge {
    fn config(&self) -> &PciConfiguration {
        &self.config
    }
    fn config_mut(&mut self) -> &mut PciConfiguration {
        &mut self.config
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn piece(offset: u64, len: u64, read_only: bool) -> BarPiece {
        BarPiece {
            offset,
            len,
            read_only,
        }
    }

    #[test]
    fn bar_pieces_cover_the_bar_in_order_and_widen_read_only_ones_to_pages() {
        // SAFETY: only cut into pieces, never mapped.
        let all = unsafe { BarMemory::new(Arc::new(()), std::ptr::null_mut(), 0x10000) };
        assert_eq!(all.pieces(), [piece(0, 0x10000, false)]);
        // Unsorted, overlapping, unaligned, empty, and past the end.
        let mem = all.with_read_only(vec![
            0x8000..0x9000,
            0x100..0x200,
            0x8800..0xa000,
            5..5,
            0xf000..0x20000,
        ]);
        assert_eq!(
            mem.pieces(),
            [
                piece(0, 0x1000, true),
                piece(0x1000, 0x7000, false),
                piece(0x8000, 0x2000, true),
                piece(0xa000, 0x5000, false),
                piece(0xf000, 0x1000, true),
            ]
        );
        // SAFETY: as above.
        let whole = unsafe { BarMemory::new(Arc::new(()), std::ptr::null_mut(), 0x3000) }
            .with_read_only(vec![0..0x1000, 0x800..u64::MAX]);
        assert_eq!(whole.pieces(), [piece(0, 0x3000, true)]);
    }
}
