//! Keys issued by another system, imported as their hash so that the plaintext their holders
//! already have verifies from then on (`import_api_key`), and how verify finds them: a key from
//! elsewhere has no prefix keyhippo can tell, so it is found by the hash of the whole key, in a
//! partial index that holds imported keys alone.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::{JsonB, Uuid};

use crate::caller::Manager;
use crate::error::{KeyhippoError, Result};
use crate::pg::backend;
use crate::pg::plans::{types, Plan};
use crate::{cache, issue, jwt_keys, validate};
use keyhippo_core::{hash, token};

/// The longest prefix an imported key may show in listings.
const PREFIX_MAX: usize = 64;

const INSERT_IMPORTED: Plan = Plan {
    sql: "WITH m AS ( \
            INSERT INTO keyhippo.api_key_metadata \
                (user_id, scope_id, description, prefix, claims, expires_at) \
            VALUES ($1, $2, $3, $4, COALESCE($5, '{}'::jsonb), $6) \
            RETURNING id) \
          INSERT INTO keyhippo.api_key_secrets (key_metadata_id, key_hash) \
          SELECT m.id, $7 FROM m RETURNING key_metadata_id",
    args: &[
        types::UUID,
        types::UUID,
        types::TEXT,
        types::TEXT,
        types::JSONB,
        types::TIMESTAMPTZ,
        types::TEXT,
    ],
    mutating: true,
};

/// The stored form of a hash given to `import_api_key`: `sha256$<64 hex>` of the whole key, or
/// KeyHippo 1.2.5's SHA-512 of the key's 128-character secret (`<128 hex>`, or
/// `keyhippo125$<128 hex>`) with that key's 1.2.5 prefix. 22023 for anything else.
fn stored_hash(key_hash: &str, prefix: &str) -> Result<String> {
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    let malformed = || {
        KeyhippoError::InvalidArgument(
            "keyhippo: p_key_hash must be sha256$<64 hex digits> of the whole key, or KeyHippo 1.2.5's keyhippo125$<128 hex digits>"
                .into(),
        )
    };
    if let Some(digest) = key_hash.strip_prefix("sha256$") {
        return if hex(digest, 64) {
            Ok(format!(
                "{}${}",
                hash::IMPORTED_SHA256,
                digest.to_ascii_lowercase()
            ))
        } else {
            Err(malformed())
        };
    }
    let digest = key_hash.strip_prefix("keyhippo125$").unwrap_or(key_hash);
    if !hex(digest, 128) {
        return Err(malformed());
    }
    // A 1.2.5 key is found by its prefix: the prefix must be one of 1.2.5's.
    let probe = format!("{prefix}{}", "0".repeat(token::LEGACY_SECRET_LEN));
    if token::parse_legacy(&probe) != Some(prefix) {
        return Err(KeyhippoError::InvalidArgument(
            "keyhippo: a KeyHippo 1.2.5 hash needs that key's prefix: its first 32 (base64) characters"
                .into(),
        ));
    }
    Ok(format!(
        "{}${}",
        hash::KEYHIPPO_125,
        digest.to_ascii_lowercase()
    ))
}

/// The listing prefix of an imported key: 1 to 64 printable ASCII characters, not one of the
/// shapes keyhippo gives its own keys (22023).
fn check_prefix(prefix: Option<&str>) -> Result<&str> {
    let prefix = prefix.unwrap_or_default();
    let printable = prefix.bytes().all(|b| b.is_ascii_graphic());
    if prefix.is_empty() || prefix.len() > PREFIX_MAX || !printable {
        return Err(KeyhippoError::InvalidArgument(format!(
            "keyhippo: p_prefix must be 1 to {PREFIX_MAX} printable ASCII characters without spaces"
        )));
    }
    if prefix.starts_with(token::KEY_TAG) || prefix.starts_with(jwt_keys::PREFIX) {
        return Err(KeyhippoError::InvalidArgument(format!(
            "keyhippo: p_prefix may not start with {} or {} (keyhippo's own keys do)",
            token::KEY_TAG,
            jwt_keys::PREFIX
        )));
    }
    Ok(prefix)
}

/// The arguments of `import_api_key`.
pub struct Imported<'a> {
    pub user_id: Option<Uuid>,
    pub key_hash: Option<&'a str>,
    pub prefix: Option<&'a str>,
    pub description: Option<&'a str>,
    pub expires_at: Option<TimestampWithTimeZone>,
    pub scope_name: Option<&'a str>,
    pub claims: Option<JsonB>,
}

/// Imports a key issued elsewhere for `user_id` (service_role and admins only); returns its id.
pub fn import(key: Imported<'_>) -> Result<Uuid> {
    let manager = Manager::current()?;
    if !manager.is_admin {
        return Err(KeyhippoError::PermissionDenied(
            "keyhippo: only service_role and admins may import API keys".into(),
        ));
    }
    let user = key.user_id.ok_or_else(|| {
        KeyhippoError::InvalidArgument("keyhippo: p_user_id must not be NULL".into())
    })?;
    let prefix = check_prefix(key.prefix)?;
    let stored = stored_hash(key.key_hash.unwrap_or_default(), prefix)?;
    let description = validate::description(key.description)?;
    let claims = match key.claims {
        Some(claims) => Some(validate::claims(Some(claims))?),
        None => None,
    };
    if key
        .expires_at
        .is_some_and(|at| i64::from(at) <= backend::transaction_start())
    {
        return Err(KeyhippoError::InvalidArgument(
            "keyhippo: p_expires_at must be in the future".into(),
        ));
    }
    let expires_at = match key.expires_at {
        Some(at) => at,
        None => issue::expiry(None)?,
    };
    Spi::connect_mut(|client| {
        let scope_id = issue::check_owner_and_scope(client, user, key.scope_name)?.scope_id;
        let row = INSERT_IMPORTED
            .run(
                client,
                &[
                    user.into(),
                    scope_id.into(),
                    description.into(),
                    prefix.into(),
                    claims.into(),
                    expires_at.into(),
                    stored.as_str().into(),
                ],
            )?
            .first();
        // Backends that know this database holds no imported key look again.
        cache::begin_change();
        row.get::<Uuid>(1)?.ok_or_else(|| {
            KeyhippoError::Internal("keyhippo: the imported key's insert returned no row".into())
        })
    })
}
