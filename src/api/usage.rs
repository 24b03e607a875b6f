//! SQL functions about recording key use: writing the buffer now, and the workers' status.

use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;

use crate::error::or_raise;
use crate::pg::backend::{self, DatabaseState};
use crate::pg::shmem::{self, DbSlot, SHARED};
use crate::usage;

/// Writes this database's buffered uses, verification counts and changed credit balances now (tests and operators: no
/// need to wait for the worker). Returns how many keys had uses to write; 0 when keyhippo is not
/// preloaded.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn flush_key_usage() -> i64 {
    let uses = or_raise(usage::flush_here());
    or_raise(crate::usage_counts::flush_here());
    or_raise(crate::credits::flush_here());
    uses
}

/// What the background workers are doing, per database: the databases they have written to or
/// have uses waiting for, and this one.
#[pg_extern(volatile, parallel_safe, schema = "keyhippo_internal")]
#[allow(clippy::type_complexity)] // the row type pgrx derives the SQL result columns from
fn worker_status() -> TableIterator<
    'static,
    (
        name!(database, Option<String>),
        name!(served, bool),
        name!(pending_uses, i64),
        name!(writer_pid, Option<i32>),
        name!(last_write, Option<TimestampWithTimeZone>),
        name!(uses_written, i64),
        name!(last_error, Option<String>),
    ),
> {
    let (here, binary_upgrade) = (backend::database_id(), backend::binary_upgrade());
    let preloaded = shmem::preloaded();
    let (slots, pending) = if preloaded {
        let slots: Vec<DbSlot> = SHARED
            .share()
            .dbs
            .iter()
            .copied()
            .filter(|s| s.oid != 0)
            .collect();
        (slots, usage::pending_per_database())
    } else {
        (Vec::new(), Vec::new())
    };
    let mut oids: Vec<u32> = slots.iter().map(|s| s.oid).collect();
    oids.extend(pending.iter().map(|(db, _)| *db));
    oids.push(here);
    oids.sort_unstable();
    oids.dedup();
    let rows: Vec<_> = oids
        .into_iter()
        .filter_map(|oid| {
            let state = backend::database_state(oid);
            if state == DatabaseState::Gone {
                return None;
            }
            let name = backend::database_name(oid);
            let slot = slots.iter().find(|s| s.oid == oid);
            let served = preloaded
                && !binary_upgrade
                && state == DatabaseState::Connectable
                && slot.is_none_or(|s| s.installed != 2);
            let waiting = pending
                .iter()
                .find(|(db, _)| *db == oid)
                .map_or(0, |(_, n)| *n);
            Some((
                name,
                served,
                waiting as i64,
                slot.and_then(|s| (s.writer_pid != 0).then_some(s.writer_pid)),
                slot.and_then(|s| {
                    (s.last_write != 0)
                        .then(|| TimestampWithTimeZone::try_from(s.last_write).ok())
                        .flatten()
                }),
                slot.map_or(0, |s| s.written as i64),
                slot.and_then(DbSlot::error),
            ))
        })
        .collect();
    TableIterator::new(rows)
}
