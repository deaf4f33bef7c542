//! The deterministic test payload every end can generate from names.

/// The test-pattern seed of `sender`'s payload on `channel`, so that every
/// end (the launcher, probe guests, `intervm-guest`) can compute it from
/// names alone: FNV-1a of `channel`, a NUL, and `sender`.
pub fn seed_for(channel: &str, sender: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in channel.bytes().chain([0]).chain(sender.bytes()) {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// Deterministic test payload: byte `i` of the stream seeded by `seed`.
/// Fills `buf` with the bytes at stream offset `pos`.
pub fn fill_pattern(seed: u64, pos: u64, buf: &mut [u8]) {
    // A counter hashed per 8-byte word (splitmix64), cheap and position
    // addressable, so any chunk can be generated independently.
    let mut i = 0usize;
    while i < buf.len() {
        let word = (pos + i as u64) / 8;
        let mut z = seed.wrapping_add(word.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        let bytes = z.to_le_bytes();
        let skip = ((pos + i as u64) % 8) as usize;
        let n = (8 - skip).min(buf.len() - i);
        buf[i..i + n].copy_from_slice(&bytes[skip..skip + n]);
        i += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ring::checksum;

    #[test]
    fn pattern_is_position_addressable() {
        let mut whole = [0u8; 64];
        fill_pattern(3, 100, &mut whole);
        let mut part = [0u8; 13];
        fill_pattern(3, 100 + 21, &mut part);
        assert_eq!(&whole[21..34], &part[..]);
        assert_ne!(checksum(&whole[..8]), checksum(&whole[..9]));
        assert_ne!(checksum(b"ab"), checksum(b"ba"));
    }
}
