//! Stored key hashes.
//!
//! `api_key_secrets.key_hash` holds `<algorithm>$<lowercase hex digest>`, e.g.
//! `sha256$9f86d0…`. Naming the algorithm lets hashes made elsewhere live beside ours and be
//! checked by the right function: SHA-512 of the whole key (`sha512$…`), or KeyHippo 1.2.5's
//! SHA-512 of the key's last 128 characters, its secret without the prefix
//! (`keyhippo125$…`). A fast digest is the right tool here: the input is a 256-bit random secret, so there
//! is nothing for a slow password hash to protect against.

use sha2::{Digest, Sha256, Sha512};

/// The algorithm name of hashes migrated from KeyHippo 1.2.5: SHA-512 of the key's secret (its
/// last 128 characters), hex.
pub const KEYHIPPO_125: &str = "keyhippo125";

/// The algorithm name of keys imported from another system (`import_api_key`): SHA-256 of the
/// whole key, hex, stored under a name of its own so that an index can hold exactly these
/// (they carry no lookup prefix and are found by their hash).
pub const IMPORTED_SHA256: &str = "imported-sha256";

/// The stored form of an imported key's hash, which verify looks an unrecognised key up by.
pub fn imported_hash(key: &str) -> String {
    format!("{IMPORTED_SHA256}${}", hex(&Sha256::digest(key.as_bytes())))
}

/// The algorithm new keys are hashed with.
pub const DEFAULT_ALGORITHM: &str = "sha256";

/// Hashes a key (or JWT) into the stored `key_hash` form.
pub fn hash_key(key: &str) -> String {
    format!(
        "{DEFAULT_ALGORITHM}${}",
        hex(&Sha256::digest(key.as_bytes()))
    )
}

/// Whether `key` hashes to `stored`. Unknown algorithms and malformed stored values never match.
/// The digest comparison takes the same time wherever the first difference is.
pub fn verify_key(key: &str, stored: &str) -> bool {
    let Some((algorithm, digest)) = stored.split_once('$') else {
        return false;
    };
    let computed = match algorithm {
        "sha256" | IMPORTED_SHA256 => hex(&Sha256::digest(key.as_bytes())),
        "sha512" => hex(&Sha512::digest(key.as_bytes())),
        KEYHIPPO_125 => {
            let secret_len = crate::token::LEGACY_SECRET_LEN;
            if key.len() <= secret_len || !key.is_char_boundary(key.len() - secret_len) {
                return false;
            }
            hex(&Sha512::digest(&key.as_bytes()[key.len() - secret_len..]))
        }
        _ => return false,
    };
    constant_time_eq(computed.as_bytes(), digest.as_bytes())
}

/// Compares two byte strings in time that depends only on their lengths.
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

fn hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut out = String::with_capacity(bytes.len() * 2);
    for &b in bytes {
        out.push(DIGITS[(b >> 4) as usize] as char);
        out.push(DIGITS[(b & 0xF) as usize] as char);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_known_vector_and_algorithm_name() {
        assert_eq!(
            hash_key("abc"),
            "sha256$ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn verifies_own_hash_and_rejects_others() {
        let stored = hash_key("kh_secret");
        assert!(verify_key("kh_secret", &stored));
        assert!(!verify_key("kh_secreT", &stored));
        assert!(!verify_key("", &stored));
    }

    #[test]
    fn verifies_imported_sha512() {
        let stored = format!("sha512${}", hex(&Sha512::digest(b"legacy")));
        assert!(verify_key("legacy", &stored));
        assert!(!verify_key("legacy2", &stored));
    }

    #[test]
    fn malformed_or_unknown_stored_values_never_match() {
        for stored in [
            "",
            "sha256",
            "sha256$",
            "md5$900150983cd24fb0d6963f7d28e17f72",
            "$abc",
        ] {
            assert!(!verify_key("abc", stored), "{stored}");
        }
        // Right digest, wrong case: still a mismatch rather than a panic.
        let upper = hash_key("abc")
            .to_uppercase()
            .replacen("SHA256", "sha256", 1);
        assert!(!verify_key("abc", &upper));
    }

    #[test]
    fn constant_time_eq_basics() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
    }

    #[test]
    fn verifies_keyhippo_125_hashes_of_the_secret_alone() {
        let secret = "0123456789abcdef".repeat(8);
        let key = format!("AbCdEfGhIjKlMnOpQrStUvWxYz012+/9{secret}");
        let stored = format!("keyhippo125${}", hex(&Sha512::digest(secret.as_bytes())));
        assert!(verify_key(&key, &stored));
        // The same secret behind another prefix is another key's secret with this hash: 1.2.5
        // found the row by the prefix first, and so does verify.
        let mut wrong = key.clone();
        wrong.pop();
        wrong.push('0');
        assert!(!verify_key(&wrong, &stored));
        assert!(!verify_key(&secret[1..], &stored));
    }

    #[test]
    fn imported_hashes_are_sha256_of_the_whole_key_under_their_own_name() {
        let stored = imported_hash("sk_live_elsewhere");
        assert!(stored.starts_with("imported-sha256$"));
        assert!(verify_key("sk_live_elsewhere", &stored));
        assert!(!verify_key("sk_live_elsewhere!", &stored));
        assert_eq!(&stored["imported-".len()..], hash_key("sk_live_elsewhere"));
    }
}
