//! The port-I/O channel's register state machine against a hostile guest:
//! any sequence of reads and writes, at any offset and width, on two
//! members that share one ring region (so half-sent messages, descriptor
//! transfers into and out of guest RAM and stale peers all occur). Nothing
//! may panic, and no access may reach outside guest RAM.

#![no_main]

use std::sync::Arc;

use intervm_protocol::portio::PORT_COUNT;
use libfuzzer_sys::fuzz_target;
use portio_channel::{PortioDevice, RingLink};
use shmem_device::{Backing, SharedRegion, Transport};
use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_memory::{GuestAddress, GuestMemoryMmap};

/// Guest RAM: 0..256 KiB and 1 MiB..1.25 MiB, with a hole between.
fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), 256 << 10),
        (GuestAddress(1 << 20), 256 << 10),
    ])
    .expect("guest memory")
}

fuzz_target!(|data: &[u8]| {
    // A fresh region each time: no state leaks between inputs.
    let region = SharedRegion::open(&Backing::Memfd, 256 << 10).expect("region");
    let Ok(t) = Transport::attach(Arc::new(region), 2) else {
        return;
    };
    let (Ok(a), Ok(b)) = (RingLink::join(&t, 0), RingLink::join(&t, 1)) else {
        return;
    };
    let mut devs = [
        PortioDevice::new(a, memory()),
        PortioDevice::new(b, memory()),
    ];
    for op in data.chunks_exact(7) {
        let dev = &mut devs[(op[0] & 1) as usize];
        let write = op[0] & 2 != 0;
        let width = [1usize, 2, 4, 3][((op[0] >> 2) & 3) as usize];
        let offset = (op[1] as u16 % (PORT_COUNT + 2)) as PioAddressOffset;
        let value = u32::from_le_bytes([op[2], op[3], op[4], op[5]]).to_le_bytes();
        let base = PioAddress(intervm_protocol::portio::DEFAULT_BASE);
        // A `rep` form: the same access repeated.
        for _ in 0..=(op[6] & 7) {
            if write {
                dev.pio_write(base, offset, &value[..width]);
            } else {
                let mut buf = [0u8; 4];
                dev.pio_read(base, offset, &mut buf[..width]);
            }
        }
    }
    let _ = devs[0].stats();
});
