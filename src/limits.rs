//! Rate limits: whether a request made with a valid key is admitted, counted in shared memory.
//!
//! The limits are rows of `keyhippo.api_key_rate_limits` (one key) and
//! `keyhippo.owner_rate_limits` (all keys of a user); the counting is keyhippo-core's
//! (`ratelimit`: fixed windows aligned to the Unix epoch) in one table per server
//! (`keyhippo.rate_limit_counters` counters), under a lock. Counting writes nothing to the
//! database, so it works in READ ONLY transactions and on hot standbys (each server counts its
//! own requests), and a restart starts every count again.
//!
//! A request is counted once per transaction and key: the first admission in a transaction
//! counts, later ones in the same transaction are answered from memory. Only the calls that
//! admit a request count (`verify_api_key_status`, `check_request`); `verify_api_key` and the
//! other checks never do.
//!
//! Each backend keeps a copy of every limit of its database while the cache epoch
//! (src/cache.rs) does not move: the tables' triggers move it, so a changed limit applies from
//! the next statement on. A key's limits then cost two hash lookups, and a key without limits
//! no more.

use pgrx::{register_xact_callback, PgXactCallbackEvent, Uuid};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};

use crate::error::{KeyhippoError, Result};
use crate::pg::elevate::as_owner;
use crate::pg::plans::{relation_exists, types, Plan};
use crate::pg::shmem::{self, RATE_LOCK};
use crate::pg::{backend, compat};
use crate::{cache, credits};
use keyhippo_core::credits::Grant;
use keyhippo_core::ratelimit::{Kind, Limit, Outcome, Table};

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
    credits: Option<Grant>,
}

/// Every limit of this database, as a backend keeps them while the cache epoch does not move.
struct AllLimits {
    epoch: u64,
    keys: HashMap<Uuid, Rate>,
    owners: HashMap<Uuid, Rate>,
    credits: HashMap<Uuid, Grant>,
}

impl AllLimits {
    fn of(&self, id: Uuid, user_id: Uuid) -> KeyLimits {
        KeyLimits {
            key: self.keys.get(&id).copied(),
            owner: self.owners.get(&user_id).copied(),
            credits: self.credits.get(&id).copied(),
        }
    }
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug)]
pub struct Refusal {
    /// What refused it: `key` or `owner` (a rate limit), `credits`, or `server` when shared
    /// memory has no room for the key's counter or balance.
    pub limit: &'static str,
    pub rate: Option<Rate>,
    /// Seconds until the refusing window ends or the credits are refilled (at least 1); None
    /// when no refill will come.
    pub retry_after: Option<i64>,
    /// The credits left, when credits refused.
    pub left: Option<i64>,
}

impl Refusal {
    /// The 429 response's message.
    pub fn message(&self) -> &'static str {
        if self.limit == "credits" {
            "usage exceeded"
        } else {
            "rate limit exceeded"
        }
    }

    /// The 429 response's details: the limit that refused.
    pub fn details(&self) -> String {
        match (self.limit, self.rate) {
            ("credits", _) => format!(
                "credits: {} left, fewer than the request costs",
                self.left.unwrap_or(0)
            ),
            (limit, Some(rate)) => format!(
                "{limit} limit: {} requests per {} seconds",
                rate.max_requests,
                rate.per_us as f64 / 1_000_000.0
            ),
            _ => "the server's rate-limit and credit tables are full".to_string(),
        }
    }
}

/// Whether a request is admitted (a refusal's details: [`last_refusal`]).
pub enum Admission {
    Admitted,
    /// Refused by a rate limit (or full counters).
    RateLimited,
    /// Refused for want of credits.
    UsageExceeded,
}

thread_local! {
    /// Every limit of this database, while current.
    static ALL: RefCell<Option<AllLimits>> = const { RefCell::new(None) };
    /// Keys admitted in the current transaction.
    static ADMITTED: RefCell<HashSet<Uuid>> = RefCell::new(HashSet::new());
    /// The key admitted last (spend_credits charges it), with the local transaction id of the
    /// transaction that admitted it, and its owner.
    static LAST_ADMITTED: Cell<Option<(u32, Uuid, Uuid)>> = const { Cell::new(None) };
    /// The last refusal in the current transaction (check_request's 429 names it).
    static LAST_REFUSAL: Cell<Option<Refusal>> = const { Cell::new(None) };
    /// Whether the end of the current transaction has been hooked to forget the above.
    static HOOKED: Cell<bool> = const { Cell::new(false) };
}

const FIND_LIMITS: Plan = Plan {
    sql: "SELECT k.max_requests, (pg_catalog.date_part('epoch', k.per) * 1000000)::int8, \
                 o.max_requests, (pg_catalog.date_part('epoch', o.per) * 1000000)::int8 \
            FROM (SELECT 1) one \
            LEFT JOIN keyhippo.api_key_rate_limits k ON k.api_key_id = $1 \
            LEFT JOIN keyhippo.owner_rate_limits o ON o.user_id = $2",
    args: &[types::UUID, types::UUID],
    mutating: false,
};

