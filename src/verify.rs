//! Verifying a key: the path every request takes.
//!
//! Format and checksum first (no table touched for junk), then the key row found by its prefix
//! (two index probes, or a prepared statement), then a constant-time hash comparison, then the
//! key's permissions and the recording of its use. Verify runs no SQL on its common path and
//! is not SECURITY DEFINER: the index probes do no ACL checks, and the rare statements it runs
//! switch to the extension owner with a pinned search_path (src/pg/elevate.rs).

use pgrx::prelude::*;
use pgrx::Uuid;

use crate::error::Result;
use crate::model::{KeyRow, PermissionsOf, VerifiedKey};
use crate::pg::backend;
use crate::pg::elevate::as_owner;
use crate::pg::lookup;
use crate::pg::plans::{types, Plan};
use crate::{
    cache, fallback_use, imported_keys, jwt_keys, limits, permissions, settings, usage,
    usage_counts,
};
use keyhippo_core::{hash, token};

/// What a key is, as `verify_api_key_status` reports it. Only [`Status::Valid`] admits a request.
pub enum Status {
    /// A key this database issued, whose secret matched, enabled and unexpired.
    Valid {
        key: VerifiedKey,
        /// TimestampTz.
        expires_at: i64,
    },
    /// Anything else that is not a usable key: junk, a wrong secret, an unknown or revoked key.
    NotFound,
    /// The secret matched; the key is past its expiry.
    Expired(Refused),
    /// The secret matched; the key is disabled.
    Disabled(Refused),
    /// A valid key whose rate limit has no room left (only from [`admit`]).
    RateLimited(Refused),
    /// A valid key without the credits the request costs (only from [`admit`]).
    UsageExceeded(Refused),
}

/// The key row of a key refused for being expired or disabled (its secret matched).
pub struct Refused {
    pub id: Uuid,
    pub user_id: Uuid,
    pub scope_id: Option<Uuid>,
    /// TimestampTz.
    pub expires_at: i64,
}

