//! The shared-memory ring protocol between two threads of one process: the
//! same code runs in the probe guest, in `intervm-guest` inside Linux
//! guests, and in the VMM, over a region that every member maps.
//!
//! It moves 64 MiB twice: once copying (`try_send` / `try_recv`, each
//! frame copied into the ring and out of it), once in place
//! (`try_reserve` / `commit`, `try_borrow` / `release`: the sender writes
//! straight into the ring, the receiver reads where the frame lies).
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
    // Ring 0 -> 1 copies, ring 1 -> 0 works in place.
    for (from, to, in_place) in [(0, 1, false), (1, 0, true)] {
        let sender = std::thread::spawn(move || send(region, geo, from, to, in_place));
        let t0 = std::time::Instant::now();
        let stream = receive(region, geo, from, to, in_place);
        let secs = t0.elapsed().as_secs_f64();
        assert_eq!(stream, sender.join().expect("sender thread"));
        println!(
            "{}: moved {} MiB in {:.3} s ({:.0} MiB/s), stream checksum {stream:#018x} on both sides",
            if in_place { "in place" } else { "copying" },
            TOTAL >> 20,
            secs,
            (TOTAL >> 20) as f64 / secs
        );
    }
}

/// Sends TOTAL bytes of pattern on ring `from -> to`; returns the stream
/// checksum.
fn send(region: Region, geo: Geometry, from: u32, to: u32, in_place: bool) -> u64 {
    let mut p = region.producer(geo, from, to).expect("the sending end");
    let mut buf = vec![0u8; FRAME];
    let (mut sent, mut stream) = (0u64, 0u64);
    while sent < TOTAL {
        // None: the ring is full; a real member would poll or sleep.
        let sum = if in_place {
            match p.try_reserve(FRAME).expect("reserving") {
                Some(mut frame) => {
                    // The payload is produced where it will be read: in
                    // one piece, or two when the frame wraps the ring.
                    // SAFETY: the ring's only producer; only stored into.
                    let (a, b) = unsafe { frame.pieces_mut() };
                    fill_pattern(7, sent, a);
                    fill_pattern(7, sent + a.len() as u64, b);
                    Some(frame.commit(FRAME).expect("committing"))
                }
                None => None,
            }
        } else {
            fill_pattern(7, sent, &mut buf);
            p.try_send(&buf).expect("sending")
        };
        if let Some(sum) = sum {
            stream = fold(stream, sum);
            sent += FRAME as u64;
        }
    }
    stream
}

/// Receives TOTAL bytes on ring `from -> to`, checking each frame against
/// the pattern; returns the stream checksum.
fn receive(region: Region, geo: Geometry, from: u32, to: u32, in_place: bool) -> u64 {
    let mut c = region.consumer(geo, from, to).expect("the receiving end");
    let mut buf = vec![0u8; geo.max_payload() as usize];
    let mut want = vec![0u8; FRAME];
    let (mut got, mut stream) = (0u64, 0u64);
    while got < TOTAL {
        let frame = if in_place {
            match c.try_borrow().expect("a valid frame header") {
                Some(frame) => {
                    // Used where it lies; the release then checks that the
                    // bytes used are the ones the sender summed. Had they
                    // changed, what was computed from them would be thrown
                    // away with the error.
                    // SAFETY: only compared, and the comparison is taken
                    // as final only once the release succeeds (below).
                    let (a, b) = unsafe { frame.pieces() };
                    let n = frame.len();
                    fill_pattern(7, got, &mut want[..n]);
                    assert!(a == &want[..a.len()] && b == &want[a.len()..n]);
                    Some((n, frame.release().expect("an unchanged frame")))
                }
                None => None,
            }
        } else {
            // The checksum is computed while the frame is copied out, so
            // the sender cannot change the bytes after they were checked.
            let frame = c.try_recv(&mut buf).expect("a valid frame");
            if let Some((n, _)) = frame {
                fill_pattern(7, got, &mut want[..n]);
                assert_eq!(buf[..n], want[..n]);
            }
            frame
        };
        if let Some((n, sum)) = frame {
            stream = fold(stream, sum);
            got += n as u64;
        }
    }
    stream
}
