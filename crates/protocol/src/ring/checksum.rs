//! The frame checksum and the stream checksum that folds them: four
//! interleaved Fletcher lanes, computed while a frame is copied.

/// Running state of [`checksum`], for computing it while copying: four
/// Fletcher lanes (word `i` of the message goes to lane `i % 4`), so that
/// the compiler can keep the lanes in vector registers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Fletcher {
    a: [u64; 4],
    b: [u64; 4],
    words: usize,
    len: u64,
}

const SUM_MUL: u64 = 0x9e37_79b9_7f4a_7c15;

impl Fletcher {
    pub(super) fn new(len: usize) -> Self {
        Self {
            a: [SUM_MUL, SUM_MUL ^ 1, SUM_MUL ^ 2, SUM_MUL ^ 3],
            b: [0; 4],
            words: 0,
            len: len as u64,
        }
    }

    #[inline(always)]
    fn word(&mut self, w: u64) {
        let l = self.words & 3;
        self.a[l] = self.a[l].wrapping_add(w);
        self.b[l] = self.b[l].wrapping_add(self.a[l]);
        self.words += 1;
    }

    #[inline(always)]
    fn block(&mut self, w: [u64; 4]) {
        for (l, w) in w.into_iter().enumerate() {
            self.a[l] = self.a[l].wrapping_add(u64::from_le(w));
            self.b[l] = self.b[l].wrapping_add(self.a[l]);
        }
        self.words += 4;
    }

    pub(super) fn finish(self) -> u64 {
        let mut h = self.len;
        for l in 0..4 {
            h = (h ^ self.a[l]).wrapping_mul(SUM_MUL);
            h = (h ^ self.b[l]).wrapping_mul(SUM_MUL);
        }
        h ^ (h >> 29)
    }

    /// Copies `n` bytes from `src` to `dst` and sums them in the same pass
    /// (each word is summed as it was loaded, so what is summed is exactly
    /// what was stored). `n` must be a multiple of 8 unless this is the last
    /// piece of the message.
    ///
    /// # Safety
    /// `src` readable and `dst` writable for `n` bytes; no overlap.
    #[inline(always)]
    pub(super) unsafe fn copy(&mut self, dst: *mut u8, src: *const u8, n: usize) {
        // SAFETY: the caller's guarantees, passed on.
        unsafe { self.pass::<true>(dst, src, n) }
    }

    /// Sums `n` bytes at `src` where they lie (a frame borrowed or filled
    /// in place). `n` must be a multiple of 8 unless this is the last piece
    /// of the message.
    ///
    /// # Safety
    /// `src` readable for `n` bytes.
    #[inline(always)]
    pub(super) unsafe fn sum(&mut self, src: *const u8, n: usize) {
        // SAFETY: `pass::<false>` never writes through `dst`.
        unsafe { self.pass::<false>(core::ptr::null_mut(), src, n) }
    }

    /// One pass over `n` bytes at `src`, summing each word as it was
    /// loaded and, with `STORE`, storing it at `dst`.
    ///
    /// # Safety
    /// `src` readable for `n` bytes; with `STORE`, `dst` writable for `n`
    /// bytes, not overlapping `src`.
    #[inline(always)]
    unsafe fn pass<const STORE: bool>(&mut self, dst: *mut u8, src: *const u8, n: usize) {
        let words = n / 8;
        let mut i = 0;
        while i < words && self.words & 3 != 0 {
            // SAFETY: bytes `i * 8..i * 8 + 8` lie within the first
            // `words * 8 <= n` bytes of both buffers; unaligned access is
            // allowed.
            unsafe {
                let w = core::ptr::read_unaligned(src.add(i * 8) as *const u64);
                if STORE {
                    core::ptr::write_unaligned(dst.add(i * 8) as *mut u64, w);
                }
                self.word(u64::from_le(w));
            }
            i += 1;
        }
        while i + 4 <= words {
            // SAFETY: bytes `i * 8..i * 8 + 32` lie within the first
            // `words * 8` bytes (`i + 4 <= words`); unaligned is allowed.
            unsafe {
                let w = core::ptr::read_unaligned(src.add(i * 8) as *const [u64; 4]);
                if STORE {
                    core::ptr::write_unaligned(dst.add(i * 8) as *mut [u64; 4], w);
                }
                self.block(w);
            }
            i += 4;
        }
        while i < words {
            // SAFETY: as in the first loop.
            unsafe {
                let w = core::ptr::read_unaligned(src.add(i * 8) as *const u64);
                if STORE {
                    core::ptr::write_unaligned(dst.add(i * 8) as *mut u64, w);
                }
                self.word(u64::from_le(w));
            }
            i += 1;
        }
        let rest = n % 8;
        if rest > 0 {
            let mut w = [0u8; 8];
            // SAFETY: the last `rest < 8` bytes of the `n`-byte buffers,
            // through a local 8-byte array.
            unsafe {
                core::ptr::copy_nonoverlapping(src.add(words * 8), w.as_mut_ptr(), rest);
                if STORE {
                    core::ptr::copy_nonoverlapping(w.as_ptr(), dst.add(words * 8), rest);
                }
            }
            self.word(u64::from_le_bytes(w));
        }
    }
}

