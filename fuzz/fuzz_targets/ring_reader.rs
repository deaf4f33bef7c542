//! The shared-region ring code against a hostile peer: a well-formed
//! region whose words another member overwrites at will, between sends,
//! receives and liveness checks. Nothing may panic, hang or read or write
//! outside the region; errors are the only acceptable answer to garbage.

#![no_main]

use intervm_protocol::ring::{Geometry, Liveness, Region, RING_HEADER_BYTES};
use libfuzzer_sys::fuzz_target;

const REGION_BYTES: usize = 64 << 10;

fuzz_target!(|data: &[u8]| {
    let Some((&first, mut ops)) = data.split_first() else {
        return;
    };
    // Page-aligned backing, as a mapping would be.
    let mut words = vec![0u64; REGION_BYTES / 8 + 512];
    let base = words.as_mut_ptr() as usize;
    let base = (base + 4095) & !4095;
    // SAFETY: `base..base + REGION_BYTES` lies inside `words` (512 spare
    // words cover the alignment), which outlives the region below.
    let region = unsafe { Region::new(base as *mut u8, REGION_BYTES as u64) };
    let members = 2 + (first % 3) as u32;
    let Ok(geo) = Geometry::fit(members, REGION_BYTES as u64) else {
        return;
    };
    region.init(geo).expect("a fitted geometry initialises");
    let mut out = vec![0u8; 8192];
    let mut msg = vec![0u8; 8192];
    while let Some((&op, rest)) = ops.split_first() {
        ops = rest;
        let arg = |ops: &mut &[u8], n: usize| -> Option<Vec<u8>> {
            let (a, r) = ops.split_at_checked(n)?;
            *ops = r;
            Some(a.to_vec())
        };
        let Some(a) = arg(&mut ops, 2) else { return };
        let (from, to) = (a[0] as u32 % (members + 1), a[1] as u32 % (members + 1));
        match op % 10 {
            // The hostile peer writes one aligned word: anywhere, or in
            // the header of ring (from, to); a raw value, one near 2^64, a
            // small one, or the word's value moved by a little.
            0 => {
                let Some(p) = arg(&mut ops, 11) else { return };
                let raw = u64::from_le_bytes(p[3..11].try_into().unwrap());
                // The producer's header of ring (from, to), or the
                // consumer's end of it (tail and flag lines, 16 words).
                let ring = match p[2] & 1 {
                    0 => region
                        .ring_offset(&geo, from, to)
                        .map(|o| (o, RING_HEADER_BYTES)),
                    _ => region.consumer_offset(&geo, from, to).map(|o| (o, 128)),
                };
                let word = match ring {
                    Ok((at, len)) if p[0] & 1 != 0 => {
                        (at / 8) as usize + p[1] as usize % (len as usize / 8)
                    }
                    _ => u16::from_le_bytes([p[1], p[2]]) as usize % (REGION_BYTES / 8),
                };
                let at = (base as *mut u64).wrapping_add(word);
                // SAFETY: `word` is inside the region; an aligned u64
                // load of plain memory.
                let old = unsafe { at.read_volatile() };
                let v = match p[0] >> 1 & 3 {
                    0 => raw,
                    1 => u64::MAX - (raw & 0xffff),
                    2 => raw & 0xffff,
                    _ => old.wrapping_add((raw & 0x1ffff).wrapping_sub(0x10000)),
                };
                // SAFETY: as above; the peer's aligned store.
                unsafe { at.write_volatile(v) };
            }
            1 => {
                let Some(l) = arg(&mut ops, 2) else { return };
                let len = u16::from_le_bytes([l[0], l[1]]) as usize % msg.len();
                msg[..len].fill(l[0]);
                if let Ok(g) = region.geometry() {
                    if let Ok(mut p) = region.producer(g, from, to) {
                        let _ = p.free();
                        let _ = p.try_send(&msg[..len]);
                    }
                }
            }
            2 => {
                if let Ok(g) = region.geometry() {
                    if let Ok(mut c) = region.consumer(g, from, to) {
                        let _ = c.available();
                        for _ in 0..4 {
                            if !matches!(c.try_recv(&mut out), Ok(Some(_))) {
                                break;
                            }
                        }
                    }
                }
            }
            3 => {
                if let Ok(g) = region.geometry() {
                    let _ = region.ring_state(&g, from, to);
                    let _ = region.ring_offset(&g, from, to);
                    let _ = region.consumer_offset(&g, from, to);
                    let _ = g.guest_read_only(from);
                    let _ = region.member_state(&g, from);
                    let _ = region.doorbell_id(&g, from);
                    let _ = region.may_prepare_for(&g, to);
                }
            }
            4 => {
                if let Ok(g) = region.geometry() {
                    let mut l = Liveness::new(&region, &g, from, 10, 0);
                    let _ = l.check(&region, &g, 5);
                    let _ = l.check(&region, &g, 50);
                }
            }
            // Generations (the port-I/O VMMs' restarts): a producer that
            // announces itself and answers, a consumer that asks and
            // follows, against whatever the peer wrote.
            6 => {
                let Some(n) = arg(&mut ops, 1) else { return };
                let gen = n[0] as u64 % 4;
                if let Ok(g) = region.geometry() {
                    if let Ok(mut p) = region.producer(g, from, to) {
                        p.announce(gen);
                        let _ = p.answer_sync(|id| id % 2 == 0);
                        let _ = p.try_send(&msg[..n[0] as usize]);
                    }
                }
            }
            7 => {
                let Some(n) = arg(&mut ops, 1) else { return };
                let gen = n[0] as u64 % 4;
                if let Ok(g) = region.geometry() {
                    if let Ok(mut c) = region.consumer(g, from, to) {
                        if n[0] & 0x80 != 0 {
                            c.request_sync(gen);
                        }
                        for _ in 0..4 {
                            let _ = c.drop_other_generations(gen);
                            match c.follow(gen) {
                                Ok(intervm_protocol::ring::Follow::Ready)
                                | Ok(intervm_protocol::ring::Follow::Switched(_)) => {
                                    if !matches!(c.try_recv(&mut out), Ok(Some(_))) {
                                        break;
                                    }
                                }
                                _ => break,
                            }
                        }
                    }
                }
            }
            // Frames filled and read in place: whatever the peer wrote,
            // every piece handed out lies inside the region.
            8 => {
                let Some(l) = arg(&mut ops, 2) else { return };
                let len = u16::from_le_bytes([l[0], l[1]]) as usize % msg.len();
                if let Ok(g) = region.geometry() {
                    if let Ok(mut p) = region.producer(g, from, to) {
                        if let Ok(Some(mut r)) = p.try_reserve(len) {
                            // SAFETY: the only producer of the ring in this
                            // process (made above); only stored into.
                            let (a, b) = unsafe { r.pieces_mut() };
                            inside(base, a);
                            inside(base, b);
                            a.fill(l[1]);
                            let _ = r.commit(len / (1 + l[1] as usize % 2));
                        }
                    }
                }
            }
            9 => {
                if let Ok(g) = region.geometry() {
                    if let Ok(mut c) = region.consumer(g, from, to) {
                        for _ in 0..4 {
                            let Ok(Some(b)) = c.try_borrow() else { break };
                            // SAFETY: only their addresses are looked at.
                            let (x, y) = unsafe { b.pieces() };
                            inside(base, x);
                            inside(base, y);
                            if b.release().is_err() {
                                break;
                            }
                        }
                    }
                }
            }
            _ => {
                if let Ok(g) = region.geometry() {
                    let _ = region.set_heartbeat(&g, from, to as u64);
                    let _ = region.set_ready(&g, from, to as u64);
                    let _ = region.heartbeat(&g, to);
                    let _ = region.ready(&g, to);
                }
            }
        }
    }
    drop(words);
});

/// Fails unless `piece` lies within the region mapped at `base`.
fn inside(base: usize, piece: &[u8]) {
    let at = piece.as_ptr() as usize;
    assert!(
        at >= base && at + piece.len() <= base + REGION_BYTES,
        "a piece of {} bytes at region offset {:#x} leaves the region",
        piece.len(),
        at.wrapping_sub(base)
    );
}