impl Status {
    /// The name `verify_api_key_status` returns.
    pub fn name(&self) -> &'static str {
        match self {
            Status::Valid { .. } => "VALID",
            Status::NotFound => "NOT_FOUND",
            Status::Expired(_) => "EXPIRED",
            Status::Disabled(_) => "DISABLED",
            Status::RateLimited(_) => "RATE_LIMITED",
            Status::UsageExceeded(_) => "USAGE_EXCEEDED",
        }
    }

    /// The key, when valid.
    pub fn valid(self) -> Option<VerifiedKey> {
        match self {
            Status::Valid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Verifies a key for use: the key when it is valid, None for anything else (never an error for
/// bad input). Records the use.
pub fn verify(api_key: Option<&str>) -> Result<Option<VerifiedKey>> {
    Ok(check(api_key, true)?.valid())
}

/// Verifies a key to admit a request (`verify_api_key_status`, `check_request`): as [`check`],
/// and a valid key's request is counted against its rate limits (once per transaction), which
/// may refuse it. The outcome is counted for `keyhippo.api_key_usage`.
pub fn admit(api_key: Option<&str>) -> Result<Status> {
    let status = admission(api_key)?;
    match &status {
        Status::Valid { key, .. } => usage_counts::count(key.id, status.name()),
        Status::Expired(key)
        | Status::Disabled(key)
        | Status::RateLimited(key)
        | Status::UsageExceeded(key) => usage_counts::count(key.id, status.name()),
        Status::NotFound => {}
    }
    Ok(status)
}

fn admission(api_key: Option<&str>) -> Result<Status> {
    let status = check(api_key, true)?;
    let Status::Valid { key, expires_at } = status else {
        return Ok(status);
    };
    let refused = Refused {
        id: key.id,
        user_id: key.user_id,
        scope_id: key.scope_id,
        expires_at,
    };
    Ok(match limits::admit(key.id, key.user_id)? {
        limits::Admission::Admitted => Status::Valid { key, expires_at },
        limits::Admission::RateLimited => Status::RateLimited(refused),
        limits::Admission::UsageExceeded => Status::UsageExceeded(refused),
    })
}

/// The verify path shared by every caller: format and checksum first (no table touched for
/// junk), then one indexed lookup, then a constant-time hash comparison, then the key's state.
/// `record_use`: whether a valid key's use is recorded in `last_used_at` (not when a key is
/// reported as leaked).
pub fn check(api_key: Option<&str>, record_use: bool) -> Result<Status> {
    let Some(api_key) = api_key else {
        return Ok(Status::NotFound);
    };
    // Opaque keys carry their lookup prefix; JWT keys are checked (signature, alg, type) and
    // found by their jti; keys migrated from KeyHippo 1.2.5 carry theirs too. Anything else is
    // rejected without touching a table.
    let (prefix, token_expired) = match token::parse(api_key) {
        Ok(parsed) => (parsed.prefix.to_string(), false),
        Err(_) => match jwt_keys::lookup_prefix(api_key) {
            Some(found) => found,
            None => match token::parse_legacy(api_key) {
                Some(prefix) => (prefix.to_string(), false),
                None => return imported(api_key, record_use),
            },
        },
    };
    let now = backend::transaction_start();
    if !token_expired {
        if let Some(cached) = cache::lookup(&prefix, api_key, now) {
            return Ok(match cached {
                Some((key, expires_at, due)) => {
                    if due && record_use {
                        record(key.id, now);
                    }
                    Status::Valid { key, expires_at }
                }
                None => Status::NotFound,
            });
        }
    }
    let before = cache::begin_lookup();
    // The index probes (src/pg/lookup.rs); the same lookup as a prepared statement when they are
    // switched off or cannot find the extension's indexes.
    let find = || {
        if settings::INDEX_PROBES.get() {
            if let Ok(found) = lookup::find(&prefix) {
                return Ok(found);
            }
        }
        find_by_statement(&prefix)
    };
    // Only a lookup whose row may be cached needs a snapshot of its own.
    let found = if cache::keys_enabled() {
        cache::with_fresh_snapshot(before, find)?
    } else {
        find()?
    };
    let Some(row) = found else {
        return Ok(Status::NotFound);
    };
    let checked = Checked {
        api_key,
        prefix: &prefix,
        now,
        before,
        token_expired,
        record_use,
    };
    checked.status_of(row)
}

/// A key of no shape keyhippo knows: a key imported from another system, found by the hash of
/// the whole key (src/imported_keys.rs), or nothing. Not cached: it has no prefix to cache it under.
fn imported(api_key: &str, record_use: bool) -> Result<Status> {
    let Some(row) = imported_keys::find(api_key)? else {
        return Ok(Status::NotFound);
    };
    let checked = Checked {
        api_key,
        prefix: "",
        now: backend::transaction_start(),
        before: None,
        token_expired: false,
        record_use,
    };
    checked.status_of(row)
}

/// Records a use of key `id` at `now`: in shared memory, or at commit when that is full or
/// missing.
fn record(id: Uuid, now: i64) {
    if !usage::record(id, now) && fallback_use::possible() {
        fallback_use::record_at_commit(id);
    }
}

const FIND_KEY: Plan = Plan {
    sql: "SELECT m.id, m.user_id, m.scope_id, m.last_used_at, m.expires_at, m.is_revoked, \
                 s.key_hash, m.disabled_at IS NOT NULL \
            FROM keyhippo.api_key_metadata m \
            JOIN keyhippo.api_key_secrets s ON s.key_metadata_id = m.id \
           WHERE m.prefix = $1",
    args: &[types::TEXT],
    mutating: false,
};

/// The key row with this prefix and its hash, through a prepared statement run as the
/// extension's owner (api_key_secrets is readable by no client role).
fn find_by_statement(prefix: &str) -> Result<Option<KeyRow>> {
    as_owner(|| Spi::connect(|client| FIND_KEY.key_row(client, &[prefix.into()])))
}

/// One lookup's context, for judging the row it found.
struct Checked<'a> {
    api_key: &'a str,
    prefix: &'a str,
    /// The transaction's start (TimestampTz): keys expire against it.
    now: i64,
    before: Option<u64>,
    /// A JWT key past its `exp`.
    token_expired: bool,
    record_use: bool,
}

impl Checked<'_> {
    /// The status of the key row found: the hash first (nothing about a key is told to whoever
    /// does not hold all of it), then revoked, expired, disabled; for a valid key its
    /// permissions, the cache, and the recording of its use.
    fn status_of(&self, row: KeyRow) -> Result<Status> {
        if !hash::verify_key(self.api_key, &row.key_hash) || row.is_revoked {
            return Ok(Status::NotFound);
        }
        let refused = || Refused {
            id: row.id,
            user_id: row.user_id,
            scope_id: row.scope_id,
            expires_at: row.expires_at,
        };
        if row.expires_at <= self.now || self.token_expired {
            return Ok(Status::Expired(refused()));
        }
        if row.is_disabled {
            return Ok(Status::Disabled(refused()));
        }
        let permissions = match cache::permissions(&PermissionsOf::key(row.user_id, row.scope_id)) {
            Some(permissions) => permissions,
            None => as_owner(|| permissions::fresh(row.user_id, row.scope_id))?,
        };
        let key = VerifiedKey {
            id: row.id,
            user_id: row.user_id,
            scope_id: row.scope_id,
            permissions,
        };
        let due = usage::due(row.last_used_at, self.now);
        if due && self.record_use {
            record(row.id, self.now);
        }
        // The last use the cache entry knows: this one when recorded now.
        let used_at = if due && self.record_use {
            self.now
        } else {
            row.last_used_at.unwrap_or(i64::MIN)
        };
        cache::store(
            self.before,
            self.prefix,
            &row.key_hash,
            &key,
            row.expires_at,
            used_at,
        );
        Ok(Status::Valid {
            key,
            expires_at: row.expires_at,
        })
    }
}
