//! Issuing a key: checking its owner and scope, generating it, and writing its row, its hash
//! and its audit row in one statement. Only the hash of the key is stored; the plaintext is
//! returned once.

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::GucSetting;
use pgrx::{JsonB, Uuid};
use std::cell::RefCell;
use std::ffi::CString;

use crate::error::{KeyhippoError, Result};
use crate::pg::backend;
use crate::pg::jsonb::{self, NewKeyRow};
use crate::pg::plans::{types, Plan};
use crate::{audit, caller, jwt_keys, settings, users, validate};
use keyhippo_core::{hash, token};

// Its own statement, not a `(SELECT ... WHERE name = $2)` inside the user check: with a NULL
// scope the planner folds that to false, finds the custom plan cheaper and re-plans at every
// call.
const SCOPE_ID: Plan = Plan {
    sql: "SELECT s.id FROM keyhippo.scopes s WHERE s.name = $1",
    args: &[types::TEXT],
    mutating: false,
};

/// A key row, its hash and the key row's audit row, in one statement. The audit row is what the
/// audit trigger would write (it skips this row: see `audit::self_audited`), built in Rust from
/// the values inserted (`jsonb::new_key_audit_row`), so the statement needs no `RETURNING` row
/// and no `to_jsonb`. The foreign key of the hash to the key row is checked at the end of the
/// statement, when both are in.
const INSERT_KEY: Plan = Plan {
    sql: "WITH m AS ( \
            INSERT INTO keyhippo.api_key_metadata \
                (id, user_id, scope_id, description, prefix, claims, created_at, expires_at) \
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)), \
          a AS ( \
            INSERT INTO keyhippo.audit_log (id, action, table_name, data, user_id, function_name) \
            VALUES ($9, 'INSERT', 'api_key_metadata', $10, $11, $12)) \
          INSERT INTO keyhippo.api_key_secrets (key_metadata_id, key_hash) VALUES ($1, $13)",
    args: &[
        types::UUID,
        types::UUID,
        types::UUID,
        types::TEXT,
        types::TEXT,
        types::JSONB,
        types::TIMESTAMPTZ,
        types::TIMESTAMPTZ,
        types::UUID,
        types::JSONB,
        types::UUID,
        types::TEXT,
        types::TEXT,
    ],
    mutating: true,
};

/// What a new key row holds.
pub struct NewKey<'a> {
    pub user_id: Uuid,
    pub scope_id: Option<Uuid>,
    pub description: Option<&'a str>,
    pub claims: Option<JsonB>,
    pub expires_at: Option<TimestampWithTimeZone>,
}

/// Inserts a key row, its hash and its audit row; returns (plaintext key, id). `actor` is the
/// calling user, for the audit row (None for an admin acting without one).
pub fn insert_key(
    client: &pgrx::spi::SpiClient<'_>,
    key: NewKey<'_>,
    actor: Option<Uuid>,
) -> Result<(String, Uuid)> {
    let new_key = token::generate();
    let key_hash = hash::hash_key(&new_key.key);
    // Time-ordered ids: appended at the right edge of the primary keys.
    let id = Uuid::from_bytes(keyhippo_core::uuid::new_v7());
    let created_at = backend::transaction_start();
    let expires_at = match key.expires_at {
        Some(at) => at,
        None => expiry(None)?,
    }
    .into();
    let claims = match &key.claims {
        Some(claims) => claims.0.to_string(),
        None => "{}".to_string(),
    };
    let row = NewKeyRow {
        id,
        user_id: key.user_id,
        scope_id: key.scope_id,
        description: key.description,
        prefix: &new_key.prefix,
        claims: jsonb::from_text(&claims),
        created_at,
        expires_at,
    };
    let audit = jsonb::new_key_audit_row(&row);
    let audit_id = Uuid::from_bytes(keyhippo_core::uuid::new_v7());
    let _audited = audit::self_audited(*id.as_bytes());
    let timestamp = |micros: i64| TimestampWithTimeZone::try_from(micros).ok();
    INSERT_KEY.run(
        client,
        &[
            id.into(),
            key.user_id.into(),
            key.scope_id.into(),
            key.description.into(),
            new_key.prefix.as_str().into(),
            row.claims.argument(),
            timestamp(created_at).into(),
            timestamp(expires_at).into(),
            audit_id.into(),
            audit.argument(),
            actor.into(),
            audit::current_function().into(),
            key_hash.as_str().into(),
        ],
    )?;
    Ok((new_key.key, id))
}

