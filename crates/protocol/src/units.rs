//! Sizes as people write them, shared by the launcher, the guest tools and
//! the bench harness.

/// Parses `"4096"`, `"4K"`, `"2 M"` or `"1g"` (binary multiples) into bytes.
/// `None` for anything else, or on overflow.
pub fn parse_size(s: &str) -> Option<u64> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 'K' | 'k')) => (&t[..i], 1u64 << 10),
        Some((i, 'M' | 'm')) => (&t[..i], 1 << 20),
        Some((i, 'G' | 'g')) => (&t[..i], 1 << 30),
        _ => (t, 1),
    };
    num.trim()
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn suffixes_spaces_and_overflow() {
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("4K"), Some(4 << 10));
        assert_eq!(parse_size(" 2 M "), Some(2 << 20));
        assert_eq!(parse_size("1g"), Some(1 << 30));
        assert_eq!(parse_size("12Q"), None);
        assert_eq!(parse_size("M"), None);
        assert_eq!(parse_size("99999999999G"), None);
    }
}
