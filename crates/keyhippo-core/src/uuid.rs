//! Strict parsing of textual UUIDs, as found in a JWT's `sub` claim, and time-ordered UUIDs
//! (version 7) for new rows.

use uuid::Uuid;

/// The canonical lower-case `8-4-4-4-12` text of a UUID (what Postgres prints).
pub fn hyphenated(bytes: &[u8; 16]) -> String {
    Uuid::from_bytes(*bytes).hyphenated().to_string()
}

/// Parses a canonical UUID (`8-4-4-4-12` hex digits, any case). Anything else is None: a
/// subject that is not a UUID identifies nobody. (The uuid crate also reads the simple, braced
/// and URN forms; of those only the hyphenated form is 36 characters long.)
pub fn parse(s: &str) -> Option<[u8; 16]> {
    if s.len() != 36 {
        return None;
    }
    Uuid::try_parse(s).ok().map(|u| *u.as_bytes())
}

/// A version 7 UUID (RFC 9562): 48 bits of Unix time in milliseconds, then 74 random bits.
///
/// keyhippo gives new keys and audit rows these ids instead of random (version 4) ones: ids that
/// grow with time are appended at the right edge of their primary-key B-tree, one hot page,
/// where random ids land on a random page of an index that outgrows memory (a read and a dirty
/// page per insert). The creation time they reveal is already in `created_at`.
pub fn v7(unix_millis: u64, random: [u8; 10]) -> [u8; 16] {
    *uuid::Builder::from_unix_timestamp_millis(unix_millis, &random)
        .into_uuid()
        .as_bytes()
}

/// A version 7 UUID for now, with randomness from the operating system.
pub fn new_v7() -> [u8; 16] {
    use rand::RngCore;
    let millis = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let mut random = [0u8; 10];
    rand::rngs::OsRng.fill_bytes(&mut random);
    v7(millis, random)
}

#[cfg(test)]
mod tests {
    use super::{hyphenated, new_v7, parse, v7};

    #[test]
    fn v7_layout_time_version_variant() {
        let u = v7(0x0123_4567_89ab, [0xff; 10]);
        assert_eq!(&u[..6], &[0x01, 0x23, 0x45, 0x67, 0x89, 0xab]);
        assert_eq!(u[6] >> 4, 7, "version nibble");
        assert_eq!(u[8] >> 6, 0b10, "variant bits");
        assert_eq!(u[7], 0xff);
        assert_eq!(u[6] & 0x0f, 0x0f);
    }

    #[test]
    fn v7_ids_grow_with_time_and_differ_within_a_millisecond() {
        let earlier = v7(1_000, [0xff; 10]);
        let later = v7(1_001, [0x00; 10]);
        assert!(
            earlier < later,
            "byte order (as Postgres compares uuids) follows time"
        );
        let a = new_v7();
        let b = new_v7();
        assert_ne!(a, b);
        assert_eq!(a[6] >> 4, 7);
    }

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

    #[test]
    fn hyphenated_round_trips_through_parse() {
        let text = "01a2080c-9f57-70cc-a19b-6299585778e4";
        let bytes = parse(text).expect("valid");
        assert_eq!(hyphenated(&bytes), text);
        assert_eq!(
            hyphenated(&[0xff; 16]),
            "ffffffff-ffff-ffff-ffff-ffffffffffff"
        );
        assert_eq!(hyphenated(&[0; 16]), "00000000-0000-0000-0000-000000000000");
    }
}
