//! The debug port: a scratch register and a power-off-with-code register.
//!
//! | offset | width | access | meaning |
//! |---|---|---|---|
//! | 0 | 1, 2, 4 | read/write | scratch: reads return the last value written |
//! | 4 | 1, 2, 4 | write | power off; the value is the VM's exit code |
//!
//! Other offsets and widths read as all-ones and ignore writes.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;

/// Receives the exit request of a [`DebugDevice`].
pub trait ExitRequest: Send {
    /// The guest asked to power off with `code`.
    fn request_exit(&self, code: u32);
}

/// The debug device (default base `0x500`, 8 ports).
pub struct DebugDevice<E: ExitRequest> {
    scratch: u32,
    exit: E,
    /// Accesses at unknown offsets or widths (ignored).
    pub bad_accesses: u64,
}

impl<E: ExitRequest> DebugDevice<E> {
    /// A device reporting exits to `exit`.
    pub fn new(exit: E) -> Self {
        Self {
            scratch: 0,
            exit,
            bad_accesses: 0,
        }
    }
}

fn width_ok(len: usize) -> bool {
    matches!(len, 1 | 2 | 4)
}

impl<E: ExitRequest> MutDevicePio for DebugDevice<E> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if offset == 0 && width_ok(data.len()) {
            data.copy_from_slice(&self.scratch.to_le_bytes()[..data.len()]);
        } else {
            self.bad_accesses += 1;
            data.fill(0xff);
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if !width_ok(data.len()) {
            self.bad_accesses += 1;
            return;
        }
        let mut b = [0u8; 4];
        b[..data.len()].copy_from_slice(data);
        let v = u32::from_le_bytes(b);
        match offset {
            0 => self.scratch = v,
            4 => self.exit.request_exit(v),
            _ => self.bad_accesses += 1,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Recorder(Arc<Mutex<Vec<u32>>>);
    impl ExitRequest for Recorder {
        fn request_exit(&self, code: u32) {
            self.0.lock().unwrap().push(code);
        }
    }

    #[test]
    fn scratch_echoes_and_exit_reports_the_code() {
        let r = Recorder::default();
        let mut d = DebugDevice::new(r.clone());
        let base = PioAddress(0x500);
        d.pio_write(base, 0, &0x1234_5678u32.to_le_bytes());
        let mut v = [0u8; 4];
        d.pio_read(base, 0, &mut v);
        assert_eq!(u32::from_le_bytes(v), 0x1234_5678);
        let mut w = [0u8; 2];
        d.pio_read(base, 0, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x5678);
        d.pio_write(base, 4, &[7]);
        assert_eq!(*r.0.lock().unwrap(), vec![7]);
    }

    #[test]
    fn bad_offsets_and_widths_are_ignored() {
        let r = Recorder::default();
        let mut d = DebugDevice::new(r.clone());
        let base = PioAddress(0x500);
        d.pio_write(base, 4, &[1, 2, 3]);
        d.pio_write(base, 6, &[1]);
        let mut v = [0u8; 1];
        d.pio_read(base, 4, &mut v);
        assert_eq!(v, [0xff]);
        assert!(r.0.lock().unwrap().is_empty());
        assert_eq!(d.bad_accesses, 3);
    }
}
