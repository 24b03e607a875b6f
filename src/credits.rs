//! Credits: what a key may still spend, each admitted request costing 1 and
//! `keyhippo.spend_credits(cost)` more.
//!
//! The grant is a row of `keyhippo.api_key_credits` (`set_credits`); the live balance is in
//! shared memory (keyhippo-core's `credits`), loaded from the row at first use. A request
//! *reserves* credits there; when its transaction commits they are spent, when it (or the
//! savepoint that reserved them) rolls back they are given back. So spending works in READ ONLY
//! transactions, credits are never spent twice nor go below zero under concurrency, and a
//! request that fails costs nothing. A prepared (two-phase) transaction cannot hold credits.
//! The background writer of each database writes changed balances back to the table; a clean
//! shutdown saves those not yet written, a crash loses at most the spending since the last
//! write (the customer keeps those credits).

use pgrx::datum::TimestampWithTimeZone;
use pgrx::{
    register_subxact_callback, register_xact_callback, PgSubXactCallbackEvent, PgXactCallbackEvent,
    Uuid,
};
use std::cell::{Cell, RefCell};

use crate::error::{KeyhippoError, Result};
use crate::pg::backend;
use crate::pg::elevate::as_owner;
use crate::pg::plans::{relation_exists, types, Plan};
use crate::pg::shmem::{self, BALANCES_LOCK};
use keyhippo_core::credits::{Balance, Balances, Grant, Reserve};

/// Credits reserved by the current transaction, not yet spent or given back.
#[derive(Clone, Copy)]
struct Reserved {
    id: Uuid,
    generation: i64,
    window: i64,
    amount: i64,
    /// The subtransaction that reserved them.
    subtransaction: u32,
}

