//! HS256 JSON Web Tokens for JWT-format API keys: signing, and a strict check.
//!
//! Only `HS256` is accepted: a token whose header names another algorithm (including `none`)
//! is rejected before any signature work, so an attacker cannot choose the algorithm. The
//! signature comparison is constant-time.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, Mac};
use serde_json::{Map, Value};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// The shortest signing secret accepted: HS256 keys shorter than the hash output are weak
/// (RFC 7518, section 3.2).
pub const MIN_SECRET_LEN: usize = 32;
/// Longest token considered at all; anything longer is junk.
pub const MAX_TOKEN_LEN: usize = 8192;

const HEADER: &str = r#"{"alg":"HS256","typ":"JWT"}"#;

#[derive(Debug, PartialEq, Eq)]
pub enum JwtError {
    /// Not three base64url segments of sane length.
    Malformed,
    /// The header names an algorithm other than HS256, or is not JSON.
    Algorithm,
    /// The signature does not match.
    Signature,
    /// The payload is not a JSON object.
    Payload,
    /// The secret is shorter than [`MIN_SECRET_LEN`].
    WeakSecret,
}

/// HMAC-SHA256 (RFC 2104) of `message` under `key`.
pub fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC takes a key of any length");
    mac.update(message);
    mac.finalize().into_bytes().into()
}

/// Signs `header.payload` given as JSON texts; returns the compact token.
pub fn sign_raw(header_json: &str, payload_json: &str, secret: &[u8]) -> String {
    let signing_input = format!(
        "{}.{}",
        URL_SAFE_NO_PAD.encode(header_json),
        URL_SAFE_NO_PAD.encode(payload_json)
    );
    let signature = hmac_sha256(secret, signing_input.as_bytes());
    format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(signature))
}

/// Signs `claims` with HS256. Refuses secrets shorter than [`MIN_SECRET_LEN`].
pub fn sign(claims: &Map<String, Value>, secret: &[u8]) -> Result<String, JwtError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(JwtError::WeakSecret);
    }
    Ok(sign_raw(
        HEADER,
        &Value::Object(claims.clone()).to_string(),
        secret,
    ))
}

/// Whether `s` has the outward shape of a compact JWT (three dot-separated segments), so that a
/// caller can tell it from an opaque key without trying both.
pub fn looks_like_jwt(s: &str) -> bool {
    s.len() <= MAX_TOKEN_LEN
        && s.starts_with("eyJ")
        && s.bytes().filter(|&b| b == b'.').count() == 2
}

/// Checks an HS256 token and returns its claims. Does not look at `exp` or any claim: the
/// caller decides what the claims must say.
pub fn verify(token: &str, secret: &[u8]) -> Result<Map<String, Value>, JwtError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(JwtError::WeakSecret);
    }
    if token.len() > MAX_TOKEN_LEN {
        return Err(JwtError::Malformed);
    }
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(signature), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(JwtError::Malformed);
    };
    let header_json = URL_SAFE_NO_PAD
        .decode(header)
        .map_err(|_| JwtError::Malformed)?;
    match serde_json::from_slice::<Value>(&header_json) {
        Ok(Value::Object(h)) if h.get("alg") == Some(&Value::String("HS256".into())) => {}
        _ => return Err(JwtError::Algorithm),
    }
    let given = URL_SAFE_NO_PAD
        .decode(signature)
        .map_err(|_| JwtError::Malformed)?;
    let signing_input = &token[..header.len() + 1 + payload.len()];
    let mut mac = HmacSha256::new_from_slice(secret).expect("HMAC takes a key of any length");
    mac.update(signing_input.as_bytes());
    // verify_slice compares in constant time.
    mac.verify_slice(&given).map_err(|_| JwtError::Signature)?;
    let payload_json = URL_SAFE_NO_PAD
        .decode(payload)
        .map_err(|_| JwtError::Malformed)?;
    match serde_json::from_slice::<Value>(&payload_json) {
        Ok(Value::Object(claims)) => Ok(claims),
        _ => Err(JwtError::Payload),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    const SECRET: &[u8] = b"a-test-secret-that-is-at-least-32-bytes-long";

    fn hex(bytes: &[u8]) -> String {
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 1.
        assert_eq!(
            hex(&hmac_sha256(&[0x0b; 20], b"Hi There")),
            "b0344c61d8db38535ca8afceaf0bf12b881dc200c9833da726e9376c2e32cff7"
        );
        // Test case 2.
        assert_eq!(
            hex(&hmac_sha256(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block size.
        assert_eq!(
            hex(&hmac_sha256(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn signs_the_well_known_jwt_io_example() {
        let token = sign_raw(
            HEADER,
            r#"{"sub":"1234567890","name":"John Doe","iat":1516239022}"#,
            b"your-256-bit-secret",
        );
        assert_eq!(
            token,
            "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.\
             eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ.\
             SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
        );
    }

    fn claims() -> Map<String, Value> {
        json!({"sub": "u", "role": "authenticated", "type": "api_key", "exp": 2000000000})
            .as_object()
            .unwrap()
            .clone()
    }

    #[test]
    fn round_trip() {
        let token = sign(&claims(), SECRET).unwrap();
        assert!(looks_like_jwt(&token));
        assert_eq!(verify(&token, SECRET).unwrap(), claims());
    }

    #[test]
    fn weak_secrets_are_refused() {
        assert_eq!(sign(&claims(), b"short"), Err(JwtError::WeakSecret));
        assert_eq!(verify("a.b.c", &[0u8; 31]), Err(JwtError::WeakSecret));
    }

    #[test]
    fn another_secret_is_refused() {
        let token = sign(&claims(), SECRET).unwrap();
        assert_eq!(
            verify(&token, b"another-secret-another-secret-xx!"),
            Err(JwtError::Signature)
        );
    }

    #[test]
    fn tampered_payload_is_refused() {
        let token = sign(&claims(), SECRET).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        let forged_payload = URL_SAFE_NO_PAD.encode(r#"{"sub":"admin","type":"api_key"}"#);
        let forged = format!("{}.{}.{}", parts[0], forged_payload, parts[2]);
        assert_eq!(verify(&forged, SECRET), Err(JwtError::Signature));
    }

    #[test]
    fn alg_none_and_other_algorithms_are_refused() {
        let token = sign(&claims(), SECRET).unwrap();
        let parts: Vec<&str> = token.split('.').collect();
        for header in [
            r#"{"alg":"none","typ":"JWT"}"#,
            r#"{"alg":"HS512"}"#,
            r#"{"typ":"JWT"}"#,
            "[]",
            "x",
        ] {
            let h = URL_SAFE_NO_PAD.encode(header);
            for sig in ["", parts[2]] {
                let forged = format!("{h}.{}.{sig}", parts[1]);
                assert_eq!(
                    verify(&forged, SECRET),
                    Err(JwtError::Algorithm),
                    "{header}"
                );
            }
        }
    }

    #[test]
    fn junk_is_refused_without_panicking() {
        let long = "eyJ".repeat(5000);
        for junk in [
            "",
            ".",
            "..",
            "...",
            "a.b.c",
            "eyJ.eyJ.",
            "é.é.é",
            long.as_str(),
        ] {
            assert!(verify(junk, SECRET).is_err(), "{junk}");
        }
        assert!(!looks_like_jwt("kh_abc"));
        assert!(!looks_like_jwt(&long));
    }

    #[test]
    fn non_object_payload_is_refused() {
        let token = sign_raw(HEADER, "[1,2,3]", SECRET);
        assert_eq!(verify(&token, SECRET), Err(JwtError::Payload));
    }
}
