//! The opaque API key format.
//!
//! ```text
//! kh_ 3yQbW1FhD2kq8ZtA _ <43 base62 secret characters> <6 base62 checksum characters>
//! \_/ \______________/     \_________________________/ \__________________________/
//! tag  lookup (public)      >= 256 bits from the OS      CRC-32 of everything before it
//! ```
//!
//! * The tag makes a leaked key recognisable to secret scanners (as GitHub's `ghp_` does).
//! * `kh_<lookup>` is the public part, stored in `api_key_metadata.prefix` and used to find the
//!   row with one unique-index probe.
//! * The secret is 43 characters drawn uniformly from 62, i.e. 43·log2(62) ≈ 256.03 bits.
//! * The checksum lets a typo or an invented key be rejected without touching a table. It is no
//!   security measure (anyone can compute a CRC); it only spares the database junk lookups.
//!
//! Every character is in `[0-9A-Za-z_]`, so keys are URL-safe and select with a double click.

use rand::rngs::OsRng;
use rand::RngCore;

/// Recognisable tag at the start of every opaque key.
pub const KEY_TAG: &str = "kh_";
/// Characters of the public lookup part after the tag.
pub const LOOKUP_LEN: usize = 16;
/// Characters of the secret part.
pub const SECRET_LEN: usize = 43;
/// Characters of the checksum (62^6 > 2^32, so a CRC-32 always fits).
pub const CHECKSUM_LEN: usize = 6;
/// Length of the stored `prefix` (`kh_` + lookup).
pub const PREFIX_LEN: usize = KEY_TAG.len() + LOOKUP_LEN;
/// Total length of a key.
pub const KEY_LEN: usize = PREFIX_LEN + 1 + SECRET_LEN + CHECKSUM_LEN;

const BASE62: &[u8; 62] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A freshly generated key. `Debug` is deliberately not derived: the plaintext must not end up in
/// a log line by accident.
pub struct NewKey {
    /// The full plaintext key, handed to the caller once.
    pub key: String,
    /// The public `kh_<lookup>` part stored in `api_key_metadata.prefix`.
    pub prefix: String,
}

/// The public part of a key that passed the format check.
#[derive(Debug, PartialEq, Eq)]
pub struct ParsedKey<'a> {
    /// `kh_<lookup>`: what `api_key_metadata.prefix` holds.
    pub prefix: &'a str,
}

/// Why a string is not a well-formed key. Only used for diagnostics in tests; callers treat every
/// variant as "not a key" and never echo the input.
#[derive(Debug, PartialEq, Eq, Clone, Copy)]
pub enum FormatError {
    Length,
    Tag,
    Separator,
    Alphabet,
    Checksum,
}

/// Generates a new key from the operating system's CSPRNG.
pub fn generate() -> NewKey {
    let mut rng = OsRng;
    let mut key = String::with_capacity(KEY_LEN);
    key.push_str(KEY_TAG);
    push_random_base62(&mut rng, &mut key, LOOKUP_LEN);
    let prefix = key.clone();
    key.push('_');
    push_random_base62(&mut rng, &mut key, SECRET_LEN);
    let key = seal(key);
    debug_assert_eq!(key.len(), KEY_LEN);
    NewKey { key, prefix }
}

/// Appends the checksum to a key body (`kh_<lookup>_<secret>`).
pub fn seal(mut body: String) -> String {
    let checksum = encode_checksum(crc32(body.as_bytes()));
    body.push_str(&checksum);
    body
}

/// Checks the format and checksum of `input` without any lookup. Cheap enough to run on every
/// request: a length check first, then one pass over at most `KEY_LEN` bytes.
pub fn parse(input: &str) -> Result<ParsedKey<'_>, FormatError> {
    let bytes = input.as_bytes();
    if bytes.len() != KEY_LEN {
        return Err(FormatError::Length);
    }
    if !input.starts_with(KEY_TAG) {
        return Err(FormatError::Tag);
    }
    if bytes[PREFIX_LEN] != b'_' {
        return Err(FormatError::Separator);
    }
    let lookup = &bytes[KEY_TAG.len()..PREFIX_LEN];
    let rest = &bytes[PREFIX_LEN + 1..];
    if !lookup
        .iter()
        .chain(rest.iter())
        .all(u8::is_ascii_alphanumeric)
    {
        return Err(FormatError::Alphabet);
    }
    let body_len = KEY_LEN - CHECKSUM_LEN;
    let expected = encode_checksum(crc32(&bytes[..body_len]));
    if expected.as_bytes() != &bytes[body_len..] {
        return Err(FormatError::Checksum);
    }
    Ok(ParsedKey {
        prefix: &input[..PREFIX_LEN],
    })
}

