//! Per-backend caches of verified keys and of permissions, safe against revocation and
//! permission changes in any other backend.
//!
//! Only when keyhippo is preloaded (it needs shared memory). Two shared counters
//! (src/pg/shmem.rs):
//! - `EPOCH`, bumped whenever a transaction starts changing anything verify depends on (key
//!   rows, hashes, scopes, RBAC), and again when that transaction commits or aborts;
//! - `IN_FLIGHT`, the number of such transactions not yet finished.
//!
//! A cached entry is used only while `EPOCH` still has the value it had when the entry was
//! filled. An entry is filled only from a lookup that read `IN_FLIGHT` as zero and `EPOCH`
//! *before* taking the snapshot it reads with (a snapshot of its own, taken after those reads:
//! the statement's snapshot may be older than the reads, and caching what it shows under the
//! newer epoch would keep a revoked key alive), and during which `EPOCH` did not move. So an
//! entry only holds a state no transaction had changed or was changing, and any change, from
//! its first statement until after its commit is visible, makes every entry stale. A revoked
//! key or a removed role is refused by the very next statement after commit, in every backend.
//!
//! Nothing is filled inside REPEATABLE READ or SERIALIZABLE transactions (their snapshot is
//! fixed; they read without the cache's help) nor on a hot standby, where the triggers that bump
//! `EPOCH` do not run during WAL replay: a standby never caches. (A transaction prepared for
//! two-phase commit leaves `IN_FLIGHT` raised, which switches caching off until restart: safe,
//! only slower.)

use pgrx::{register_xact_callback, PgXactCallbackEvent};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::model::{Permissions, PermissionsOf, VerifiedKey};
use crate::pg::backend;
use crate::pg::shmem::{self, CACHE_EPOCH as EPOCH, CACHE_IN_FLIGHT as IN_FLIGHT};
use crate::{settings, usage};
use keyhippo_core::hash;

/// Entries kept per backend; the cache is emptied when it would grow past this.
const MAX_ENTRIES: usize = 100_000;

struct Entry {
    key_hash: String,
    verified: VerifiedKey,
    /// The key's expiry (TimestampTz).
    expires_at: i64,
    epoch: u64,
    /// The key's last use this backend knows of (recorded, or read from its row; TimestampTz):
    /// a cached verify records a use only when this is an interval old, as verify does from
    /// the row's `last_used_at`.
    used_at: i64,
}

thread_local! {
    static PERMISSIONS: RefCell<HashMap<PermissionsOf, (Rc<Permissions>, u64)>> = RefCell::new(HashMap::new());
    static ENTRIES: RefCell<HashMap<String, Entry>> = RefCell::new(HashMap::new());
    /// Whether this backend's current transaction has announced a change.
    static CHANGING: Cell<bool> = const { Cell::new(false) };
    /// Set once a transaction of this backend was prepared while changing keys.
    static LEAKED: Cell<bool> = const { Cell::new(false) };
}

/// Whether this backend can cache at all: the shared counters exist (keyhippo is preloaded), and
/// it is not a hot standby (WAL replay fires no trigger, so nothing would tell it of a change).
fn enabled() -> bool {
    shmem::preloaded() && !backend::in_recovery()
}

/// Whether verified keys themselves are cached (permissions are whenever [`enabled`]).
pub fn keys_enabled() -> bool {
    settings::VERIFIED_KEY_CACHE.get() && enabled()
}

/// The wall clock now, as a TimestampTz.
fn now_timestamp() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
        - backend::POSTGRES_EPOCH_MICROS
}

/// A cached verification of `api_key` (whose lookup prefix is `prefix`), if one is valid now.
/// `Some(None)` means the cache knows the key is invalid (wrong secret for a cached prefix).
/// With the key, its expiry (TimestampTz) and whether its use at `now` (TimestampTz) is due to
/// be recorded ([`usage::due`] from the last use the entry knows): the entry then counts it as
/// recorded.
pub fn lookup(prefix: &str, api_key: &str, now: i64) -> Option<Option<(VerifiedKey, i64, bool)>> {
    if !keys_enabled() {
        return None;
    }
    let epoch = EPOCH.get().load(Ordering::SeqCst);
    ENTRIES.with(|entries| {
        let mut entries = entries.borrow_mut();
        let entry = entries.get_mut(prefix)?;
        if entry.epoch != epoch || entry.expires_at <= now_timestamp() {
            return None;
        }
        if !hash::verify_key(api_key, &entry.key_hash) {
            return Some(None);
        }
        let due = usage::due(Some(entry.used_at), now);
        if due {
            entry.used_at = now;
        }
        Some(Some((entry.verified.clone(), entry.expires_at, due)))
    })
}

