//! Host-side costs with no guest involved: the port-I/O device's register
//! dispatch (a 64-byte message written with 32-bit accesses, sent, then read
//! back on the peer's device) and the doorbell fallback path (one write of
//! the Doorbell register signalling the peer's eventfd).

use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};
use intervm_protocol::portio::{CONTROL, C_DISCARD_RX, C_SEND, DATA, RX_LEN};
use portio_channel::{PortioDevice, RingLink};
use shmem_device::{Backing, SharedRegion, Transport};
use vm_device::bus::PioAddress;
use vm_device::MutDevicePio;
use vm_memory::{GuestAddress, GuestMemoryMmap};

fn portio(c: &mut Criterion) {
    let t = Transport::attach(
        Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).expect("region")),
        2,
    )
    .expect("attach");
    let mem = || GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
    let mut a = PortioDevice::new(RingLink::join(&t, 0).expect("join"), mem());
    let mut b = PortioDevice::new(RingLink::join(&t, 1).expect("join"), mem());
    let base = PioAddress(0x5000);
    c.bench_function("portio_dispatch/64B_message_out_send_in", |bench| {
        bench.iter(|| {
            for i in 0..16u32 {
                a.pio_write(base, DATA, &i.to_le_bytes());
            }
            a.pio_write(base, CONTROL, &C_SEND.to_le_bytes());
            let mut w = [0u8; 4];
            b.pio_read(base, RX_LEN, &mut w);
            for _ in 0..16 {
                b.pio_read(base, DATA, &mut w);
            }
            b.pio_write(base, CONTROL, &C_DISCARD_RX.to_le_bytes());
        })
    });
}

fn doorbell(c: &mut Criterion) {
    use interrupt_doorbell::device::{new_eventfds, DOORBELL};
    use vmm_core::pci::PciDevice;
    if let Some(why) = vmm_core::host::kvm_unavailable_reason() {
        eprintln!("SKIPPED doorbell_fallback: {why}");
        return;
    }
    let vm = vmm_core::Vm::new(&vmm_core::VmConfig::new("bench", 16 << 20)).expect("VM");
    let region = Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20).expect("region"));
    let own = new_eventfds(1).expect("eventfd");
    let peer = new_eventfds(1).expect("eventfd");
    let probe = peer[0].try_clone().expect("eventfd");
    let dev = interrupt_doorbell::IvshmemDoorbell::new(&vm, region, 0, own, false).expect("device");
    dev.lock().expect("lock").add_peer(1, peer);
    let ring = (1u32 << 16).to_le_bytes();
    c.bench_function("doorbell_fallback/register_write_to_eventfd", |bench| {
        bench.iter(|| {
            dev.lock().expect("lock").bar_write(0, DOORBELL, &ring);
            let _ = probe.read();
        })
    });
}

criterion_group!(benches, portio, doorbell);
criterion_main!(benches);
