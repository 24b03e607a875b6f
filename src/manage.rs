//! Changing existing keys: revoke, disable and enable, rotate, replace claims. The caller must
//! own the key or be an admin; a key that does not exist and another user's key give the same
//! error.

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::{JsonB, Uuid};

use crate::caller::Manager;
use crate::error::{KeyhippoError, Result};
use crate::pg::backend;
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
               SET is_revoked = true, revoked_at = pg_catalog.now(), revoked_reason = $4 \
             WHERE m.id = $1 AND NOT m.is_revoked AND (m.user_id = $2 OR $3) \
            RETURNING m.id) \
          SELECT EXISTS (SELECT 1 FROM r), \
                 EXISTS (SELECT 1 FROM keyhippo.api_key_metadata m \
                          WHERE m.id = $1 AND (m.user_id = $2 OR $3))",
    args: &[types::UUID, types::UUID, types::BOOL, types::TEXT],
    mutating: true,
};

/// Disables ($4 true) or enables ($4 false) a key the caller owns (or any key, for an admin):
/// (changed now, visible, revoked), in one statement as [`REVOKE`] does.
const SET_DISABLED: Plan = Plan {
    sql: "WITH d AS ( \
            UPDATE keyhippo.api_key_metadata m \
               SET disabled_at = CASE WHEN $4 THEN pg_catalog.now() END \
             WHERE m.id = $1 AND NOT m.is_revoked AND (m.user_id = $2 OR $3) \
               AND (m.disabled_at IS NULL) = $4 \
            RETURNING m.id) \
          SELECT EXISTS (SELECT 1 FROM d), v.id IS NOT NULL, COALESCE(v.is_revoked, false) \
            FROM (SELECT 1) one \
            LEFT JOIN keyhippo.api_key_metadata v ON v.id = $1 AND (v.user_id = $2 OR $3)",
    args: &[types::UUID, types::UUID, types::BOOL, types::BOOL],
    mutating: true,
};

const ROTATE_SOURCE: Plan = Plan {
    sql: "SELECT m.user_id, m.scope_id, m.description, m.claims, m.is_revoked, \
                 pg_catalog.now() + (m.expires_at - m.created_at), m.prefix, \
                 m.revoked_reason, m.expires_at <= pg_catalog.now(), m.disabled_at IS NOT NULL \
            FROM keyhippo.api_key_metadata m \
           WHERE m.id = $1 AND (m.user_id = $2 OR $3) \
             FOR UPDATE",
    args: &[types::UUID, types::UUID, types::BOOL],
    mutating: true,
};

/// Ends a rotated key's life at the end of its grace period (now() + $2; never later than it
/// would have ended anyway: a NULL $2, a period past the last timestamp, keeps expires_at).
const END_AFTER_GRACE: Plan = Plan {
    sql: "UPDATE keyhippo.api_key_metadata m \
             SET expires_at = LEAST(m.expires_at, pg_catalog.now() + $2), \
                 revoked_reason = 'rotated' \
           WHERE m.id = $1",
    args: &[types::UUID, types::INTERVAL],
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

/// Why a key was revoked, in `revoked_reason`.
#[derive(Clone, Copy)]
pub enum Reason {
    Revoked,
    Rotated,
}

impl Reason {
    fn name(self) -> &'static str {
        match self {
            Reason::Revoked => "revoked",
            Reason::Rotated => "rotated",
        }
    }
}

fn required(id: Option<Uuid>, name: &str) -> Result<Uuid> {
    id.ok_or_else(|| KeyhippoError::InvalidArgument(format!("keyhippo: {name} must not be NULL")))
}

/// Revokes a key: true when this call revoked it, false when it was already revoked; P0002 for a
/// key that does not exist or is not the caller's (admins may revoke any key).
pub fn revoke(api_key_id: Option<Uuid>) -> Result<bool> {
    let id = required(api_key_id, "api_key_id")?;
    let manager = Manager::current()?;
    Spi::connect_mut(|client| revoke_with(client, &manager, id, Reason::Revoked))
}

