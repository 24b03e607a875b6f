//! Rate limits: whether a request made with a valid key is admitted, counted in shared memory.
//!
//! The limits are rows of `keyhippo.api_key_rate_limits` (one key) and
//! `keyhippo.owner_rate_limits` (all keys of a user); the counting is keyhippo-core's
//! (`ratelimit`: fixed windows aligned to the Unix epoch) in one table per server, under a
//! lock. Counting writes nothing to the database, so it works in READ ONLY transactions and on
//! hot standbys (each server counts its own requests), and a restart starts every count again.
//!
//! A request is counted once per transaction and key: the first admission in a transaction
//! counts, later ones in the same transaction are answered from memory. Only the calls that
//! admit a request count (`verify_api_key_status`, `check_request`); `verify_api_key` and the
//! other checks never do.
//!
//! The limits of a key are read with one statement and kept per backend while the cache epoch
//! (src/cache.rs) does not move: the tables' triggers move it, so a changed limit applies from
//! the next statement on. A database without any limit is remembered as such, which costs a
//! key without limits one atomic read.

use pgrx::{register_xact_callback, PgXactCallbackEvent, Uuid};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use crate::cache;
use crate::error::{KeyhippoError, Result};
use crate::pg::backend;
use crate::pg::elevate::as_owner;
use crate::pg::plans::{types, Plan};
use crate::pg::shmem::{self, RATE_COUNTERS};
use keyhippo_core::ratelimit::{Kind, Limit, Outcome};

/// A limit as stored: requests per window (microseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub max_requests: i32,
    pub per_us: i64,
}

/// The limits that apply to one key.
#[derive(Clone, Copy, Default)]
struct KeyLimits {
    key: Option<Rate>,
    owner: Option<Rate>,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug)]
pub struct Refusal {
    /// Whose limit: `key`, `owner`, or `server` when the counters are full.
    pub limit: &'static str,
    pub rate: Option<Rate>,
    /// Seconds until the refusing window ends (at least 1).
    pub retry_after: i64,
}

/// Whether a request is admitted (a refusal's details: [`last_refusal`]).
pub enum Admission {
    Admitted,
    Refused,
}

thread_local! {
    /// Limits of keys, with the cache epoch they were read under.
    static LIMITS: RefCell<HashMap<Uuid, (KeyLimits, u64)>> = RefCell::new(HashMap::new());
    /// The epoch under which this database was seen to hold no limit at all.
    static NONE_HERE: Cell<Option<u64>> = const { Cell::new(None) };
    /// Keys admitted in the current transaction.
    static ADMITTED: RefCell<Vec<Uuid>> = const { RefCell::new(Vec::new()) };
    /// The last refusal in the current transaction (check_request's 429 names it).
    static LAST_REFUSAL: Cell<Option<Refusal>> = const { Cell::new(None) };
    /// Whether the end of the current transaction has been hooked to forget the above.
    static HOOKED: Cell<bool> = const { Cell::new(false) };
}

/// Entries kept per backend; emptied when it would grow past this.
const MAX_ENTRIES: usize = 100_000;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

const TABLES_EXIST: Plan = Plan {
    sql: "SELECT pg_catalog.to_regclass('keyhippo.api_key_rate_limits') IS NOT NULL",
    args: &[],
    mutating: false,
};

const FIND_LIMITS: Plan = Plan {
    sql: "SELECT k.max_requests, (pg_catalog.date_part('epoch', k.per) * 1000000)::int8, \
                 o.max_requests, (pg_catalog.date_part('epoch', o.per) * 1000000)::int8, \
                 EXISTS (SELECT 1 FROM keyhippo.api_key_rate_limits) \
                 OR EXISTS (SELECT 1 FROM keyhippo.owner_rate_limits) \
            FROM (SELECT 1) one \
            LEFT JOIN keyhippo.api_key_rate_limits k ON k.api_key_id = $1 \
            LEFT JOIN keyhippo.owner_rate_limits o ON o.user_id = $2",
    args: &[types::UUID, types::UUID],
    mutating: false,
};