const KEY_CREDITS: Plan = Plan {
    sql: "SELECT api_key_id, \
                 pg_catalog.round(pg_catalog.date_part('epoch', granted_at) * 1000000)::int8, \
                 refill_amount, \
                 pg_catalog.round(pg_catalog.date_part('epoch', refill_interval) * 1000000)::int8 \
            FROM keyhippo.api_key_credits WHERE $1 IS NULL OR api_key_id = $1",
    args: &[types::UUID],
    mutating: false,
};

/// The credit grants of key `id`, or of every key (None).
fn read_credits(
    client: &pgrx::spi::SpiClient<'_>,
    id: Option<Uuid>,
) -> Result<HashMap<Uuid, Grant>> {
    let mut grants = HashMap::new();
    if !relation_exists(client, "keyhippo.api_key_credits")? {
        return Ok(grants);
    }
    for row in KEY_CREDITS.run(client, &[id.into()])? {
        let (Some(key), Some(generation)) = (row.get::<Uuid>(1)?, row.get::<i64>(2)?) else {
            continue;
        };
        let refill = match (row.get::<i64>(3)?, row.get::<i64>(4)?) {
            (Some(amount), Some(per)) if per > 0 => Some((amount, per)),
            _ => None,
        };
        grants.insert(key, Grant { generation, refill });
    }
    Ok(grants)
}

const ALL_LIMITS: Plan = Plan {
    sql: "SELECT true, api_key_id, max_requests, (pg_catalog.date_part('epoch', per) * 1000000)::int8 \
            FROM keyhippo.api_key_rate_limits \
          UNION ALL \
          SELECT false, user_id, max_requests, (pg_catalog.date_part('epoch', per) * 1000000)::int8 \
            FROM keyhippo.owner_rate_limits",
    args: &[],
    mutating: false,
};

/// A limit read from columns `n` (max_requests) and `n + 1` (the window in microseconds).
fn rate(row: &pgrx::spi::SpiHeapTupleData<'_>, n: usize) -> Result<Option<Rate>> {
    Ok(match (row.get::<i32>(n)?, row.get::<i64>(n + 1)?) {
        (Some(max_requests), Some(per_us)) if per_us > 0 => Some(Rate {
            max_requests,
            per_us,
        }),
        _ => None,
    })
}

/// Reads the limits of key `id` owned by `user_id`.
fn read_one(id: Uuid, user_id: Uuid) -> Result<KeyLimits> {
    as_owner(|| {
        pgrx::Spi::connect(|client| {
            // The SQL of a version before rate limits: this library runs on it until ALTER EXTENSION
            // keyhippo UPDATE.
            if !relation_exists(client, "keyhippo.api_key_rate_limits")? {
                return Ok(KeyLimits::default());
            }
            let rows = FIND_LIMITS.run(client, &[id.into(), user_id.into()])?;
            let Some(row) = rows.into_iter().next() else {
                return Ok(KeyLimits::default());
            };
            Ok(KeyLimits {
                key: rate(&row, 1)?,
                owner: rate(&row, 3)?,
                credits: read_credits(client, Some(id))?.remove(&id),
            })
        })
    })
}

/// Reads every limit of this database.
fn read_all(epoch: u64) -> Result<AllLimits> {
    let mut all = AllLimits {
        epoch,
        keys: HashMap::new(),
        owners: HashMap::new(),
        credits: HashMap::new(),
    };
    as_owner(|| {
        pgrx::Spi::connect(|client| {
            // The SQL of a version before rate limits: this library runs on it until ALTER EXTENSION
            // keyhippo UPDATE.
            if !relation_exists(client, "keyhippo.api_key_rate_limits")? {
                return Ok(());
            }
            all.credits = read_credits(client, None)?;
            for row in ALL_LIMITS.run(client, &[])? {
                let (Some(is_key), Some(subject), Some(rate)) =
                    (row.get::<bool>(1)?, row.get::<Uuid>(2)?, rate(&row, 3)?)
                else {
                    continue;
                };
                if is_key {
                    all.keys.insert(subject, rate);
                } else {
                    all.owners.insert(subject, rate);
                }
            }
            Ok(())
        })
    })?;
    Ok(all)
}

