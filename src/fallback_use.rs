//! Recording a use where no background worker does (keyhippo not preloaded, or a database other
//! than the one the worker serves, or its buffer full): a synchronous `last_used_at` update,
//! made when the verifying transaction commits rather than when verify runs.
//!
//! Made during verify, the update would hold the key row's lock until the verifying transaction
//! ends, and a request that verifies and then runs long would hold up `revoke_api_key`, rotate
//! and its owner's updates for as long; in REPEATABLE READ it would also fail when another
//! transaction had changed the row since the snapshot. So verify only notes the key, and the
//! update runs just before commit (`XACT_EVENT_PRE_COMMIT`), inside a subtransaction: it locks
//! the row for the few microseconds left until commit, skips a row another transaction holds,
//! and whatever goes wrong (a concurrent update in REPEATABLE READ, a dropped table) is
//! discarded with the subtransaction: recording a use never makes verify or the commit fail.

use pgrx::prelude::*;
use pgrx::{register_xact_callback, PgXactCallbackEvent};
use std::cell::RefCell;

use crate::pg::elevate::as_owner;
use crate::pg::plans::{types, Plan};
use crate::pg::{backend, subxact};

/// Records a use without ever waiting: a row another transaction holds is skipped (that
/// transaction is recording a use of its own, or revoking or changing the key).
const TOUCH_LAST_USED: Plan = Plan {
    sql: "UPDATE keyhippo.api_key_metadata m SET last_used_at = pg_catalog.now() \
           WHERE m.id = ANY ($1) \
             AND m.id IN (SELECT l.id FROM keyhippo.api_key_metadata l \
                           WHERE l.id = ANY ($1) FOR UPDATE SKIP LOCKED)",
    args: &[types::UUID_ARRAY],
    mutating: true,
};

thread_local! {
    /// Keys whose use this transaction records at commit; None when nothing is pending.
    static PENDING: RefCell<Option<Vec<pgrx::Uuid>>> = const { RefCell::new(None) };
}

/// Whether this transaction can record a use at commit: it may write (not READ ONLY, not a hot
/// standby), and it is not SERIALIZABLE (where the write could make the commit fail).
pub fn possible() -> bool {
    backend::may_write_freely()
}

/// Notes a use of key `id`, written when this transaction commits.
pub fn record_at_commit(id: pgrx::Uuid) {
    let first = PENDING.with(|p| {
        let mut p = p.borrow_mut();
        let first = p.is_none();
        let ids = p.get_or_insert_with(Vec::new);
        if !ids.contains(&id) {
            ids.push(id);
        }
        first
    });
    if first {
        register_xact_callback(PgXactCallbackEvent::PreCommit, write_pending);
        register_xact_callback(PgXactCallbackEvent::Abort, || {
            PENDING.with(|p| p.borrow_mut().take());
        });
    }
}

/// Writes the noted uses in a subtransaction whose failure is discarded.
fn write_pending() {
    let Some(ids) = PENDING.with(|p| p.borrow_mut().take()) else {
        return;
    };
    subxact::discard_on_failure(|| {
        // Commit has released the statement's snapshot: the update takes one of its own.
        backend::with_transaction_snapshot(|| {
            as_owner(|| {
                Spi::connect_mut(|client| {
                    TOUCH_LAST_USED
                        .run(client, &[ids.clone().into()])
                        .map(|_| ())
                })
            })
            .is_ok()
        })
    });
}
