//! How verify finds a key imported from another system (src/import.rs): such a key has no
//! prefix keyhippo can tell, so it is found by the hash of the whole key, in a partial index that
//! holds imported keys alone, and only in a database that holds any.

use std::cell::Cell;

use pgrx::prelude::*;

use crate::cache;
use crate::error::Result;
use crate::model::KeyRow;
use crate::pg::elevate::as_owner;
use crate::pg::plans::{types, Plan};
use keyhippo_core::hash;

const ANY_IMPORTED: Plan = Plan {
    sql: "SELECT EXISTS (SELECT 1 FROM keyhippo.api_key_secrets s \
                          WHERE s.key_hash LIKE 'imported-%')",
    args: &[],
    mutating: false,
};

const FIND_IMPORTED: Plan = Plan {
    sql: "SELECT m.id, m.user_id, m.scope_id, m.last_used_at, m.expires_at, m.is_revoked, \
                 s.key_hash, m.disabled_at IS NOT NULL \
            FROM keyhippo.api_key_secrets s \
            JOIN keyhippo.api_key_metadata m ON m.id = s.key_metadata_id \
           WHERE s.key_hash = $1 AND s.key_hash LIKE 'imported-%'",
    args: &[types::TEXT],
    mutating: false,
};

thread_local! {
    /// Whether this database held imported keys when last asked, and the cache epoch then
    /// (src/cache.rs): asked again only after a change.
    static KNOWN: Cell<Option<(u64, bool)>> = const { Cell::new(None) };
}

/// Whether this database may hold imported keys: asked once per change of keys when keyhippo is
/// preloaded (kept as the key cache keeps a key: only an answer no change in flight could
/// alter, and only until the next change), at every call otherwise.
fn may_hold_imported() -> Result<bool> {
    if let Some((epoch, known)) = KNOWN.with(Cell::get) {
        if cache::current(epoch) {
            return Ok(known);
        }
    }
    let before = cache::begin_lookup();
    let any = cache::with_fresh_snapshot(before, || {
        as_owner(|| {
            Spi::connect(|client| Ok(ANY_IMPORTED.run(client, &[])?.first().get::<bool>(1)?))
        })
    })?
    .unwrap_or(false);
    if let Some(epoch) = cache::stamp(before) {
        KNOWN.with(|k| k.set(Some((epoch, any))));
    }
    Ok(any)
}

/// The imported key that is `api_key`, if any: one probe of the imported keys' index, only in a
/// database that holds imported keys.
pub fn find(api_key: &str) -> Result<Option<KeyRow>> {
    if !may_hold_imported()? {
        return Ok(None);
    }
    let lookup = hash::imported_hash(api_key);
    as_owner(|| Spi::connect(|client| FIND_IMPORTED.key_row(client, &[lookup.as_str().into()])))
}
