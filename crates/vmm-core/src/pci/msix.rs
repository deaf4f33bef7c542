//! MSI-X: the capability, the vector table and the pending-bit array.
//!
//! [`Msix`] models the guest-visible state and tells an [`MsiVectors`]
//! implementation how each vector must be delivered whenever the guest
//! changes an entry, a mask bit, the function mask or the enable bit. It
//! has no KVM dependency; [`crate::irq::KvmMsiVectors`] is the KVM backend.

use crate::irq::{MsiMessage, MsiVectors};
use crate::pci::config::PciConfiguration;

/// MSI-X capability ID.
pub const CAP_ID: u8 = 0x11;
/// Bytes per table entry.
pub const ENTRY_SIZE: u64 = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const ENTRY_MASKED: u32 = 1;

#[derive(Clone, Copy, Debug, Default)]
struct Entry {
    addr_lo: u32,
    addr_hi: u32,
    data: u32,
    control: u32,
}

/// MSI-X state of one function.
pub struct Msix {
    entries: Vec<Entry>,
    enabled: bool,
    function_masked: bool,
    cap_offset: u8,
    vectors: Box<dyn MsiVectors>,
    /// Table/PBA accesses with a bad width or offset (ignored).
    pub bad_accesses: u64,
}

impl Msix {
    /// Adds the MSI-X capability to `config` for `vectors.len()` vectors, the
    /// table at `table_offset` and the PBA at `pba_offset` of BAR `bar`.
    pub fn new(
        config: &mut PciConfiguration,
        vectors: Box<dyn MsiVectors>,
        bar: u8,
        table_offset: u32,
        pba_offset: u32,
    ) -> Option<Self> {
        let n = vectors.len();
        if n == 0
            || n > 2048
            || bar > 5
            || !table_offset.is_multiple_of(8)
            || !pba_offset.is_multiple_of(8)
        {
            return None;
        }
        let ctrl = (n - 1) as u16;
        let mut body = Vec::with_capacity(10);
        body.extend_from_slice(&ctrl.to_le_bytes());
        body.extend_from_slice(&(table_offset | bar as u32).to_le_bytes());
        body.extend_from_slice(&(pba_offset | bar as u32).to_le_bytes());
        let mut wmask = vec![0u8; 10];
        wmask[1] = 0xc0;
        let cap_offset = config.add_capability(CAP_ID, &body, &wmask)?;
        let entries = vec![
            Entry {
                control: ENTRY_MASKED,
                ..Default::default()
            };
            n
        ];
        Some(Self {
            entries,
            enabled: false,
            function_masked: false,
            cap_offset,
            vectors,
            bad_accesses: 0,
        })
    }

    /// Bytes of BAR space the table needs.
    pub fn table_size(&self) -> u64 {
        self.entries.len() as u64 * ENTRY_SIZE
    }

    /// Bytes of BAR space the PBA needs.
    pub fn pba_size(&self) -> u64 {
        (self.entries.len() as u64).div_ceil(64) * 8
    }

    /// Config offset of the capability.
    pub fn cap_offset(&self) -> u8 {
        self.cap_offset
    }

    /// True when the guest enabled MSI-X.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Number of vectors.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when there are no vectors (never, for a constructed table).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The delivery backend.
    pub fn vectors(&self) -> &dyn MsiVectors {
        self.vectors.as_ref()
    }

    /// The vectors, to change (see [`MsiVectors::replace_eventfd`]).
    pub fn vectors_mut(&mut self) -> &mut dyn MsiVectors {
        self.vectors.as_mut()
    }

    /// Call after every config write: picks up enable and function-mask changes.
    pub fn config_written(&mut self, config: &PciConfiguration) {
        let ctrl = config.read(self.cap_offset as usize + 2, 2) as u16;
        let enabled = ctrl & CTRL_ENABLE != 0;
        let fmask = ctrl & CTRL_FUNCTION_MASK != 0;
        if enabled != self.enabled || fmask != self.function_masked {
            self.enabled = enabled;
            self.function_masked = fmask;
            for i in 0..self.entries.len() {
                self.apply(i);
            }
        }
    }

    fn message(&self, i: usize) -> Option<MsiMessage> {
        let e = self.entries[i];
        if !self.enabled || self.function_masked || e.control & ENTRY_MASKED != 0 {
            return None;
        }
        Some(MsiMessage {
            address: (e.addr_hi as u64) << 32 | e.addr_lo as u64,
            data: e.data,
        })
    }

    fn apply(&mut self, i: usize) {
        let m = self.message(i);
        self.vectors.configure(i, m);
    }

    /// Raises vector `i` (pending while masked). Out-of-range is ignored.
    pub fn trigger(&self, i: usize) {
        if i < self.entries.len() {
            self.vectors.trigger(i);
        }
    }

    /// Reads the table at `offset` (4- or 8-byte accesses).
    pub fn read_table(&mut self, offset: u64, data: &mut [u8]) {
        let idx = (offset / ENTRY_SIZE) as usize;
        let field = (offset % ENTRY_SIZE) as usize;
        let Some(e) = self.entries.get(idx) else {
            self.bad_accesses += 1;
            data.fill(0xff);
            return;
        };
        let words = [e.addr_lo, e.addr_hi, e.data, e.control];
        match (data.len(), field % 4) {
            (4, 0) => data.copy_from_slice(&words[field / 4].to_le_bytes()),
            (8, 0) if field.is_multiple_of(8) => {
                data[..4].copy_from_slice(&words[field / 4].to_le_bytes());
                data[4..].copy_from_slice(&words[field / 4 + 1].to_le_bytes());
            }
            _ => {
                self.bad_accesses += 1;
                data.fill(0xff);
            }
        }
    }

