//! Per-backend caches of verified keys and of permissions, safe against revocation and
//! permission changes in any other backend.
//!
//! Only when keyhippo is preloaded (it needs shared memory). Two shared counters:
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

use pgrx::prelude::*;
use pgrx::{pg_shmem_init, register_xact_callback, PgAtomic, PgXactCallbackEvent};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use crate::keys::VerifiedKey;
use keyhippo_core::hash;

static EPOCH: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"keyhippo_cache_epoch") };
static IN_FLIGHT: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"keyhippo_cache_in_flight") };

/// Entries kept per backend; the cache is emptied when it would grow past this.
const MAX_ENTRIES: usize = 100_000;

struct Entry {
    key_hash: String,
    verified: VerifiedKey,
    expires_at_micros: i64,
    epoch: u64,
    /// The key's last use this backend knows of (recorded, or read from its row; TimestampTz):
    /// a cached verify records a use only when this is an interval old, as verify does from
    /// the row's `last_used_at`.
    used_at: i64,
}

/// A key's permissions: the names, and the `text[]` value verify returns, built once per cached
/// set (building the array for every verify cost about 2,000 instructions).
pub struct Permissions {
    pub names: Vec<String>,
    /// The flat array varlena, in 8-byte words so that it is aligned as PostgreSQL expects.
    array: std::cell::OnceCell<Vec<u64>>,
}

impl Permissions {
    pub fn new(names: Vec<String>) -> Rc<Permissions> {
        Rc::new(Permissions {
            names,
            array: std::cell::OnceCell::new(),
        })
    }

    /// The names as a `text[]` datum pointing into this value: valid while it lives, for a
    /// caller that copies it (as `tuplestore_putvalues` does).
    pub fn array_datum(&self) -> pg_sys::Datum {
        let words = self.array.get_or_init(|| {
            let datum = self.names.clone().into_datum().expect("an array");
            // SAFETY: into_datum returned a flat (non-expanded) array varlena we own.
            unsafe {
                let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
                let len = pgrx::varlena::varsize_any(ptr);
                let mut words = vec![0u64; len.div_ceil(8)];
                std::ptr::copy_nonoverlapping(ptr as *const u8, words.as_mut_ptr().cast(), len);
                pg_sys::pfree(ptr.cast());
                words
            }
        });
        pg_sys::Datum::from(words.as_ptr())
    }
}

/// Whose permissions: a scoped key's (its scope's that its owner holds) or a user's RBAC
/// permissions.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum PermissionsOf {
    ScopedKey { scope: [u8; 16], user: [u8; 16] },
    User([u8; 16]),
}

thread_local! {
    static PERMISSIONS: RefCell<HashMap<PermissionsOf, (Rc<Permissions>, u64)>> = RefCell::new(HashMap::new());
    static ENTRIES: RefCell<HashMap<String, Entry>> = RefCell::new(HashMap::new());
    /// Whether this backend's current transaction has announced a change.
    static CHANGING: Cell<bool> = const { Cell::new(false) };
    /// Set once a transaction of this backend was prepared while changing keys.
    static LEAKED: Cell<bool> = const { Cell::new(false) };
}

/// Called from `_PG_init` while preloading.
pub fn init_shmem() {
    pg_shmem_init!(EPOCH);
    pg_shmem_init!(IN_FLIGHT);
}

/// `keyhippo.verified_key_cache`: off by default. On, each backend also caches the keys it has
/// verified; permissions are cached either way. Off by default: once the lookup became two
/// index probes, `make bench` measured no gain beyond noise on uniformly random keys (100,000
/// keys: 17.8k tps with it and 18.9k without in one run, 18.6k and 17.7k in the next) and a
/// gain only when few keys come back to the same backends (1,000,000 keys, 10,000 of them
/// used: 23.3k with it, 16.8k without), for up to 100,000 entries of memory per backend. See
/// BENCHMARKS.md.
pub static ENABLED: pgrx::GucSetting<bool> = pgrx::GucSetting::<bool>::new(false);

/// Whether this backend can cache at all: the shared counters exist (keyhippo is preloaded), and
/// it is not a hot standby (WAL replay fires no trigger, so nothing would tell it of a change).
fn enabled() -> bool {
    // SAFETY: reads shared recovery state.
    crate::usage::preloaded() && !unsafe { pg_sys::RecoveryInProgress() }
}

/// Whether verified keys themselves are cached (permissions are whenever [`enabled`]).
pub fn keys_enabled() -> bool {
    ENABLED.get() && enabled()
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// A cached verification of `api_key` (whose lookup prefix is `prefix`), if one is valid now.
/// `Some(None)` means the cache knows the key is invalid (wrong secret for a cached prefix).
/// With the key, whether its use at `now` (TimestampTz) is due to be recorded
/// ([`crate::usage::due`] from the last use the entry knows): the entry then counts it as
/// recorded.
pub fn lookup(prefix: &str, api_key: &str, now: i64) -> Option<Option<(VerifiedKey, bool)>> {
    if !keys_enabled() {
        return None;
    }
    let epoch = EPOCH.get().load(Ordering::SeqCst);
    ENTRIES.with(|entries| {
        let mut entries = entries.borrow_mut();
        let entry = entries.get_mut(prefix)?;
        if entry.epoch != epoch || entry.expires_at_micros <= now_micros() {
            return None;
        }
        if !hash::verify_key(api_key, &entry.key_hash) {
            return Some(None);
        }
        let due = crate::usage::due(Some(entry.used_at), now);
        if due {
            entry.used_at = now;
        }
        Some(Some((entry.verified.clone(), due)))
    })
}

/// A snapshot of the shared counters to take before a lookup whose result may be cached, for
/// [`store`]; None when it may not be (caching off, a change in flight, a transaction-wide
/// snapshot). A lookup whose result is to be cached must read with [`with_fresh_snapshot`].
pub fn begin_lookup() -> Option<u64> {
    // SAFETY: reads backend-local transaction state.
    if !enabled() || unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
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
    // SAFETY: a registered copy of the latest snapshot, pushed and popped around `f`; an ERROR
    // inside leaves it to the transaction's abort, which unwinds the snapshot stack.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let result = f();
    unsafe { pg_sys::PopActiveSnapshot() };
    result
}

/// The epoch of a lookup that began at `before`, if nothing changed while it ran: only then
/// may its result be cached.
fn unchanged_since(before: Option<u64>) -> Option<u64> {
    let epoch = before?;
    let quiet =
        IN_FLIGHT.get().load(Ordering::SeqCst) == 0 && EPOCH.get().load(Ordering::SeqCst) == epoch;
    quiet.then_some(epoch)
}

/// Caches a lookup's result if nothing changed while it ran: the key and its last known use
/// (TimestampTz).
pub fn store(
    before: Option<u64>,
    prefix: &str,
    key_hash: &str,
    verified: &VerifiedKey,
    expires_at_micros: i64,
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
                expires_at_micros,
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

/// Announces that the current transaction changes what verify depends on.
fn begin_change() {
    // SAFETY: plain read of a postmaster global inherited by every backend.
    if !crate::usage::preloaded() || CHANGING.with(Cell::get) {
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

#[pg_schema]
pub mod keyhippo_internal {
    use pgrx::prelude::*;

    /// Trigger function on every table verify reads: makes verified-key caches stale now and
    /// again once the transaction ends.
    #[pg_trigger]
    fn note_key_change<'a>(
        _trigger: &'a PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
        super::begin_change();
        Ok(None)
    }
}