/// KeyHippo 1.2.5's keys: a lookup prefix of [`LEGACY_PREFIX_LEN`] base64 characters (24
/// random bytes) followed by [`LEGACY_SECRET_LEN`] lowercase hex digits (64 random bytes).
pub const LEGACY_PREFIX_LEN: usize = 32;
/// The hex secret of a KeyHippo 1.2.5 key; its SHA-512 is the stored hash.
pub const LEGACY_SECRET_LEN: usize = 128;

/// The lookup prefix of a key of KeyHippo 1.2.5's shape (keys migrated from it keep working),
/// checked without any lookup: exactly 32 base64 characters and 128 lowercase hex digits. None
/// for anything else.
pub fn parse_legacy(input: &str) -> Option<&str> {
    let bytes = input.as_bytes();
    if bytes.len() != LEGACY_PREFIX_LEN + LEGACY_SECRET_LEN {
        return None;
    }
    let (prefix, secret) = bytes.split_at(LEGACY_PREFIX_LEN);
    let base64 = |b: &u8| b.is_ascii_alphanumeric() || *b == b'+' || *b == b'/';
    let hex = |b: &u8| b.is_ascii_digit() || (b'a'..=b'f').contains(b);
    (prefix.iter().all(base64) && secret.iter().all(hex)).then(|| &input[..LEGACY_PREFIX_LEN])
}

/// Appends `n` characters drawn uniformly from the base62 alphabet. Rejection sampling (bytes
/// >= 248 are dropped) keeps every character exactly equally likely.
fn push_random_base62(rng: &mut OsRng, out: &mut String, n: usize) {
    let mut buf = [0u8; 64];
    let mut written = 0;
    while written < n {
        rng.fill_bytes(&mut buf);
        for &b in buf.iter() {
            if b < 248 {
                out.push(BASE62[(b % 62) as usize] as char);
                written += 1;
                if written == n {
                    break;
                }
            }
        }
    }
}

fn encode_checksum(mut value: u32) -> String {
    let mut digits = [b'0'; CHECKSUM_LEN];
    for slot in digits.iter_mut().rev() {
        *slot = BASE62[(value % 62) as usize];
        value /= 62;
    }
    // All bytes come from BASE62, so this is ASCII.
    String::from_utf8(digits.to_vec()).expect("base62 is ASCII")
}

