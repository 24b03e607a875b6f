//! Verification counts: how many requests each key made per hour, by outcome (`VALID`,
//! `RATE_LIMITED`, `USAGE_EXCEEDED`, `EXPIRED`, `DISABLED`), for `keyhippo.api_key_usage`.
//!
//! The calls that admit a request (`verify_api_key_status`, `check_request()`) count into a
//! table in shared memory (keyhippo-core's `usagecount`), and the background writer of each
//! database (src/worker.rs) adds its counts to `keyhippo.api_key_usage` with the key uses, and
//! deletes rows older than `keyhippo.usage_retention`. Counting writes nothing on the request's
//! path. Only when keyhippo is preloaded, and not on a hot standby (it cannot write them);
//! `verify_api_key` is not counted (like rate limits, it is a validity check).

use pgrx::datum::TimestampWithTimeZone;
use pgrx::Uuid;

use crate::error::Result;
use crate::pg::backend;
use crate::pg::plans::{relation_exists, types, Plan};
use crate::pg::shmem::{self, COUNTS_LOCK};
use crate::settings;
use crate::usage;
use keyhippo_core::usagecount::{hour_of, outcome_number, Cell, Counts, OUTCOMES};

/// Counts one verification of key `id` whose outcome is `status` (a name of
/// `verify_api_key_status`; those not counted are ignored).
pub fn count(id: Uuid, status: &str) {
    let Some(outcome) = outcome_number(status) else {
        return;
    };
    if !usage::served_here() || backend::in_recovery() {
        return;
    }
    let hour = hour_of(backend::unix_micros());
    let database = backend::database_id();
    let mut lock = COUNTS_LOCK.exclusive();
    if !Counts::new(shmem::counts(&mut lock)).add(database, id.as_bytes(), hour, outcome, 1) {
        lock.dropped += 1;
    }
}

/// Takes database `database`'s counts out of shared memory, and how many were dropped (for
/// every database) since the last time.
pub fn drain(database: u32) -> (Vec<Cell>, u64) {
    let mut lock = COUNTS_LOCK.exclusive();
    let dropped = std::mem::take(&mut lock.dropped);
    (
        Counts::new(shmem::counts(&mut lock)).drain(database),
        dropped,
    )
}

/// Puts counts a writer could not write back (as many as fit).
pub fn give_back(cells: &[Cell]) {
    let mut lock = COUNTS_LOCK.exclusive();
    let mut counts = Counts::new(shmem::counts(&mut lock));
    for c in cells {
        counts.add(c.db, &c.id, c.hour, c.outcome, c.count);
    }
}

/// How many counts each database has waiting.
pub fn pending_per_database() -> Vec<(u32, usize)> {
    let lock = COUNTS_LOCK.share();
    let cells = shmem::counts_to_read(&lock);
    let mut per_db: Vec<(u32, usize)> = Vec::new();
    for c in cells.iter().filter(|c| c.count != 0) {
        match per_db.iter_mut().find(|(d, _)| *d == c.db) {
            Some((_, n)) => *n += 1,
            None => per_db.push((c.db, 1)),
        }
    }
    per_db
}

const ADD: Plan = Plan {
    // Counts of keys deleted since are left out (the writer runs without foreign-key checks).
    sql: "INSERT INTO keyhippo.api_key_usage AS u (api_key_id, hour, outcome, count) \
          SELECT c.id, c.hour, c.outcome, c.n \
            FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::timestamptz[]), \
                            pg_catalog.unnest($3::text[]), pg_catalog.unnest($4::int8[])) \
                 AS c(id, hour, outcome, n) \
           WHERE EXISTS (SELECT 1 FROM keyhippo.api_key_metadata m WHERE m.id = c.id) \
          ON CONFLICT (api_key_id, hour, outcome) DO UPDATE SET count = u.count + EXCLUDED.count",
    args: &[
        types::UUID_ARRAY,
        types::TIMESTAMPTZ_ARRAY,
        types::TEXT_ARRAY,
        types::INT8_ARRAY,
    ],
    mutating: true,
};

const PURGE: Plan = Plan {
    sql: "DELETE FROM keyhippo.api_key_usage WHERE hour < pg_catalog.now() - $1::interval",
    args: &[types::INTERVAL],
    mutating: true,
};

/// Adds `cells` to this database's `keyhippo.api_key_usage`, and deletes rows older than
/// `keyhippo.usage_retention`.
pub fn write(client: &mut pgrx::spi::SpiClient<'_>, cells: &[Cell]) -> Result<()> {
    if !relation_exists(client, "keyhippo.api_key_usage")? {
        return Ok(());
    }
    if !cells.is_empty() {
        let mut ids = Vec::with_capacity(cells.len());
        let mut hours = Vec::with_capacity(cells.len());
        let mut outcomes = Vec::with_capacity(cells.len());
        let mut counts = Vec::with_capacity(cells.len());
        for c in cells {
            let Ok(hour) = TimestampWithTimeZone::try_from(
                c.hour * 3_600_000_000 - backend::POSTGRES_EPOCH_MICROS,
            ) else {
                continue;
            };
            ids.push(Uuid::from_bytes(c.id));
            hours.push(hour);
            outcomes.push(OUTCOMES[usize::from(c.outcome).min(OUTCOMES.len() - 1)].to_string());
            counts.push(i64::try_from(c.count).unwrap_or(i64::MAX));
        }
        ADD.run(
            client,
            &[ids.into(), hours.into(), outcomes.into(), counts.into()],
        )?;
    }
    let retention = settings::USAGE_RETENTION
        .get()
        .and_then(|t| t.into_string().ok())
        .and_then(|t| backend::parse_interval(&t));
    match retention {
        Some(retention) => {
            PURGE.run(client, &[retention.into()])?;
        }
        None => pgrx::warning!(
            "keyhippo: keyhippo.usage_retention is not an interval: no usage rows deleted"
        ),
    }
    Ok(())
}

/// Writes this database's verification counts now (`flush_key_usage()`); how many counts were
/// written.
pub fn flush_here() -> Result<i64> {
    backend::prevent_write("flush_key_usage()");
    if !shmem::preloaded() {
        return Ok(0);
    }
    let (cells, _) = drain(backend::database_id());
    let written = pgrx::spi::Spi::connect_mut(|client| write(client, &cells));
    if written.is_err() {
        give_back(&cells);
    }
    written.map(|()| cells.len() as i64)
}
