//! Strict parsing of textual UUIDs, as found in a JWT's `sub` claim.

/// Parses a canonical UUID (`8-4-4-4-12` hex digits, any case). Anything else is None: a
/// subject that is not a UUID identifies nobody.
pub fn parse(s: &str) -> Option<[u8; 16]> {
    let b = s.as_bytes();
    if b.len() != 36 {
        return None;
    }
    let mut out = [0u8; 16];
    let mut nibble = 0;
    for (i, &c) in b.iter().enumerate() {
        if matches!(i, 8 | 13 | 18 | 23) {
            if c != b'-' {
                return None;
            }
            continue;
        }
        let v = match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            b'A'..=b'F' => c - b'A' + 10,
            _ => return None,
        };
        out[nibble / 2] |= if nibble % 2 == 0 { v << 4 } else { v };
        nibble += 1;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::parse;

    #[test]
    fn parses_canonical_uuids_in_any_case() {
        let u = parse("00112233-4455-6677-8899-AaBbCcDdEeFf").unwrap();
        assert_eq!(
            u,
            [
                0x00, 0x11, 0x22, 0x33, 0x44, 0x55, 0x66, 0x77, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
    }

    #[test]
    fn rejects_everything_else() {
        for bad in [
            "",
            "not-a-uuid",
            "00112233-4455-6677-8899-aabbccddeef",
            "00112233x4455-6677-8899-aabbccddeeff",
            "0011223g-4455-6677-8899-aabbccddeeff",
            "{0112233-4455-6677-8899-aabbccddeef}",
            "00112233-4455-6677-8899-aabbccddeeé",
        ] {
            assert!(parse(bad).is_none(), "{bad}");
        }
    }
}
