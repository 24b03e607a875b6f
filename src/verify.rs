//! Verifying a key: the path every request takes.
//!
//! Format and checksum first (no table touched for junk), then the key row found by its prefix
//! (two index probes, or a prepared statement), then a constant-time hash comparison, then the
//! key's permissions and the recording of its use. Verify runs no SQL on its common path and
//! is not SECURITY DEFINER: the index probes do no ACL checks, and the rare statements it runs
//! switch to the extension owner with a pinned search_path (src/pg/elevate.rs).

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::Uuid;

use crate::error::Result;
use crate::model::{KeyRow, PermissionsOf, VerifiedKey};
use crate::pg::backend;
use crate::pg::elevate::as_owner;
use crate::pg::lookup;
use crate::pg::plans::{types, Plan};
use crate::{cache, fallback_use, jwt_keys, permissions, settings, usage};
use keyhippo_core::{hash, token};

/// The verify path shared by every caller: format and checksum first (no table touched for
/// junk), then one indexed lookup, then a constant-time hash comparison.
pub fn verify(api_key: Option<&str>) -> Result<Option<VerifiedKey>> {
    let Some(api_key) = api_key else {
        return Ok(None);
    };
    // Opaque keys carry their lookup prefix; JWT keys are checked (signature, alg, type, exp)
    // and found by their jti. Anything else is rejected without touching a table.
    let prefix = match token::parse(api_key) {
        Ok(parsed) => parsed.prefix.to_string(),
        Err(_) => match jwt_keys::lookup_prefix(api_key) {
            Some(prefix) => prefix,
            None => return Ok(None),
        },
    };
    let now = backend::transaction_start();
    if let Some(cached) = cache::lookup(&prefix, api_key, now) {
        return Ok(cached.map(|(verified, due)| {
            if due && !usage::record(verified.id, now) && fallback_use::possible() {
                fallback_use::record_at_commit(verified.id);
            }
            verified
        }));
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
    verified_from_row(api_key, &prefix, now, before, found)
}

const FIND_KEY: Plan = Plan {
    sql: "SELECT m.id, m.user_id, m.scope_id, m.last_used_at, m.expires_at, m.is_revoked, s.key_hash \
            FROM keyhippo.api_key_metadata m \
            JOIN keyhippo.api_key_secrets s ON s.key_metadata_id = m.id \
           WHERE m.prefix = $1",
    args: &[types::TEXT],
    mutating: false,
};

/// The key row with this prefix and its hash, through a prepared statement run as the
/// extension's owner (api_key_secrets is readable by no client role).
fn find_by_statement(prefix: &str) -> Result<Option<KeyRow>> {
    as_owner(|| {
        Spi::connect(|client| {
            let rows = FIND_KEY.run(client, &[prefix.into()])?;
            let Some(row) = rows.into_iter().next() else {
                return Ok(None);
            };
            let (Some(id), Some(user_id), Some(expires_at), Some(is_revoked)) = (
                row.get::<Uuid>(1)?,
                row.get::<Uuid>(2)?,
                row.get::<TimestampWithTimeZone>(5)?,
                row.get::<bool>(6)?,
            ) else {
                return Ok(None);
            };
            Ok(Some(KeyRow {
                id,
                user_id,
                scope_id: row.get::<Uuid>(3)?,
                key_hash: row.get::<String>(7)?.unwrap_or_default(),
                expires_at: expires_at.into(),
                last_used_at: row.get::<TimestampWithTimeZone>(4)?.map(i64::from),
                is_revoked,
            }))
        })
    })
}

/// Microseconds between the Unix epoch and Postgres' (2000-01-01).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The checks of verify on a key row found by [`lookup::find`]: not revoked, not expired,
/// the hash matches; then permissions, the cache, and recording the use at `now` (the
/// transaction's start, TimestampTz).
fn verified_from_row(
    api_key: &str,
    prefix: &str,
    now: i64,
    before: Option<u64>,
    found: Option<KeyRow>,
) -> Result<Option<VerifiedKey>> {
    let Some(row) = found else { return Ok(None) };
    if row.is_revoked || row.expires_at <= now || !hash::verify_key(api_key, &row.key_hash) {
        return Ok(None);
    }
    let permissions = match cache::permissions(&PermissionsOf::key(row.user_id, row.scope_id)) {
        Some(permissions) => permissions,
        None => as_owner(|| permissions::fresh(row.user_id, row.scope_id))?,
    };
    let verified = VerifiedKey {
        id: row.id,
        user_id: row.user_id,
        scope_id: row.scope_id,
        permissions,
    };
    let due = usage::due(row.last_used_at, now);
    if due && !usage::record(row.id, now) && fallback_use::possible() {
        fallback_use::record_at_commit(row.id);
    }
    let used_at = match row.last_used_at {
        Some(used) if !due => used,
        _ => now,
    };
    cache::store(
        before,
        prefix,
        &row.key_hash,
        &verified,
        row.expires_at + POSTGRES_EPOCH_MICROS,
        used_at,
    );
    Ok(Some(verified))
}
