//! The ivshmem device as a guest sees it, defined once for the devices
//! (`shmem-device`, `interrupt-doorbell`), the probe guest and the Linux
//! tool: PCI identity, BARs, the BAR0 registers and the doorbell encoding
//! (the values of QEMU's ivshmem specification).

/// PCI vendor ID (Red Hat / Qumranet).
pub const VENDOR: u16 = 0x1af4;
/// PCI device ID.
pub const DEVICE: u16 = 0x1110;
/// PCI subsystem vendor ID.
pub const SUBSYSTEM_VENDOR: u16 = 0x1af4;
/// PCI subsystem ID.
pub const SUBSYSTEM: u16 = 0x1100;
/// PCI revision.
pub const REVISION: u8 = 1;
/// PCI class code: a RAM controller.
pub const CLASS: u32 = 0x05_0000;

/// BAR holding the registers.
pub const REGS_BAR: usize = 0;
/// BAR holding the MSI-X table and PBA (doorbell personality only).
pub const MSIX_BAR: usize = 1;
/// BAR holding the shared memory.
pub const SHM_BAR: usize = 2;
/// Size of the register BAR.
pub const REGS_SIZE: u64 = 256;

/// Interrupt Mask register (INTx personality: bit 0 enables the line).
pub const INTR_MASK: u64 = 0x00;
/// Interrupt Status register (read clears it, and lowers INTx).
pub const INTR_STATUS: u64 = 0x04;
/// IVPosition register: this member's peer ID (read-only).
pub const IV_POSITION: u64 = 0x08;
/// Doorbell register (write-only): see [`doorbell`].
pub const DOORBELL: u64 = 0x0c;

/// The value to write to [`DOORBELL`] to raise `vector` of peer `peer`.
pub const fn doorbell(peer: u16, vector: u16) -> u32 {
    (peer as u32) << 16 | vector as u32
}

/// The peer and vector a [`DOORBELL`] write names.
pub const fn doorbell_target(value: u32) -> (u16, u16) {
    ((value >> 16) as u16, value as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doorbell_values_round_trip() {
        assert_eq!(doorbell(3, 1), 0x0003_0001);
        assert_eq!(doorbell_target(doorbell(0xfffe, 63)), (0xfffe, 63));
        assert_eq!(doorbell_target(u32::MAX), (0xffff, 0xffff));
    }
}
