//! The trigger that reports a key whose expiry a write moves into the notification window.
//!
//! In Rust, without a `WHEN` clause: Postgres parses a trigger's `WHEN` expression from its
//! stored text and compiles it again for every statement that fires it, and `create_api_key`
//! is one statement per key, so a `WHEN` clause would be paid at every create. Here the
//! common case (a key expiring more than a year from now, or an update that leaves `expires_at`
//! alone) is two integer comparisons; only a key that may be in the window runs SQL
//! (`keyhippo_internal.expiring_key_written`, sql/audit.sql), which reads the configured window
//! and reports the key.

use crate::error::Result;
use crate::pg::backend;
use crate::pg::elevate::as_owner;
use crate::pg::plans::{types, Plan};
use crate::pg::trigger::{Event, RowTrigger};

/// The widest notification window (`key_expiry_notification_hours` is capped at a year): keys
/// expiring later than this are never in it.
const MAX_WINDOW_MICROS: i64 = 8760 * 3600 * 1_000_000;

const EXPIRING_KEY_WRITTEN: Plan = Plan {
    sql: "SELECT keyhippo_internal.expiring_key_written($1, $2, $3, $4, $5)",
    args: &[
        types::UUID,
        types::UUID,
        types::TEXT,
        types::TIMESTAMPTZ,
        types::TIMESTAMPTZ,
    ],
    mutating: true,
};

/// `AFTER INSERT OR UPDATE OF expires_at ON keyhippo.api_key_metadata FOR EACH ROW`: reports
/// the key when the write moves its expiry into the notification window.
pub fn check(trigger: &RowTrigger<'_>) -> Result<()> {
    // Loading a dump reports nothing: the original database reported its keys already.
    if backend::restoring() {
        return Ok(());
    }
    let (new, old) = match trigger.event() {
        Event::Insert | Event::Update => (trigger.new_row(), trigger.old_row()),
        _ => return Ok(()),
    };
    let Some(new) = new else { return Ok(()) };
    let Some(expires_at) = new.get::<i64>(c"expires_at") else {
        return Ok(());
    };
    let now = backend::transaction_start();
    if expires_at > now.saturating_add(MAX_WINDOW_MICROS) {
        return Ok(());
    }
    let old_expires_at = match old {
        Some(old) => {
            let previous = old.get::<i64>(c"expires_at");
            if previous == Some(expires_at) {
                return Ok(());
            }
            previous
        }
        None => None,
    };
    if new.get::<bool>(c"is_revoked").unwrap_or(false) {
        return Ok(());
    }
    let id = new.get::<pgrx::Uuid>(c"id");
    let user_id = new.get::<pgrx::Uuid>(c"user_id");
    let description = new.get::<String>(c"description");
    let timestamp = |micros: i64| pgrx::datum::TimestampWithTimeZone::try_from(micros).ok();
    as_owner(|| {
        pgrx::spi::Spi::connect_mut(|client| {
            EXPIRING_KEY_WRITTEN
                .run(
                    client,
                    &[
                        id.into(),
                        user_id.into(),
                        description.into(),
                        timestamp(expires_at).into(),
                        old_expires_at.and_then(timestamp).into(),
                    ],
                )
                .map(|_| ())
        })
    })
}
