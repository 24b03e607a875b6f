//! Where an entry of the fixed-size tables in shared memory (`ratelimit`, `credits`,
//! `usagecount`) starts looking for its slot.

/// FNV-1a over `parts`, reduced to a slot of a table of `len` slots (at least one).
pub fn home(parts: &[&[u8]], len: usize) -> usize {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in parts.iter().flat_map(|p| p.iter()) {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    (h % len as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::home;

    #[test]
    fn the_same_bytes_find_the_same_slot_whatever_their_split() {
        assert_eq!(home(&[b"ab", b"c"], 97), home(&[b"a", b"bc"], 97));
        assert!(home(&[b"abc"], 7) < 7);
        // No bytes at all: FNV-1a's offset basis, reduced.
        assert_eq!(
            home(&[], 1_000),
            (0xcbf2_9ce4_8422_2325u64 % 1_000) as usize
        );
    }
}