/// A 64-bit checksum of four interleaved Fletcher sums (word `i` in lane
/// `i % 4`), mixed with the length: one add chain per lane, so it runs at
/// memory speed; order sensitive; different for different lengths.
pub fn checksum(data: &[u8]) -> u64 {
    let mut f = Fletcher::new(data.len());
    let mut chunks = data.chunks_exact(32);
    for c in &mut chunks {
        let mut w = [0u64; 4];
        for (l, x) in w.iter_mut().enumerate() {
            let b = &c[l * 8..l * 8 + 8];
            *x = u64::from_ne_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
        }
        f.block(w);
    }
    let mut words = chunks.remainder().chunks_exact(8);
    for c in &mut words {
        f.word(u64::from_le_bytes([
            c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7],
        ]));
    }
    let rest = words.remainder();
    if !rest.is_empty() {
        let mut w = [0u8; 8];
        w[..rest.len()].copy_from_slice(rest);
        f.word(u64::from_le_bytes(w));
    }
    f.finish()
}

/// Folds a frame checksum into a running stream checksum. Order sensitive
/// and non-linear (a multiply per frame), so a payload that repeats does not
/// cancel itself out the way a plain rotate-and-xor would.
pub fn fold(stream: u64, frame: u64) -> u64 {
    (stream.rotate_left(23) ^ frame)
        .wrapping_mul(0x9e37_79b9_7f4a_7c15)
        .wrapping_add(1)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use crate::ring::fill_pattern;
    use std::vec;
    use std::vec::Vec;

    #[test]
    fn copying_checksum_equals_plain_checksum_at_any_split() {
        let mut data = vec![0u8; 1000];
        fill_pattern(3, 0, &mut data);
        for len in [0usize, 1, 7, 8, 9, 31, 32, 33, 100, 1000] {
            let msg = &data[..len];
            for split in (0..=len).step_by(8) {
                let mut out = vec![0u8; len];
                let mut f = Fletcher::new(len);
                // SAFETY: both buffers hold `len` bytes.
                unsafe {
                    f.copy(out.as_mut_ptr(), msg.as_ptr(), split);
                    f.copy(
                        out.as_mut_ptr().add(split),
                        msg.as_ptr().add(split),
                        len - split,
                    );
                }
                assert_eq!(f.finish(), checksum(msg), "len {len} split {split}");
                assert_eq!(out, msg);
            }
        }
        let mut swapped = data[..64].to_vec();
        swapped.swap(0, 8);
        assert_ne!(checksum(&swapped), checksum(&data[..64]));
        assert_ne!(checksum(&data[..8]), checksum(&data[..9]));
    }

    #[test]
    fn stream_checksums_see_order_and_repetition() {
        let frames: Vec<u64> = (0..256u64).map(|i| checksum(&i.to_le_bytes())).collect();
        let run = |n: usize| frames.iter().cycle().take(n).fold(0, |s, f| fold(s, *f));
        let (one, two, four) = (run(256), run(512), run(1024));
        assert!(one != two && two != four && one != four && two != 0 && four != 0);
        let swapped = [frames[1], frames[0]].iter().fold(0, |s, f| fold(s, *f));
        assert_ne!(swapped, run(2));
    }
}