thread_local! {
    static RESERVED: RefCell<Vec<Reserved>> = const { RefCell::new(Vec::new()) };
    /// Whether the current transaction's end (and its savepoints' rollbacks) are hooked.
    static HOOKED: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` on this server's balances, under their lock.
fn with_balances<R>(f: impl FnOnce(&mut Balances<'_>) -> R) -> R {
    let mut lock = BALANCES_LOCK.exclusive();
    f(&mut Balances::new(shmem::balances(&mut lock)))
}

const GRANT_ROW: Plan = Plan {
    sql: "SELECT remaining, \
                 pg_catalog.round(pg_catalog.date_part('epoch', granted_at) * 1000000)::int8, \
                 refill_amount, \
                 pg_catalog.round(pg_catalog.date_part('epoch', refill_interval) * 1000000)::int8, \
                 pg_catalog.round(pg_catalog.date_part('epoch', refilled_at) * 1000000)::int8 \
            FROM keyhippo.api_key_credits WHERE api_key_id = $1",
    args: &[types::UUID],
    mutating: false,
};

/// The grant of key `id` as its row holds it now, with the balance written there and the
/// refill window it belongs to.
fn read_row(id: Uuid) -> Result<Option<(Grant, i64, i64)>> {
    backend::with_latest_snapshot(|| {
        as_owner(|| {
            pgrx::Spi::connect(|client| {
                let Some(row) = GRANT_ROW.run(client, &[id.into()])?.next() else {
                    return Ok(None);
                };
                let (Some(remaining), Some(generation)) = (row.get::<i64>(1)?, row.get::<i64>(2)?)
                else {
                    return Ok(None);
                };
                let refill = match (row.get::<i64>(3)?, row.get::<i64>(4)?) {
                    (Some(amount), Some(per)) if per > 0 => Some((amount, per)),
                    _ => None,
                };
                let grant = Grant { generation, refill };
                let window = grant.window(row.get::<i64>(5)?.unwrap_or(0));
                Ok(Some((grant, remaining, window)))
            })
        })
    })
}

/// Why credits refused a request.
pub enum Shortage {
    /// Not enough left: what is left, and seconds until the next refill (if the grant refills).
    Exhausted { left: i64, retry_after: Option<i64> },
    /// No room in shared memory for the key's balance.
    Full,
}

/// Reserves `amount` credits of key `id` under `grant`: what is left after it, or why not.
pub fn reserve(id: Uuid, grant: Grant, amount: i64) -> Result<std::result::Result<i64, Shortage>> {
    if !shmem::preloaded() {
        return Err(KeyhippoError::WrongState(
            "keyhippo: this key has credits, and credits are counted only when keyhippo is in shared_preload_libraries".into(),
        ));
    }
    let database = backend::database_id();
    let mut grant = grant;
    for _ in 0..2 {
        let now = backend::unix_micros();
        let outcome = with_balances(|t| t.reserve(database, id.as_bytes(), &grant, amount, now));
        match outcome {
            Reserve::Reserved(left) => {
                note_reserved(Reserved {
                    id,
                    generation: grant.generation,
                    window: grant.window(now),
                    amount,
                    subtransaction: backend::subtransaction_id(),
                });
                return Ok(Ok(left));
            }
            Reserve::Short(left) => {
                return Ok(Err(Shortage::Exhausted {
                    left,
                    retry_after: grant.until_refill(now).map(|us| (us + 999_999) / 1_000_000),
                }))
            }
            Reserve::Full => return Ok(Err(Shortage::Full)),
            Reserve::NotLoaded => {
                // Read outside the lock; another backend may load it meanwhile (then its
                // balance is kept).
                let Some((row_grant, remaining, window)) = read_row(id)? else {
                    return Ok(Ok(i64::MAX));
                };
                grant = row_grant;
                let loaded =
                    with_balances(|t| t.load(database, id.as_bytes(), &grant, remaining, window));
                if !loaded {
                    return Ok(Err(Shortage::Full));
                }
            }
        }
    }
    Ok(Err(Shortage::Full))
}

/// Gives back the last reservation of key `id` in this transaction (its request was refused
/// by a rate limit after all).
pub fn release_last(id: Uuid) {
    let last = RESERVED.with(|r| {
        let mut r = r.borrow_mut();
        let at = r.iter().rposition(|x| x.id == id)?;
        Some(r.remove(at))
    });
    if let Some(x) = last {
        release(&[x]);
    }
}

/// What key `id` has left under `grant` now (loading its balance if needed).
pub fn available(id: Uuid, grant: Grant) -> Result<Option<i64>> {
    Ok(match reserve(id, grant, 0)? {
        Ok(left) if left == i64::MAX => None,
        Ok(left) => Some(left),
        Err(Shortage::Exhausted { left, .. }) => Some(left),
        Err(Shortage::Full) => None,
    })
}

fn release(items: &[Reserved]) {
    if items.is_empty() {
        return;
    }
    let database = backend::database_id();
    with_balances(|t| {
        for x in items {
            t.release(database, x.id.as_bytes(), x.generation, x.amount);
        }
    });
}

fn settle(items: &[Reserved]) {
    if items.is_empty() {
        return;
    }
    let database = backend::database_id();
    with_balances(|t| {
        for x in items {
            t.settle(database, x.id.as_bytes(), x.generation, x.window, x.amount);
        }
    });
}

/// Keeps a reservation for the transaction's end, hooking it (and savepoint rollbacks) first.
fn note_reserved(x: Reserved) {
    if x.amount == 0 {
        return;
    }
    if !HOOKED.get() {
        HOOKED.set(true);
        let take = || {
            HOOKED.set(false);
            RESERVED.with(|r| std::mem::take(&mut *r.borrow_mut()))
        };
        register_xact_callback(PgXactCallbackEvent::Commit, move || settle(&take()));
        register_xact_callback(PgXactCallbackEvent::Abort, move || release(&take()));
        register_xact_callback(PgXactCallbackEvent::PrePrepare, || {
            if RESERVED.with(|r| !r.borrow().is_empty()) {
                KeyhippoError::Unsupported(
                    "keyhippo: a transaction that spent credits cannot be prepared (PREPARE TRANSACTION): commit it instead".into(),
                )
                .raise();
            }
        });
        register_subxact_callback(PgSubXactCallbackEvent::AbortSub, |aborted, _parent| {
            // Everything reserved in the aborted savepoint and the ones inside it, all of which
            // have higher ids than any savepoint still open around it.
            let given_back: Vec<Reserved> = RESERVED.with(|r| {
                let mut r = r.borrow_mut();
                let (back, kept): (Vec<Reserved>, Vec<Reserved>) =
                    r.iter().partition(|x| x.subtransaction >= aborted);
                *r = kept;
                back
            });
            release(&given_back);
        });
    }
    RESERVED.with(|r| r.borrow_mut().push(x));
}

/// How many changed balances each database has waiting to be written.
pub fn pending_per_database() -> Vec<(u32, usize)> {
    with_balances(|t| t.pending())
}

/// Database `db`'s balances changed since they were last written.
pub fn changed(db: u32) -> Vec<Balance> {
    with_balances(|t| t.dirty(db))
}

/// Marks balances written.
pub fn written(balances: &[Balance]) {
    if balances.is_empty() {
        return;
    }
    with_balances(|t| t.written(balances));
}

const WRITE_BACK: Plan = Plan {
    sql: "UPDATE keyhippo.api_key_credits c SET remaining = v.remaining, refilled_at = v.refilled_at \
            FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::timestamptz[]), \
                            pg_catalog.unnest($3::int8[]), pg_catalog.unnest($4::timestamptz[])) \
                 AS v(id, granted_at, remaining, refilled_at) \
           WHERE c.api_key_id = v.id AND c.granted_at = v.granted_at",
    args: &[
        types::UUID_ARRAY,
        types::TIMESTAMPTZ_ARRAY,
        types::INT8_ARRAY,
        types::TIMESTAMPTZ_ARRAY,
    ],
    mutating: true,
};

/// Writes `balances` back to this database's `keyhippo.api_key_credits` (only to the grant each
/// belongs to), with the start of the refill window each belongs to.
pub fn write(client: &mut pgrx::spi::SpiClient<'_>, balances: &[Balance]) -> Result<()> {
    if balances.is_empty() {
        return Ok(());
    }
    if !relation_exists(client, "keyhippo.api_key_credits")? {
        return Ok(());
    }
    let ts = |unix_us: i64| {
        TimestampWithTimeZone::try_from(unix_us - backend::POSTGRES_EPOCH_MICROS).ok()
    };
    let mut ids = Vec::new();
    let mut granted = Vec::new();
    let mut remaining = Vec::new();
    let mut refilled = Vec::new();
    for b in balances {
        let Some(granted_at) = ts(b.generation) else {
            continue;
        };
        // Without refills the balance belongs to the grant itself.
        let refilled_at = if b.window == 0 {
            granted_at
        } else {
            ts(b.window).unwrap_or(granted_at)
        };
        ids.push(Uuid::from_bytes(b.id));
        granted.push(granted_at);
        remaining.push(b.committed);
        refilled.push(refilled_at);
    }
    WRITE_BACK.run(
        client,
        &[
            ids.into(),
            granted.into(),
            remaining.into(),
            refilled.into(),
        ],
    )?;
    Ok(())
}

/// Writes this database's changed balances now (`flush_key_usage()`); how many.
pub fn flush_here() -> Result<i64> {
    backend::prevent_write("flush_key_usage()");
    if !shmem::preloaded() {
        return Ok(0);
    }
    let balances = changed(backend::database_id());
    pgrx::spi::Spi::connect_mut(|client| write(client, &balances))?;
    written(&balances);
    Ok(balances.len() as i64)
}
