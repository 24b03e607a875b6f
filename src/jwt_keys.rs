//! JWT-format API keys: HS256 tokens signed with PostgREST's secret, so that PostgREST accepts
//! them as a request's JWT, and recorded like opaque keys (a row, the token's hash) so that they
//! can be listed and revoked. Minting, finding one by its `jti`, and the request's JWT as a key.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::{JsonB, Uuid};
use serde_json::{json, Value};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::{KeyhippoError, Result};
use crate::model::VerifiedKey;
use crate::pg::elevate::as_owner;
use crate::pg::plans::{types, Plan};
use crate::{permissions, request};
use keyhippo_core::{hash, jwt};

/// `api_key_metadata.prefix` of a JWT key is this followed by its jti: unique, and never of the
/// shape of an opaque key (`kh_...`).
pub const PREFIX: &str = "jwt_";

/// The signing secret: `keyhippo.jwt_secret`, else Supabase's `app.settings.jwt_secret`.
pub fn signing_secret() -> Result<String> {
    let secret = request::setting("keyhippo.jwt_secret")
        .or_else(|| request::setting("app.settings.jwt_secret"))
        .ok_or_else(|| {
            KeyhippoError::WrongState(
                "keyhippo: no JWT signing secret: set keyhippo.jwt_secret (or app.settings.jwt_secret) to PostgREST's jwt-secret"
                    .into(),
            )
        })?;
    if secret.len() < jwt::MIN_SECRET_LEN {
        return Err(KeyhippoError::InvalidArgument(format!(
            "keyhippo: the JWT signing secret must be at least {} bytes long",
            jwt::MIN_SECRET_LEN
        )));
    }
    Ok(secret)
}

fn now_epoch() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// For a JWT that verifies with the configured secret, is an API key (`type = 'api_key'`) and
/// has a UUID `jti`: the metadata prefix to look it up by, and whether it is past its `exp`
/// (the holder has the whole key: verify reports it as expired, not as unknown). None for
/// anything else, including when no secret is configured.
pub fn lookup_prefix(token: &str) -> Option<(String, bool)> {
    if !jwt::looks_like_jwt(token) {
        return None;
    }
    let secret = signing_secret().ok()?;
    let claims = jwt::verify(token, secret.as_bytes()).ok()?;
    if claims.get("type")? != "api_key" {
        return None;
    }
    let expired = claims.get("exp")?.as_i64()? <= now_epoch();
    let jti = request::parse_uuid(claims.get("jti")?.as_str()?)?;
    Some((format!("{PREFIX}{jti}"), expired))
}

const INSERT_JWT_KEY: Plan = Plan {
    sql: "INSERT INTO keyhippo.api_key_metadata \
              (id, user_id, scope_id, description, prefix, claims, expires_at) \
          SELECT g.id, $1, $2, $3, 'jwt_' || g.id::text, COALESCE($4, '{}'::jsonb), $5 \
            FROM (SELECT pg_catalog.gen_random_uuid() AS id) g \
          RETURNING id, pg_catalog.floor(pg_catalog.date_part('epoch', created_at))::int8, \
                    pg_catalog.floor(pg_catalog.date_part('epoch', expires_at))::int8",
    args: &[
        types::UUID,
        types::UUID,
        types::TEXT,
        types::JSONB,
        types::TIMESTAMPTZ,
    ],
    mutating: true,
};

const INSERT_SECRET: Plan = Plan {
    sql: "INSERT INTO keyhippo.api_key_secrets (key_metadata_id, key_hash) VALUES ($1, $2)",
    args: &[types::UUID, types::TEXT],
    mutating: true,
};

