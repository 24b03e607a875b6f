//! The rules for what callers write into a key: its description and its claims. The same rules
//! back the table's CHECK constraints (`keyhippo_internal.description_ok`, `claims_ok`).

use pgrx::JsonB;

use crate::error::{KeyhippoError, Result};

/// Longest description accepted (KeyHippo 1.2.5's limit).
pub const MAX_DESCRIPTION_LEN: usize = 255;
/// Largest claims document accepted, serialized.
pub const MAX_CLAIMS_BYTES: usize = 64 * 1024;

/// The description rules: at most [`MAX_DESCRIPTION_LEN`] characters of `[a-zA-Z0-9_ -]`.
pub fn description_is_valid(d: &str) -> bool {
    d.len() <= MAX_DESCRIPTION_LEN
        && d.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b' ' || c == b'-')
}

/// A description as create accepts it; 22023 for NULL, too long, or outside the alphabet.
pub fn description(description: Option<&str>) -> Result<&str> {
    let d = description.ok_or_else(|| {
        KeyhippoError::InvalidArgument("keyhippo: key_description must not be NULL".into())
    })?;
    if d.chars().count() > MAX_DESCRIPTION_LEN {
        return Err(KeyhippoError::InvalidArgument(format!(
            "keyhippo: key_description is longer than {MAX_DESCRIPTION_LEN} characters"
        )));
    }
    if !d
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ' ' || c == '-')
    {
        return Err(KeyhippoError::InvalidArgument(
            "keyhippo: key_description may contain only letters, digits, spaces, '_' and '-'"
                .into(),
        ));
    }
    Ok(d)
}

/// Claims as `update_key_claims` accepts them: a JSON object of at most [`MAX_CLAIMS_BYTES`].
pub fn claims(new_claims: Option<JsonB>) -> Result<JsonB> {
    let claims = new_claims.ok_or_else(|| {
        KeyhippoError::InvalidArgument("keyhippo: new_claims must not be NULL".into())
    })?;
    if !claims.0.is_object() {
        return Err(KeyhippoError::InvalidArgument(
            "keyhippo: new_claims must be a JSON object".into(),
        ));
    }
    if claims.0.to_string().len() > MAX_CLAIMS_BYTES {
        return Err(KeyhippoError::InvalidArgument(format!(
            "keyhippo: new_claims is larger than {MAX_CLAIMS_BYTES} bytes"
        )));
    }
    Ok(claims)
}