/// A snapshot of the shared counters to take before a lookup whose result may be cached, for
/// [`store`]; None when it may not be (caching off, a change in flight, a transaction-wide
/// snapshot). A lookup whose result is to be cached must read with [`with_fresh_snapshot`].
pub fn begin_lookup() -> Option<u64> {
    if !enabled() || backend::snapshot_is_transaction_wide() {
        return None;
    }
    if IN_FLIGHT.get().load(Ordering::SeqCst) != 0 {
        return None;
    }
    Some(EPOCH.get().load(Ordering::SeqCst))
}

/// Runs `f` under a snapshot taken now, after [`begin_lookup`] read the counters, when `before`
/// says the result may be cached; under the caller's snapshot otherwise. (A READ COMMITTED
/// statement's snapshot predates the call, and a change may have committed in between.)
pub fn with_fresh_snapshot<R>(
    before: Option<u64>,
    f: impl FnOnce() -> crate::error::Result<R>,
) -> crate::error::Result<R> {
    if before.is_none() {
        return f();
    }
    backend::with_latest_snapshot(f)
}

/// The epoch of a lookup that began at `before`, if nothing changed while it ran: only then
/// may its result be cached.
fn unchanged_since(before: Option<u64>) -> Option<u64> {
    let epoch = before?;
    let quiet =
        IN_FLIGHT.get().load(Ordering::SeqCst) == 0 && EPOCH.get().load(Ordering::SeqCst) == epoch;
    quiet.then_some(epoch)
}

/// The epoch under which a value read by a lookup that began at `before` may be kept by another
/// module's cache (src/limits.rs), if nothing changed while it ran.
pub fn stamp(before: Option<u64>) -> Option<u64> {
    unchanged_since(before)
}

/// Whether a value kept under `epoch` (from [`stamp`]) is still current.
pub fn current(epoch: u64) -> bool {
    enabled() && EPOCH.get().load(Ordering::SeqCst) == epoch
}

/// Caches a lookup's result if nothing changed while it ran: the key, its expiry and its last
/// known use (both TimestampTz).
pub fn store(
    before: Option<u64>,
    prefix: &str,
    key_hash: &str,
    verified: &VerifiedKey,
    expires_at: i64,
    used_at: i64,
) {
    if !keys_enabled() {
        return;
    }
    let Some(epoch) = unchanged_since(before) else {
        return;
    };
    ENTRIES.with(|entries| {
        let mut entries = entries.borrow_mut();
        if entries.len() >= MAX_ENTRIES {
            entries.clear();
        }
        entries.insert(
            prefix.to_string(),
            Entry {
                key_hash: key_hash.to_string(),
                verified: verified.clone(),
                expires_at,
                epoch,
                used_at,
            },
        );
    });
}

/// Cached permissions, if still valid.
pub fn permissions(owner: &PermissionsOf) -> Option<Rc<Permissions>> {
    if !enabled() {
        return None;
    }
    let epoch = EPOCH.get().load(Ordering::SeqCst);
    PERMISSIONS.with(|p| {
        p.borrow()
            .get(owner)
            .filter(|(_, e)| *e == epoch)
            .map(|(perms, _)| perms.clone())
    })
}

/// Caches permissions read during a lookup that began at `before`, if nothing changed since.
pub fn store_permissions(before: Option<u64>, owner: PermissionsOf, permissions: &Rc<Permissions>) {
    let Some(epoch) = unchanged_since(before) else {
        return;
    };
    PERMISSIONS.with(|p| {
        let mut p = p.borrow_mut();
        if p.len() >= MAX_ENTRIES {
            p.clear();
        }
        p.insert(owner, (Rc::clone(permissions), epoch));
    });
}

/// Announces that the current transaction changes what verify depends on (the trigger
/// `keyhippo_internal.note_key_change` on every table verify reads).
pub fn begin_change() {
    if !shmem::preloaded() || CHANGING.with(Cell::get) {
        return;
    }
    IN_FLIGHT.get().fetch_add(1, Ordering::SeqCst);
    EPOCH.get().fetch_add(1, Ordering::SeqCst);
    CHANGING.with(|c| c.set(true));
    let finish = || {
        CHANGING.with(|c| c.set(false));
        EPOCH.get().fetch_add(1, Ordering::SeqCst);
        if !LEAKED.with(Cell::get) {
            IN_FLIGHT.get().fetch_sub(1, Ordering::SeqCst);
        }
    };
    register_xact_callback(PgXactCallbackEvent::Commit, finish);
    register_xact_callback(PgXactCallbackEvent::Abort, finish);
    register_xact_callback(PgXactCallbackEvent::Prepare, || {
        LEAKED.with(|l| l.set(true))
    });
}
