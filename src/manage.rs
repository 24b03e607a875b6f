//! Changing existing keys: revoke, rotate, replace claims. The caller must own the key or be an
//! admin; a key that does not exist and another user's key give the same error.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::{JsonB, Uuid};

use crate::caller::Manager;
use crate::error::{KeyhippoError, Result};
use crate::pg::plans::{types, Plan};
use crate::{issue, jwt_keys, validate};

// The management statements below take the caller ($2: the calling user, NULL for an admin
// acting without one) and whether the caller is an admin ($3), both worked out before they run:
// a key that exists but is another user's and a key that does not exist go through the very
// same statements, so neither the result nor the time taken tells them apart.

/// Revokes a key the caller owns (or any key, for an admin), and says whether the caller may see
/// the key at all, in one statement: (revoked now, visible). The secret hash is deleted by the
/// AFTER UPDATE trigger, so revoking by a direct UPDATE of is_revoked/revoked_at works the same.
/// (The visibility test reads the snapshot the UPDATE started from: the row as it was.)
const REVOKE: Plan = Plan {
    sql: "WITH r AS ( \
            UPDATE keyhippo.api_key_metadata m \
               SET is_revoked = true, revoked_at = pg_catalog.now() \
             WHERE m.id = $1 AND NOT m.is_revoked AND (m.user_id = $2 OR $3) \
            RETURNING m.id) \
          SELECT EXISTS (SELECT 1 FROM r), \
                 EXISTS (SELECT 1 FROM keyhippo.api_key_metadata m \
                          WHERE m.id = $1 AND (m.user_id = $2 OR $3))",
    args: &[types::UUID, types::UUID, types::BOOL],
    mutating: true,
};

const ROTATE_SOURCE: Plan = Plan {
    sql: "SELECT m.user_id, m.scope_id, m.description, m.claims, m.is_revoked, \
                 pg_catalog.now() + (m.expires_at - m.created_at), m.prefix \
            FROM keyhippo.api_key_metadata m \
           WHERE m.id = $1 AND (m.user_id = $2 OR $3) \
             FOR UPDATE",
    args: &[types::UUID, types::UUID, types::BOOL],
    mutating: true,
};

const UPDATE_CLAIMS: Plan = Plan {
    sql: "UPDATE keyhippo.api_key_metadata m SET claims = $4 \
           WHERE m.id = $1 AND (m.user_id = $2 OR $3) \
          RETURNING m.id",
    args: &[types::UUID, types::UUID, types::BOOL, types::JSONB],
    mutating: true,
};

fn key_not_found() -> KeyhippoError {
    // The same message whether the key does not exist or belongs to someone else: the caller
    // learns nothing about other users' keys.
    KeyhippoError::NotFound("keyhippo: API key not found among the caller's keys".into())
}

/// Revokes a key: true when this call revoked it, false when it was already revoked; P0002 for a
/// key that does not exist or is not the caller's (admins may revoke any key).
pub fn revoke(api_key_id: Option<Uuid>) -> Result<bool> {
    let id = api_key_id.ok_or_else(|| {
        KeyhippoError::InvalidArgument("keyhippo: api_key_id must not be NULL".into())
    })?;
    let manager = Manager::current()?;
    Spi::connect_mut(|client| {
        let row = REVOKE.run(client, &manager.args(id))?.first();
        let revoked = row.get::<bool>(1)?.unwrap_or(false);
        let visible = row.get::<bool>(2)?.unwrap_or(false);
        match (revoked, visible) {
            (true, _) => Ok(true),
            (false, true) => Ok(false),
            (false, false) => Err(key_not_found()),
        }
    })
}

/// Replaces a key with a new one of the same owner, description, scope, claims and lifetime (a
/// JWT key with a JWT key), and revokes the old one, atomically; returns (new key, its id).
pub fn rotate(old_api_key_id: Option<Uuid>) -> Result<(String, Uuid)> {
    let id = old_api_key_id.ok_or_else(|| {
        KeyhippoError::InvalidArgument("keyhippo: old_api_key_id must not be NULL".into())
    })?;
    let manager = Manager::current()?;
    let user = manager.user;
    Spi::connect_mut(|client| {
        let old = ROTATE_SOURCE.run(client, &manager.args(id))?.first();
        if old.is_empty() {
            return Err(key_not_found());
        }
        if old.get::<bool>(5)?.unwrap_or(false) {
            return Err(KeyhippoError::WrongState(
                "keyhippo: the API key is revoked and cannot be rotated; create a new key instead"
                    .into(),
            ));
        }
        let owner = old.get::<Uuid>(1)?.expect("user_id is NOT NULL");
        let scope_id = old.get::<Uuid>(2)?;
        let description = old.get::<String>(3)?;
        let claims = old.get::<JsonB>(4)?;
        let expires_at = old.get::<TimestampWithTimeZone>(6)?;
        let is_jwt = old
            .get::<String>(7)?
            .is_some_and(|p| p.starts_with(jwt_keys::PREFIX));
        let created = if is_jwt {
            jwt_keys::insert_jwt_key(
                client,
                owner,
                scope_id,
                description.as_deref(),
                claims,
                expires_at,
            )?
        } else {
            let new = issue::NewKey {
                user_id: owner,
                scope_id,
                description: description.as_deref(),
                claims,
                expires_at,
            };
            issue::insert_key(client, new, user)?
        };
        REVOKE.run(client, &manager.args(id))?;
        Ok(created)
    })
}

/// Replaces a key's claims (a JSON object) for its owner or an admin.
pub fn update_claims(key_id: Option<Uuid>, new_claims: Option<JsonB>) -> Result<()> {
    let id = key_id.ok_or_else(|| {
        KeyhippoError::InvalidArgument("keyhippo: key_id must not be NULL".into())
    })?;
    let claims = validate::claims(new_claims)?;
    let manager = Manager::current()?;
    Spi::connect_mut(|client| {
        let [key, user, is_admin] = manager.args(id);
        if UPDATE_CLAIMS
            .run(client, &[key, user, is_admin, claims.into()])?
            .is_empty()
        {
            Err(key_not_found())
        } else {
            Ok(())
        }
    })
}