/// CRC-32 (IEEE 802.3, the zlib/PNG one).
pub fn crc32(data: &[u8]) -> u32 {
    crc32fast::hash(data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    #[test]
    fn crc32_known_vector() {
        // The standard check value of CRC-32/ISO-HDLC.
        assert_eq!(crc32(b"123456789"), 0xCBF4_3926);
        assert_eq!(crc32(b""), 0);
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let k = generate();
        assert_eq!(k.key.len(), KEY_LEN);
        assert!(k.key.starts_with("kh_"));
        assert!(k.key.starts_with(&k.prefix));
        assert_eq!(k.prefix.len(), PREFIX_LEN);
        assert!(k
            .key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_'));
        assert_eq!(parse(&k.key).unwrap().prefix, k.prefix);
    }

    #[test]
    fn secret_carries_at_least_256_bits() {
        let bits = SECRET_LEN as f64 * 62f64.log2();
        assert!(bits >= 256.0, "{bits}");
    }

    #[test]
    fn keys_are_distinct() {
        let keys: HashSet<String> = (0..2000).map(|_| generate().key).collect();
        assert_eq!(keys.len(), 2000);
        let prefixes: HashSet<String> = (0..2000).map(|_| generate().prefix).collect();
        assert_eq!(prefixes.len(), 2000);
    }

    #[test]
    fn characters_are_roughly_uniform() {
        let mut counts = [0usize; 128];
        for _ in 0..400 {
            let k = generate().key;
            for b in k[PREFIX_LEN + 1..KEY_LEN - CHECKSUM_LEN].bytes() {
                counts[b as usize] += 1;
            }
        }
        let total: usize = counts.iter().sum();
        let expected = total as f64 / 62.0;
        for &c in BASE62 {
            let n = counts[c as usize] as f64;
            assert!(
                (n - expected).abs() < expected * 0.35,
                "{} seen {n} times",
                c as char
            );
        }
    }

    #[test]
    fn every_single_character_typo_is_rejected() {
        let k = generate().key;
        let bytes = k.as_bytes();
        for i in 0..bytes.len() {
            for &c in BASE62.iter().chain(b"_-") {
                if c == bytes[i] {
                    continue;
                }
                let mut typo = bytes.to_vec();
                typo[i] = c;
                let typo = String::from_utf8(typo).unwrap();
                assert!(parse(&typo).is_err(), "typo at {i} accepted: {typo}");
            }
        }
    }

    #[test]
    fn transposed_characters_are_rejected() {
        let k = generate().key;
        let mut bytes = k.clone().into_bytes();
        for i in 3..bytes.len() - 1 {
            if bytes[i] != bytes[i + 1] {
                bytes.swap(i, i + 1);
                assert!(parse(std::str::from_utf8(&bytes).unwrap()).is_err());
                bytes.swap(i, i + 1);
            }
        }
    }

    #[test]
    fn junk_is_rejected_by_format_alone() {
        let k = generate().key;
        let long = "a".repeat(100_000);
        let cases: Vec<(&str, FormatError)> = vec![
            ("", FormatError::Length),
            ("kh_", FormatError::Length),
            (&long, FormatError::Length),
            (&k[..KEY_LEN - 1], FormatError::Length),
        ];
        for (input, err) in cases {
            assert_eq!(parse(input), Err(err));
        }
        let wrong_tag = format!("xx_{}", &k[3..]);
        assert_eq!(parse(&wrong_tag), Err(FormatError::Tag));
        let no_sep = format!("{}x{}", &k[..PREFIX_LEN], &k[PREFIX_LEN + 1..]);
        assert_eq!(parse(&no_sep), Err(FormatError::Separator));
        let quote = format!("{}'{}", &k[..PREFIX_LEN + 1], &k[PREFIX_LEN + 2..]);
        assert_eq!(parse(&quote), Err(FormatError::Alphabet));
        // Multi-byte characters: same byte length, still rejected without panicking.
        let accented = format!("{}é{}", &k[..PREFIX_LEN + 1], &k[PREFIX_LEN + 3..]);
        assert_eq!(accented.len(), KEY_LEN);
        assert!(parse(&accented).is_err());
        let mut bad_sum = k.clone().into_bytes();
        let last = bad_sum.len() - 1;
        bad_sum[last] = if bad_sum[last] == b'0' { b'1' } else { b'0' };
        assert_eq!(
            parse(std::str::from_utf8(&bad_sum).unwrap()),
            Err(FormatError::Checksum)
        );
    }

    #[test]
    fn parse_never_panics_on_arbitrary_bytes_of_key_length() {
        // A deterministic sweep of junk of exactly KEY_LEN bytes, incl. non-ASCII boundaries.
        let mut state = 0x1234_5678u32;
        for _ in 0..20_000 {
            let mut s = String::new();
            while s.len() < KEY_LEN {
                state = state.wrapping_mul(1_103_515_245).wrapping_add(12345);
                let c = char::from_u32((state >> 8) % 0x3000).unwrap_or('x');
                if s.len() + c.len_utf8() <= KEY_LEN {
                    s.push(c);
                } else {
                    s.push('a');
                }
            }
            let _ = parse(&s);
        }
    }

    #[test]
    fn legacy_keys_are_recognised_by_shape_only() {
        let prefix = "AbCdEfGhIjKlMnOpQrStUvWxYz012+/9";
        let secret = "0123456789abcdef".repeat(8);
        let key = format!("{prefix}{secret}");
        assert_eq!(parse_legacy(&key), Some(prefix));
        // One character short, an upper-case hex digit, a character outside base64: not a key.
        assert_eq!(parse_legacy(&key[1..]), None);
        assert_eq!(parse_legacy(&format!("{prefix}{}F", &secret[1..])), None);
        assert_eq!(parse_legacy(&format!("{}-{secret}", &prefix[1..])), None);
        // keyhippo's own keys are not of that shape.
        assert_eq!(parse_legacy(&generate().key), None);
    }
}