/// The limits of key `id`: from this backend's copy of every limit while it is current (read
/// again after any change: the limit tables' triggers move the cache epoch); read for this key
/// alone where nothing may be kept (no preloading, a hot standby, a transaction-wide snapshot,
/// a change in flight).
fn limits_of(id: Uuid, user_id: Uuid) -> Result<KeyLimits> {
    let kept = ALL.with(|all| {
        all.borrow()
            .as_ref()
            .filter(|all| cache::current(all.epoch))
            .map(|all| all.of(id, user_id))
    });
    if let Some(limits) = kept {
        return Ok(limits);
    }
    let before = cache::begin_lookup();
    let Some(epoch) = before else {
        return read_one(id, user_id);
    };
    let all = cache::with_fresh_snapshot(before, || read_all(epoch))?;
    let limits = all.of(id, user_id);
    if cache::stamp(before).is_some() {
        ALL.with(|kept| *kept.borrow_mut() = Some(all));
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
        LAST_ADMITTED.set(None);
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
        LAST_ADMITTED.set(Some((compat::local_transaction_id(), id, user_id)));
        return Ok(Admission::Admitted);
    }
    let limits = limits_of(id, user_id)?;
    if limits.key.is_none() && limits.owner.is_none() && limits.credits.is_none() {
        LAST_ADMITTED.set(Some((compat::local_transaction_id(), id, user_id)));
        return Ok(Admission::Admitted);
    }
    if !shmem::preloaded() {
        return Err(KeyhippoError::WrongState(
            "keyhippo: this key has a rate limit or credits, which are counted only when keyhippo is in shared_preload_libraries".into(),
        ));
    }
    hook_transaction_end();
    // The admission's credit first (given back below if a rate limit refuses the request).
    if let Some(grant) = limits.credits {
        if let Err(shortage) = credits::reserve(id, grant, 1)? {
            return Ok(refuse(credit_refusal(shortage), Admission::UsageExceeded));
        }
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
    let now = backend::unix_micros();
    let database = backend::database_id();
    let outcome = if applied.is_empty() {
        Outcome::Admitted
    } else {
        let mut lock = RATE_LOCK.exclusive();
        Table::new(shmem::rate_counters(&mut lock)).admit(database, &applied, now)
    };
    let refusal = match outcome {
        Outcome::Admitted => {
            ADMITTED.with(|a| a.borrow_mut().insert(id));
            LAST_ADMITTED.set(Some((compat::local_transaction_id(), id, user_id)));
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
                retry_after: Some(((retry_after_us + 999_999) / 1_000_000).max(1)),
                left: None,
            }
        }
        Outcome::Full => Refusal {
            limit: "server",
            rate: None,
            retry_after: Some(1),
            left: None,
        },
    };
    if limits.credits.is_some() {
        credits::release_last(id);
    }
    Ok(refuse(refusal, Admission::RateLimited))
}

fn credit_refusal(shortage: credits::Shortage) -> Refusal {
    match shortage {
        credits::Shortage::Exhausted { left, retry_after } => Refusal {
            limit: "credits",
            rate: None,
            retry_after: retry_after.map(|s| s.max(1)),
            left: Some(left),
        },
        credits::Shortage::Full => Refusal {
            limit: "server",
            rate: None,
            retry_after: Some(1),
            left: None,
        },
    }
}

fn refuse(refusal: Refusal, admission: Admission) -> Admission {
    LAST_REFUSAL.set(Some(refusal));
    admission
}

/// What `spend_credits` did.
pub enum Spent {
    /// Charged; what is left (None: the key has no credits).
    Left(Option<i64>),
    /// Not enough: nothing charged.
    Refused(Refusal),
}

/// Charges `cost` credits more to the key admitted last in this transaction (`spend_credits`).
pub fn spend(cost: Option<i32>) -> Result<Spent> {
    let cost = cost.unwrap_or(1);
    if cost < 0 {
        return Err(KeyhippoError::InvalidArgument(
            "keyhippo: p_cost must not be negative".into(),
        ));
    }
    let admitted = LAST_ADMITTED
        .get()
        .filter(|(transaction, _, _)| *transaction == compat::local_transaction_id());
    let Some((_, id, user_id)) = admitted else {
        return Err(KeyhippoError::InvalidArgument(
            "keyhippo: no key was admitted in this transaction: call verify_api_key_status (or let check_request admit the request) first".into(),
        ));
    };
    let grant = limits_of(id, user_id)?.credits;
    let Some(grant) = grant else {
        return Ok(Spent::Left(None));
    };
    if cost == 0 {
        return Ok(Spent::Left(credits::available(id, grant)?));
    }
    Ok(match credits::reserve(id, grant, i64::from(cost))? {
        Ok(left) if left == i64::MAX => Spent::Left(None),
        Ok(left) => Spent::Left(Some(left)),
        Err(shortage) => {
            let refusal = credit_refusal(shortage);
            LAST_REFUSAL.set(Some(refusal));
            Spent::Refused(refusal)
        }
    })
}

/// The last refusal of the current transaction, if any.
pub fn last_refusal() -> Option<Refusal> {
    LAST_REFUSAL.get()
}
