//! Two members of one region, in this process: format a memfd region for
//! two, join as both, and pass a few checksummed frames from member 0 to
//! member 1 over the ring protocol, as two VMs' guests would. No KVM
//! needed.
//!
//! Run: `cargo run -p shared-region --example two_members`

use std::sync::Arc;

use shared_region::{Backing, SharedRegion, Transport};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // An anonymous memfd; `Backing::Shm("name")` would let another process
    // (another VMM, QEMU, a host tool) open the same bytes.
    let region = Arc::new(SharedRegion::open(&Backing::Memfd, 1 << 20)?);
    let transport = Transport::attach(region, 2)?;
    let geo = transport.geometry();
    println!(
        "region of {} KiB formatted for {} members, rings of {} KiB",
        transport.region().size() >> 10,
        geo.members,
        geo.ring_bytes >> 10
    );
    // Joining marks a member alive and starts its heartbeat; leaving (the
    // drop) marks it gone, so its peers stop waiting for it.
    let (_a, _b) = (transport.join(0)?, transport.join(1)?);
    let ring = transport.ring_region();
    let mut tx = ring.producer(geo, 0, 1)?;
    let mut rx = ring.consumer(geo, 0, 1)?;
    for msg in ["hello", "from", "member 0"] {
        tx.try_send(msg.as_bytes())?.ok_or("the ring is full")?;
    }
    let mut buf = vec![0u8; geo.max_payload() as usize];
    while let Some((len, sum)) = rx.try_recv(&mut buf)? {
        println!(
            "member 1 got {:?} (checksum {sum:#018x})",
            String::from_utf8_lossy(&buf[..len])
        );
    }
    Ok(())
}
