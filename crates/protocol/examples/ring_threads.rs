//! The shared-memory ring protocol between two threads of one process: the
//! same code runs in the probe guest, in `intervm-guest` inside Linux
//! guests, and in the VMM, over a region that every member maps.
//!
//! ```text
//! cargo run -p intervm-protocol --example ring_threads
//! ```

use intervm_protocol::ring::{fill_pattern, fold, Geometry, Region};

const REGION: usize = 1 << 20;
const TOTAL: u64 = 64 << 20;
const FRAME: usize = 16 << 10;

fn main() {
    // Any memory both sides can reach works; a VMM uses the BAR2 mapping.
    // u64 elements keep the region 8-byte aligned, as the ring needs.
    let mem: &'static mut [u64] = Box::leak(vec![0u64; REGION / 8].into_boxed_slice());
    // SAFETY: `mem` is REGION bytes, 8-byte aligned, and lives forever.
    let region = unsafe { Region::new(mem.as_mut_ptr().cast(), REGION as u64) };
    let geo = Geometry::fit(2, REGION as u64).expect("a 1 MiB region fits two members");
    region.init(geo).expect("formatting the region");
    println!(
        "{} members, {} rings of {} KiB",
        geo.members,
        geo.ring_count(),
        geo.ring_bytes >> 10
    );

    let sender = std::thread::spawn(move || {
        let mut p = region.producer(geo, 0, 1).expect("ring 0 -> 1");
        let mut buf = vec![0u8; FRAME];
        let (mut sent, mut stream) = (0u64, 0u64);
        while sent < TOTAL {
            fill_pattern(7, sent, &mut buf);
            // None: the ring is full; a real member would poll or sleep.
            if let Some(sum) = p.try_send(&buf).expect("sending") {
                stream = fold(stream, sum);
                sent += FRAME as u64;
            }
        }
        stream
    });

    let mut c = region.consumer(geo, 0, 1).expect("ring 0 -> 1");
    let mut buf = vec![0u8; geo.max_payload() as usize];
    let (mut got, mut stream) = (0u64, 0u64);
    let t0 = std::time::Instant::now();
    while got < TOTAL {
        // Each frame's checksum is computed while it is copied out, so the
        // sender cannot change the bytes after they were checked; the
        // stream checksum folds them in order.
        if let Some((n, sum)) = c.try_recv(&mut buf).expect("a valid frame") {
            stream = fold(stream, sum);
            got += n as u64;
        }
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(stream, sender.join().expect("sender thread"));
    println!(
        "moved {} MiB in {:.3} s ({:.0} MiB/s), stream checksum {stream:#018x} on both sides",
        TOTAL >> 20,
        secs,
        (TOTAL >> 20) as f64 / secs
    );
}
