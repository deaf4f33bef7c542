//! Two port-I/O channel devices, driven register by register the way two
//! guests would drive them with `out`/`in`, without KVM: a VMM embedding
//! this crate only forwards its port exits to `MutDevicePio`.
//!
//! ```text
//! cargo run -p portio-channel --example two_devices
//! ```

use std::sync::Arc;

use intervm_protocol::portio::{
    result_name, CONTROL, C_SEND, DATA, DEFAULT_BASE, PEER, RESULT, RX_FROM, RX_LEN, STATUS,
    S_RX_READY,
};
use portio_channel::{PortioDevice, RingLink};
use shared_region::{Backing, SharedRegion, Transport};
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;
use vm_memory::{GuestAddress, GuestMemoryMmap};

type Dev = PortioDevice<RingLink, GuestMemoryMmap<()>>;

fn out32(d: &mut Dev, reg: u16, v: u32) {
    d.pio_write(PioAddress(DEFAULT_BASE), reg, &v.to_le_bytes());
}

fn in32(d: &mut Dev, reg: u16) -> u32 {
    let mut b = [0u8; 4];
    d.pio_read(PioAddress(DEFAULT_BASE), reg, &mut b);
    u32::from_le_bytes(b)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // The queues: one shared region (a memfd here; a /dev/shm object when
    // the members live in different VMM processes).
    let region = SharedRegion::open(&Backing::Memfd, 1 << 20)?;
    let transport = Transport::attach(Arc::new(region), 2)?;
    // Guest RAM is only read for descriptor-mode transfers.
    let ram = || GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]);
    let mut a = PortioDevice::new(RingLink::join(&transport, 0)?, ram()?);
    let mut b = PortioDevice::new(RingLink::join(&transport, 1)?, ram()?);

    // Member 0 sends: choose the peer, write the bytes, SEND.
    let msg = b"hello over port I/O";
    out32(&mut a, PEER, 1);
    for byte in msg {
        a.pio_write(PioAddress(DEFAULT_BASE), DATA, &[*byte]);
    }
    out32(&mut a, CONTROL, C_SEND);
    println!("member 0: SEND -> {}", result_name(in32(&mut a, RESULT)));

    // Member 1 polls STATUS, reads the length and the bytes.
    let status = in32(&mut b, STATUS);
    assert!(status & S_RX_READY != 0, "nothing arrived");
    let len = in32(&mut b, RX_LEN) as usize;
    let from = in32(&mut b, RX_FROM);
    let mut got = vec![0u8; len];
    for byte in got.iter_mut() {
        let mut one = [0u8; 1];
        b.pio_read(PioAddress(DEFAULT_BASE), DATA, &mut one);
        *byte = one[0];
    }
    println!(
        "member 1: {len} bytes from member {from}: {:?}",
        String::from_utf8_lossy(&got)
    );
    assert_eq!(&got, msg);
    println!(
        "exits a guest would have taken: {} on the sender, {} on the receiver",
        a.stats().accesses,
        b.stats().accesses
    );
    Ok(())
}
