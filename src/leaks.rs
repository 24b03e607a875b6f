//! Reports of leaked keys: whoever finds keys where they should not be (a secret scanner, a
//! stranger reading a public repository) hands them in, and every one that is a key of this
//! database is revoked with the reason `leaked` and its owner told. The call says nothing back,
//! so it cannot be used to find out whether a key works.

use std::collections::HashSet;

use pgrx::prelude::*;
use pgrx::Uuid;

use crate::error::{KeyhippoError, Result};
use crate::pg::plans::{types, Plan};
use crate::verify::{self, Status};

/// The most keys one report may hold.
pub const MAX_KEYS: usize = 1000;
/// The longest key a report may hold, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;

/// The NOTIFY channel told of each leaked key (the payload names the key id only).
pub const CHANNEL: &str = "keyhippo_key_leaked";

/// Revokes one key as leaked, writes the `leaked_key` audit row (which the audit webhook
/// delivers when it is configured) and queues the notification; nothing when the key was
/// already revoked.
const REVOKE_LEAKED: Plan = Plan {
    sql: "WITH r AS ( \
            UPDATE keyhippo.api_key_metadata m \
               SET is_revoked = true, revoked_at = pg_catalog.now(), revoked_reason = 'leaked' \
             WHERE m.id = $1 AND NOT m.is_revoked \
            RETURNING m.id, m.user_id, m.prefix, m.description), \
          a AS ( \
            INSERT INTO keyhippo.audit_log (action, table_name, data, user_id, function_name) \
            SELECT 'leaked_key', 'api_key_metadata', \
                   pg_catalog.jsonb_build_object('event', 'leaked_key', 'leaked_key', \
                       pg_catalog.jsonb_build_object('id', r.id, 'user_id', r.user_id, \
                                                     'prefix', r.prefix, \
                                                     'description', r.description)), \
                   keyhippo_internal.current_user_id(), 'report_leaked_keys' \
              FROM r) \
          SELECT pg_catalog.pg_notify($2, \
                     pg_catalog.jsonb_build_object('event', 'leaked_key', 'id', r.id)::text) \
            FROM r",
    args: &[types::UUID, types::TEXT],
    mutating: true,
};

/// Checks a report's size: at most [`MAX_KEYS`] keys of at most [`MAX_KEY_BYTES`] each.
fn check_size(count: usize, keys: &[Option<&str>]) -> Result<()> {
    if count > MAX_KEYS {
        return Err(KeyhippoError::InvalidArgument(format!(
            "keyhippo: report_leaked_keys takes at most {MAX_KEYS} keys per call; split the list"
        )));
    }
    if keys
        .iter()
        .any(|k| k.is_some_and(|k| k.len() > MAX_KEY_BYTES))
    {
        return Err(KeyhippoError::InvalidArgument(format!(
            "keyhippo: report_leaked_keys takes keys of at most {MAX_KEY_BYTES} bytes; no key keyhippo issues is longer"
        )));
    }
    Ok(())
}

/// Revokes every key among `keys` whose secret matches one of this database's (valid, expired
/// or disabled alike), once each; junk costs no table read (verify's format check).
pub fn report<'a>(count: usize, keys: impl Iterator<Item = Option<&'a str>>) -> Result<()> {
    let keys: Vec<Option<&str>> = if count > MAX_KEYS {
        Vec::new()
    } else {
        keys.collect()
    };
    check_size(count, &keys)?;
    let mut found = HashSet::new();
    for key in keys.into_iter().flatten() {
        let id = match verify::check(Some(key), false)? {
            Status::Valid { key, .. } => key.id,
            Status::Expired(key)
            | Status::Disabled(key)
            | Status::RateLimited(key)
            | Status::UsageExceeded(key) => key.id,
            Status::NotFound => continue,
        };
        found.insert(id);
    }
    if found.is_empty() {
        return Ok(());
    }
    let mut ids: Vec<Uuid> = found.into_iter().collect();
    // One order, whoever reports: two reports of the same keys never wait on each other in a
    // circle.
    ids.sort_by(|a, b| a.as_bytes().cmp(b.as_bytes()));
    Spi::connect_mut(|client| {
        for id in ids {
            REVOKE_LEAKED.run(client, &[id.into(), CHANNEL.into()])?;
        }
        Ok(())
    })
}