    /// Writes the table at `offset` (4- or 8-byte accesses).
    pub fn write_table(&mut self, offset: u64, data: &[u8]) {
        let idx = (offset / ENTRY_SIZE) as usize;
        let field = (offset % ENTRY_SIZE) as usize;
        if idx >= self.entries.len()
            || !field.is_multiple_of(4)
            || !(data.len() == 4 || data.len() == 8 && field.is_multiple_of(8))
        {
            self.bad_accesses += 1;
            return;
        }
        for (k, chunk) in data.chunks(4).enumerate() {
            let v = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
            let e = &mut self.entries[idx];
            match field / 4 + k {
                0 => e.addr_lo = v,
                1 => e.addr_hi = v,
                2 => e.data = v,
                _ => e.control = v & ENTRY_MASKED,
            }
        }
        self.apply(idx);
    }

    /// Reads the PBA at `offset` (4- or 8-byte accesses).
    pub fn read_pba(&mut self, offset: u64, data: &mut [u8]) {
        if !(data.len() == 4 || data.len() == 8)
            || !offset.is_multiple_of(data.len() as u64)
            || offset >= self.pba_size()
        {
            self.bad_accesses += 1;
            data.fill(0xff);
            return;
        }
        let first = (offset * 8) as usize;
        let mut bits = 0u64;
        for b in 0..data.len() * 8 {
            if first + b < self.entries.len() && self.vectors.pending(first + b) {
                bits |= 1 << b;
            }
        }
        data.copy_from_slice(&bits.to_le_bytes()[..data.len()]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pci::config::PciIds;
    use std::sync::{Arc, Mutex};

    type ConfigureLog = Arc<Mutex<Vec<(usize, Option<MsiMessage>)>>>;

    #[derive(Clone, Default)]
    struct Fake {
        log: ConfigureLog,
        fired: Arc<Mutex<Vec<usize>>>,
    }
    impl MsiVectors for Fake {
        fn len(&self) -> usize {
            4
        }
        fn configure(&mut self, i: usize, m: Option<MsiMessage>) {
            self.log.lock().unwrap().push((i, m));
        }
        fn trigger(&self, i: usize) {
            self.fired.lock().unwrap().push(i);
        }
        fn pending(&self, i: usize) -> bool {
            i == 2
        }
    }

    fn setup() -> (PciConfiguration, Msix, Fake) {
        let mut cfg = PciConfiguration::new(
            PciIds {
                vendor: 1,
                device: 2,
                subsystem_vendor: 0,
                subsystem: 0,
                revision: 0,
                class: 0,
            },
            0,
        );
        let fake = Fake::default();
        let m = Msix::new(&mut cfg, Box::new(fake.clone()), 1, 0, 0x800).unwrap();
        (cfg, m, fake)
    }

    #[test]
    fn capability_describes_table_and_pba() {
        let (cfg, m, _) = setup();
        let off = m.cap_offset() as usize;
        assert_eq!(cfg.read(off, 1), CAP_ID as u32);
        assert_eq!(cfg.read(off + 2, 2), 3, "table size - 1");
        assert_eq!(cfg.read(off + 4, 4), 1, "table offset 0, BIR 1");
        assert_eq!(cfg.read(off + 8, 4), 0x801);
    }

    #[test]
    fn vector_is_routed_only_when_enabled_and_unmasked() {
        let (mut cfg, mut m, fake) = setup();
        m.write_table(0, &0xfee0_0000u32.to_le_bytes());
        m.write_table(8, &0x41u32.to_le_bytes());
        m.write_table(12, &0u32.to_le_bytes());
        assert_eq!(
            fake.log.lock().unwrap().last().unwrap(),
            &(0, None),
            "MSI-X still disabled"
        );
        let off = m.cap_offset() as usize;
        cfg.write(off + 2, &0x8000u16.to_le_bytes());
        m.config_written(&cfg);
        let want = Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x41,
        });
        assert!(fake.log.lock().unwrap().contains(&(0, want)));
        cfg.write(off + 2, &0xc000u16.to_le_bytes());
        m.config_written(&cfg);
        assert_eq!(
            fake.log.lock().unwrap().last().unwrap().1,
            None,
            "function mask"
        );
        m.trigger(0);
        m.trigger(9);
        assert_eq!(*fake.fired.lock().unwrap(), vec![0]);
    }

    #[test]
    fn hostile_accesses_are_contained() {
        let (_, mut m, _) = setup();
        m.write_table(4 * ENTRY_SIZE, &[1, 2, 3, 4]);
        m.write_table(2, &[1, 2, 3, 4]);
        m.write_table(0, &[1, 2]);
        let mut d = [0u8; 4];
        m.read_table(1 << 20, &mut d);
        assert_eq!(d, [0xff; 4]);
        let mut pba = [0u8; 8];
        m.read_pba(0, &mut pba);
        assert_eq!(u64::from_le_bytes(pba), 1 << 2);
        m.read_pba(64, &mut pba);
        assert_eq!(m.bad_accesses, 5);
    }
}