/// Mints and records a JWT key; returns (token, id). Rotation mints this kind for a JWT key.
pub fn insert_jwt_key(
    client: &pgrx::spi::SpiClient<'_>,
    user_id: Uuid,
    scope_id: Option<Uuid>,
    description: Option<&str>,
    claims: Option<JsonB>,
    expires_at: Option<TimestampWithTimeZone>,
) -> Result<(String, Uuid)> {
    let secret = signing_secret()?;
    let row = INSERT_JWT_KEY
        .run(
            client,
            &[
                user_id.into(),
                scope_id.into(),
                description.into(),
                claims.into(),
                expires_at.into(),
            ],
        )?
        .first();
    let id = row.get::<Uuid>(1)?.ok_or_else(|| {
        KeyhippoError::Internal("keyhippo: JWT key insert returned no row".into())
    })?;
    let iat = row.get::<i64>(2)?.unwrap_or_else(now_epoch);
    let exp = row.get::<i64>(3)?.unwrap_or(iat);
    let token_claims = json!({
        "sub": user_id.to_string(),
        "role": "authenticated",
        "iat": iat,
        "exp": exp,
        "jti": id.to_string(),
        "type": "api_key",
    });
    let Value::Object(token_claims) = token_claims else {
        unreachable!("json! object")
    };
    let token = jwt::sign(&token_claims, secret.as_bytes())
        .map_err(|e| KeyhippoError::InvalidArgument(format!("keyhippo: cannot sign: {e:?}")))?;
    INSERT_SECRET.run(client, &[id.into(), hash::hash_key(&token).as_str().into()])?;
    Ok((token, id))
}

/// The live key a JWT API key's jti names: known, of that subject, unrevoked, unexpired, not
/// disabled, and with its hash still stored (revocation deletes it, however it was written).
const JTI_KEY: Plan = Plan {
    sql: "SELECT m.id, m.scope_id FROM keyhippo.api_key_metadata m \
           WHERE m.prefix = $1 AND m.user_id = $2 \
             AND NOT m.is_revoked AND m.revoked_at IS NULL AND m.expires_at > pg_catalog.now() \
             AND m.disabled_at IS NULL \
             AND EXISTS (SELECT 1 FROM keyhippo.api_key_secrets s WHERE s.key_metadata_id = m.id)",
    args: &[types::TEXT, types::UUID],
    mutating: false,
};

/// What the request's JWT is, as a key.
pub enum ClaimsKey {
    /// No JWT, or a JWT that is not an API key (a user's session).
    NotAKey,
    /// A JWT API key whose jti is live: the key, with its permissions.
    Live(VerifiedKey),
    /// A JWT API key whose jti is revoked, expired or unknown.
    Dead,
}

/// The request's JWT as an API key (claim `type = 'api_key'`), if it is one.
pub fn claims_key() -> Result<ClaimsKey> {
    let Some(claims) = request::jwt_claims() else {
        return Ok(ClaimsKey::NotAKey);
    };
    if claims.get("type").and_then(Value::as_str) != Some("api_key") {
        return Ok(ClaimsKey::NotAKey);
    }
    let jti = claims
        .get("jti")
        .and_then(Value::as_str)
        .and_then(request::parse_uuid);
    let sub = claims
        .get("sub")
        .and_then(Value::as_str)
        .and_then(request::parse_uuid);
    let (Some(jti), Some(sub)) = (jti, sub) else {
        return Ok(ClaimsKey::Dead);
    };
    let found = as_owner(|| {
        Spi::connect(|client| {
            let rows = JTI_KEY.run(
                client,
                &[format!("{PREFIX}{jti}").as_str().into(), sub.into()],
            )?;
            if rows.is_empty() {
                return Ok(None);
            }
            let row = rows.first();
            Ok(row
                .get::<Uuid>(1)?
                .map(|id| (id, row.get::<Uuid>(2).ok().flatten())))
        })
    })?;
    let Some((id, scope_id)) = found else {
        return Ok(ClaimsKey::Dead);
    };
    Ok(ClaimsKey::Live(VerifiedKey {
        id,
        user_id: sub,
        scope_id,
        permissions: permissions::fresh(sub, scope_id)?,
    }))
}