/// Reads the limits of key `id` owned by `user_id`, and whether the database has any limit.
fn read(id: Uuid, user_id: Uuid) -> Result<(KeyLimits, bool)> {
    as_owner(|| {
        pgrx::Spi::connect(|client| {
            let exists = TABLES_EXIST
                .run(client, &[])?
                .next()
                .and_then(|row| row.get::<bool>(1).ok().flatten())
                .unwrap_or(false);
            if !exists {
                // The SQL of a version before rate limits: this library runs on it until
                // ALTER EXTENSION keyhippo UPDATE.
                return Ok((KeyLimits::default(), false));
            }
            let rows = FIND_LIMITS.run(client, &[id.into(), user_id.into()])?;
            let Some(row) = rows.into_iter().next() else {
                return Ok((KeyLimits::default(), false));
            };
            let rate = |n: usize| -> Result<Option<Rate>> {
                Ok(match (row.get::<i32>(n)?, row.get::<i64>(n + 1)?) {
                    (Some(max_requests), Some(per_us)) if per_us > 0 => Some(Rate {
                        max_requests,
                        per_us,
                    }),
                    _ => None,
                })
            };
            let limits = KeyLimits {
                key: rate(1)?,
                owner: rate(3)?,
            };
            Ok((limits, row.get::<bool>(5)?.unwrap_or(false)))
        })
    })
}

/// The limits of key `id`, from this backend's cache when still current.
fn limits_of(id: Uuid, user_id: Uuid) -> Result<KeyLimits> {
    if NONE_HERE.get().is_some_and(cache::current) {
        return Ok(KeyLimits::default());
    }
    let cached = LIMITS.with(|l| {
        l.borrow()
            .get(&id)
            .filter(|(_, epoch)| cache::current(*epoch))
            .map(|(limits, _)| *limits)
    });
    if let Some(limits) = cached {
        return Ok(limits);
    }
    let before = cache::begin_lookup();
    let (limits, any) = cache::with_fresh_snapshot(before, || read(id, user_id))?;
    if let Some(epoch) = cache::stamp(before) {
        if any {
            LIMITS.with(|l| {
                let mut l = l.borrow_mut();
                if l.len() >= MAX_ENTRIES {
                    l.clear();
                }
                l.insert(id, (limits, epoch));
            });
        } else {
            NONE_HERE.set(Some(epoch));
        }
    }
    Ok(limits)
}

/// Forgets the transaction's admissions and refusal when it ends.
fn hook_transaction_end() {
    if HOOKED.get() {
        return;
    }
    HOOKED.set(true);
    let forget = || {
        ADMITTED.with(|a| a.borrow_mut().clear());
        LAST_REFUSAL.set(None);
        HOOKED.set(false);
    };
    register_xact_callback(PgXactCallbackEvent::Commit, forget);
    register_xact_callback(PgXactCallbackEvent::Abort, forget);
    register_xact_callback(PgXactCallbackEvent::Prepare, forget);
}

/// Admits a request made with key `id` (owned by `user_id`), counting it against the key's
/// limits once per transaction.
pub fn admit(id: Uuid, user_id: Uuid) -> Result<Admission> {
    if ADMITTED.with(|a| a.borrow().contains(&id)) {
        return Ok(Admission::Admitted);
    }
    let limits = limits_of(id, user_id)?;
    if limits.key.is_none() && limits.owner.is_none() {
        return Ok(Admission::Admitted);
    }
    if !shmem::preloaded() {
        return Err(KeyhippoError::WrongState(
            "keyhippo: this key has a rate limit, and rate limits are counted only when keyhippo is in shared_preload_libraries".into(),
        ));
    }
    let mut applied = Vec::with_capacity(2);
    let mut rates = Vec::with_capacity(2);
    for (kind, subject, rate) in [
        (Kind::Key, id, limits.key),
        (Kind::Owner, user_id, limits.owner),
    ] {
        if let Some(rate) = rate {
            applied.push(Limit {
                kind,
                id: *subject.as_bytes(),
                max: u32::try_from(rate.max_requests).unwrap_or(0),
                per_us: rate.per_us,
            });
            rates.push((kind, rate));
        }
    }
    let now = backend::clock() + POSTGRES_EPOCH_MICROS;
    let outcome = RATE_COUNTERS
        .exclusive()
        .0
        .admit(backend::database_id(), &applied, now);
    hook_transaction_end();
    let refusal = match outcome {
        Outcome::Admitted => {
            ADMITTED.with(|a| a.borrow_mut().push(id));
            return Ok(Admission::Admitted);
        }
        Outcome::Limited {
            which,
            retry_after_us,
        } => {
            let (kind, rate) = rates[which];
            Refusal {
                limit: if kind == Kind::Key { "key" } else { "owner" },
                rate: Some(rate),
                retry_after: ((retry_after_us + 999_999) / 1_000_000).max(1),
            }
        }
        Outcome::Full => Refusal {
            limit: "server",
            rate: None,
            retry_after: 1,
        },
    };
    LAST_REFUSAL.set(Some(refusal));
    Ok(Admission::Refused)
}

/// The last refusal of the current transaction, if any.
pub fn last_refusal() -> Option<Refusal> {
    LAST_REFUSAL.get()
}
