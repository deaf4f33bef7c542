//! Powering the guest off with an exit status.
//!
//! Under intervm the debug device (`intervm_protocol::probe::DEBUG_PORT_BASE`)
//! takes a status at offset 4 and ends the VM with it, so `intervm run`
//! exits with the guest's status. Elsewhere (QEMU, another VMM) the port is
//! not there; the tool then asks the kernel to reboot, which ends a VM that
//! runs with `-no-reboot` (QEMU) or `reboot=t` (intervm), and the status is
//! only on the console.

use intervm_protocol::probe::{
    DEBUG_EXIT_OFFSET, DEBUG_PORT_BASE, DEBUG_PORT_LEN, DEBUG_SCRATCH_OFFSET,
};

use crate::portio::{Hardware, Ports};
use crate::Error;

/// What the scratch register is tested with.
const MARK: u32 = 0x1e7e_4a11;

/// Is intervm's debug device behind `ports`? (Its scratch register keeps a
/// value; a missing device reads as all-ones.)
pub fn has_debug_device(ports: &mut dyn Ports) -> bool {
    ports.output(DEBUG_PORT_BASE + DEBUG_SCRATCH_OFFSET, 4, MARK);
    ports.input(DEBUG_PORT_BASE + DEBUG_SCRATCH_OFFSET, 4) == MARK
}

/// Waits until what was written to the console has left through the
/// serial port. The VM ends at the debug-port write, and the tty layer
/// sends buffered output on the port's interrupts, so a line written just
/// before (init's "intervm-init: status N") was lost now and then on a
/// busy host. Not a terminal (or no console): nothing to wait for.
fn drain_console() {
    use std::os::fd::AsRawFd;
    for fd in [libc::STDOUT_FILENO, libc::STDERR_FILENO] {
        // SAFETY: tcdrain on a descriptor number; an invalid or non-tty
        // one only returns an error.
        unsafe { libc::tcdrain(fd) };
    }
    if let Ok(console) = std::fs::OpenOptions::new().write(true).open("/dev/console") {
        // SAFETY: as above, on a descriptor this function owns.
        unsafe { libc::tcdrain(console.as_raw_fd()) };
    }
}

/// Ends the VM with `status`: through intervm's debug device if there is
/// one, else by rebooting. Returns only if both failed.
pub fn poweroff(status: u8) -> Error {
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
    drain_console();
    if let Ok(mut ports) = Hardware::open_range(DEBUG_PORT_BASE, DEBUG_PORT_LEN) {
        if has_debug_device(&mut ports) {
            ports.output(DEBUG_PORT_BASE + DEBUG_EXIT_OFFSET, 4, status as u32);
            // The VMM stops the vCPUs; nothing after this runs.
            std::thread::sleep(std::time::Duration::from_secs(5));
        }
    }
    // SAFETY: reboot(2) with a valid command; it returns only on failure.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    Error::Io(
        "reboot(2) (must run as root)".into(),
        std::io::Error::last_os_error(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A port space with (or without) the debug device's scratch register.
    struct Fake {
        device: bool,
        scratch: u32,
    }

    impl Ports for Fake {
        fn input(&mut self, port: u16, _: usize) -> u32 {
            if self.device && port == DEBUG_PORT_BASE {
                self.scratch
            } else {
                u32::MAX
            }
        }
        fn output(&mut self, port: u16, _: usize, v: u32) {
            if self.device && port == DEBUG_PORT_BASE {
                self.scratch = v;
            }
        }
        fn rep_out(&mut self, _: u16, _: &[u8], _: usize) {}
        fn rep_in(&mut self, _: u16, _: &mut [u8], _: usize) {}
        fn dma_buffer(&mut self, _: usize) -> Result<crate::portio::DmaBuf, Error> {
            Err(Error::Usage("no DMA here".into()))
        }
    }

    #[test]
    fn finds_the_debug_device_only_where_it_is() {
        assert!(has_debug_device(&mut Fake {
            device: true,
            scratch: 0
        }));
        assert!(!has_debug_device(&mut Fake {
            device: false,
            scratch: 0
        }));
    }
}