thread_local! {
    /// Interval settings as last parsed: the setting's name, its text, its interval.
    static PARSED: RefCell<Vec<(&'static str, String, Interval)>> = const { RefCell::new(Vec::new()) };
}

/// The positive interval setting `name` holds (parsed once per value and backend); 22023
/// naming the setting while it holds none.
fn interval_setting(
    name: &'static str,
    setting: &GucSetting<Option<CString>>,
    example: &str,
) -> Result<Interval> {
    let text = setting
        .get()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cached = PARSED.with(|p| {
        p.borrow()
            .iter()
            .find(|(n, t, _)| *n == name && *t == text)
            .map(|(_, _, interval)| *interval)
    });
    if let Some(interval) = cached {
        return Ok(interval);
    }
    match backend::parse_interval(&text) {
        Some(interval) if interval.as_micros() > 0 => {
            PARSED.with(|p| {
                let mut p = p.borrow_mut();
                p.retain(|(n, _, _)| *n != name);
                p.push((name, text, interval));
            });
            Ok(interval)
        }
        _ => Err(KeyhippoError::InvalidArgument(format!(
            "keyhippo: {name} ('{}') is not a positive interval; set it to one, such as '{example}'",
            crate::error::echo(&text)
        ))),
    }
}

/// How long a key lives when its creator names no lifetime: `keyhippo.default_key_lifetime`.
fn default_lifetime() -> Result<Interval> {
    interval_setting(
        "keyhippo.default_key_lifetime",
        &settings::DEFAULT_KEY_LIFETIME,
        "100 years",
    )
}

fn not_positive() -> KeyhippoError {
    KeyhippoError::InvalidArgument("keyhippo: expires_in must be positive".into())
}

fn past_last_timestamp() -> KeyhippoError {
    KeyhippoError::InvalidArgument(
        "keyhippo: the key's lifetime leads past the last timestamp PostgreSQL can hold; choose a shorter expires_in (or keyhippo.default_key_lifetime)".into(),
    )
}

/// When a key created now with lifetime `expires_in` expires (the default lifetime when None);
/// 22023 for a lifetime that is not positive.
pub fn expiry(expires_in: Option<Interval>) -> Result<TimestampWithTimeZone> {
    let lifetime = match expires_in {
        Some(lifetime) if lifetime.as_micros() <= 0 => return Err(not_positive()),
        Some(lifetime) => lifetime,
        None => default_lifetime()?,
    };
    backend::plus_interval(backend::transaction_start(), lifetime)
        .and_then(|at| TimestampWithTimeZone::try_from(at).ok())
        .ok_or_else(past_last_timestamp)
}

/// Checks that a new key's owner exists (in auth.users, when there is one) and resolves the
/// scope name; an unknown scope is an error. (The key row's foreign key to auth.users, where
/// there is one, then locks the owner's row as for any INSERT.)
pub fn check_owner_and_scope(
    client: &pgrx::spi::SpiClient<'_>,
    user: Uuid,
    scope_name: Option<&str>,
) -> Result<OwnerCheck> {
    // Every caller writes a key: refuse READ ONLY transactions and hot standbys here with the
    // error an INSERT gets (25006), before anything is touched.
    backend::prevent_write(audit::current_function().unwrap_or("keyhippo"));
    if !users::exists(client, user)? {
        return Err(KeyhippoError::UnknownUser(
            "keyhippo: the authenticated user does not exist in auth.users".into(),
        ));
    }
    Ok(OwnerCheck {
        scope_id: scope_id(client, scope_name)?,
    })
}

/// What [`check_owner_and_scope`] found.
pub struct OwnerCheck {
    pub scope_id: Option<Uuid>,
}

/// The id of scope `scope_name` (None for no scope); an unknown scope is an error.
fn scope_id(client: &pgrx::spi::SpiClient<'_>, scope_name: Option<&str>) -> Result<Option<Uuid>> {
    let Some(name) = scope_name else {
        return Ok(None);
    };
    let scope = SCOPE_ID.run(client, &[name.into()])?;
    let scope_id = if scope.is_empty() {
        None
    } else {
        scope.first().get::<Uuid>(1)?
    };
    if scope_id.is_none() {
        return Err(KeyhippoError::NotFound(format!(
            "keyhippo: scope \"{}\" does not exist",
            crate::error::echo(name)
        )));
    }
    Ok(scope_id)
}

/// Creates a key for the calling user, living `expires_in` (`keyhippo.default_key_lifetime`
/// when None); returns (plaintext key, id).
pub fn create(
    description: Option<&str>,
    scope_name: Option<&str>,
    expires_in: Option<Interval>,
) -> Result<(String, Uuid)> {
    let user = caller::require_user()?;
    let description = validate::description(description)?;
    let expires_at = expiry(expires_in)?;
    Spi::connect_mut(|client| {
        let owner = check_owner_and_scope(client, user, scope_name)?;
        let new = NewKey {
            user_id: user,
            scope_id: owner.scope_id,
            description: Some(description),
            claims: None,
            expires_at: Some(expires_at),
        };
        insert_key(client, new, Some(user))
    })
}

/// Creates a JWT-format key for the calling user, valid for `expires_in` (at most
/// `keyhippo.jwt_max_lifetime`; when None, a year or that maximum if shorter); returns (token,
/// id).
pub fn create_jwt(
    description: Option<&str>,
    expires_in: Option<Interval>,
    scope_name: Option<&str>,
) -> Result<(String, Uuid)> {
    let user = caller::require_user()?;
    let description = validate::description(description)?;
    jwt_keys::signing_secret()?;
    Spi::connect_mut(|client| {
        let scope_id = check_owner_and_scope(client, user, scope_name)?.scope_id;
        let max = interval_setting(
            "keyhippo.jwt_max_lifetime",
            &settings::JWT_MAX_LIFETIME,
            "1 year",
        )?;
        let expires_at = jwt_expiry(expires_in, max)?;
        jwt_keys::insert_jwt_key(
            client,
            user,
            scope_id,
            Some(description),
            None,
            Some(expires_at),
        )
    })
}

/// When a JWT key created now with lifetime `expires_in` expires: when None, a year or `max`
/// if that is shorter (compared as PostgreSQL compares intervals); 22023 for a lifetime that is
/// not positive or ends after `max` would (the times compared, so that '365 days' is within
/// '1 year').
fn jwt_expiry(expires_in: Option<Interval>, max: Interval) -> Result<TimestampWithTimeZone> {
    let year = Interval::from_years(1);
    let lifetime = expires_in.unwrap_or(if max.as_micros() < year.as_micros() {
        max
    } else {
        year
    });
    if lifetime.as_micros() <= 0 {
        return Err(not_positive());
    }
    let now = backend::transaction_start();
    let at = backend::plus_interval(now, lifetime);
    // None: the sum would pass the last timestamp, which bounds nothing (max) or is too long.
    let too_long = match (at, backend::plus_interval(now, max)) {
        (_, None) => false,
        (None, Some(_)) => true,
        (Some(at), Some(longest)) => at > longest,
    };
    if too_long {
        return Err(KeyhippoError::InvalidArgument(format!(
            "keyhippo: expires_in is longer than keyhippo.jwt_max_lifetime ({})",
            crate::error::echo(
                &settings::JWT_MAX_LIFETIME
                    .get()
                    .map(|m| m.to_string_lossy().into_owned())
                    .unwrap_or_default()
            )
        )));
    }
    at.and_then(|at| TimestampWithTimeZone::try_from(at).ok())
        .ok_or_else(past_last_timestamp)
}