fn revoke_with(
    client: &mut pgrx::spi::SpiClient<'_>,
    manager: &Manager,
    id: Uuid,
    reason: Reason,
) -> Result<bool> {
    let [key, user, is_admin] = manager.args(id);
    let row = REVOKE
        .run(client, &[key, user, is_admin, reason.name().into()])?
        .first();
    let revoked = row.get::<bool>(1)?.unwrap_or(false);
    let visible = row.get::<bool>(2)?.unwrap_or(false);
    match (revoked, visible) {
        (true, _) => Ok(true),
        (false, true) => Ok(false),
        (false, false) => Err(key_not_found()),
    }
}

/// Disables (`disable` true) or enables a key: true when this call changed it, false when it
/// already was so; P0002 as for [`revoke`]. A revoked key cannot be enabled (55000); disabling
/// it changes nothing (false).
pub fn set_disabled(api_key_id: Option<Uuid>, disable: bool) -> Result<bool> {
    let id = required(api_key_id, "api_key_id")?;
    let manager = Manager::current()?;
    Spi::connect_mut(|client| {
        let [key, user, is_admin] = manager.args(id);
        let row = SET_DISABLED
            .run(client, &[key, user, is_admin, disable.into()])?
            .first();
        let changed = row.get::<bool>(1)?.unwrap_or(false);
        let visible = row.get::<bool>(2)?.unwrap_or(false);
        let revoked = row.get::<bool>(3)?.unwrap_or(false);
        match (changed, visible, revoked) {
            (true, _, _) => Ok(true),
            (false, false, _) => Err(key_not_found()),
            (false, true, true) if !disable => Err(KeyhippoError::WrongState(
                "keyhippo: the API key is revoked and cannot be enabled; create a new key instead"
                    .into(),
            )),
            (false, true, _) => Ok(false),
        }
    })
}

/// Replaces a key with a new one of the same owner, description, scope, claims and lifetime (a
/// JWT key with a JWT key); returns (new key, its id). The old key is revoked at once when
/// `grace_period` is zero or NULL, else it keeps working until the grace period ends (or until
/// it would have expired, if sooner). One key is rotated once: a revoked, expired or disabled
/// key, or one already rotated, is 55000, also for the loser of two concurrent rotations.
pub fn rotate(
    old_api_key_id: Option<Uuid>,
    grace_period: Option<Interval>,
) -> Result<(String, Uuid)> {
    let id = required(old_api_key_id, "old_api_key_id")?;
    let grace = grace_period.filter(|g| g.as_micros() != 0);
    if grace.is_some_and(|g| g.as_micros() < 0) {
        return Err(KeyhippoError::InvalidArgument(
            "keyhippo: grace_period must not be negative".into(),
        ));
    }
    let manager = Manager::current()?;
    let user = manager.user;
    Spi::connect_mut(|client| {
        let old = ROTATE_SOURCE.run(client, &manager.args(id))?.first();
        if old.is_empty() {
            return Err(key_not_found());
        }
        let wrong_state = |what: &str, instead: &str| {
            Err(KeyhippoError::WrongState(format!(
                "keyhippo: the API key {what} and cannot be rotated; {instead}"
            )))
        };
        if old.get::<bool>(5)?.unwrap_or(false) {
            return wrong_state("is revoked", "create a new key instead");
        }
        if old.get::<String>(8)?.as_deref() == Some("rotated") {
            return wrong_state(
                "was already rotated (it is in its grace period)",
                "use the key that replaced it",
            );
        }
        if old.get::<bool>(9)?.unwrap_or(false) {
            return wrong_state("has expired", "create a new key instead");
        }
        if old.get::<bool>(10)?.unwrap_or(false) {
            return wrong_state("is disabled", "enable it first");
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
        match grace {
            None => {
                revoke_with(client, &manager, id, Reason::Rotated)?;
            }
            Some(grace) => {
                // A grace period past the last timestamp PostgreSQL holds ends no earlier than
                // the key would have: expires_at is kept (NULL in LEAST).
                let grace =
                    backend::plus_interval(backend::transaction_start(), grace).map(|_| grace);
                END_AFTER_GRACE.run(client, &[id.into(), grace.into()])?;
            }
        }
        Ok(created)
    })
}

/// Replaces a key's claims (a JSON object) for its owner or an admin.
pub fn update_claims(key_id: Option<Uuid>, new_claims: Option<JsonB>) -> Result<()> {
    let id = required(key_id, "key_id")?;
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
