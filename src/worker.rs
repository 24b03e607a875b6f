//! The background workers that write recorded key uses, and the verification counts for
//! `keyhippo.api_key_usage` (src/usage_counts.rs), in every database, with no configuration.
//!
//! A *launcher* (one per server, started with it, connected to no database) starts a *writer*
//! for each database with uses waiting that has none: woken by the first use recorded in such a
//! database, and every `keyhippo.last_used_flush_interval` seconds. A writer connects to its
//! database, writes that database's uses with one `UPDATE` per batch (every flush interval, or
//! sooner when verify has buffered a batch), and exits once nothing has come for a flush
//! interval, or after [`WRITER_LIFETIME`] when another database is waiting for a writer (the
//! writers take turns when more databases are busy than [`MAX_WRITERS`]). Writers are short-lived on purpose: a
//! database nobody uses has no worker connected to it, and `max_worker_processes` is not taken
//! up by one process per database.
//!
//! What a writer never does:
//! - connect to a template database, or one that does not allow connections: the launcher
//!   reads `pg_database` first (and verify in a template database uses the synchronous path);
//! - run during `pg_upgrade` (`IsBinaryUpgrade`): no launcher is registered;
//! - stand in the way of `DROP DATABASE`, `ALTER DATABASE ... RENAME` / `SET TABLESPACE` or
//!   `CREATE DATABASE ... TEMPLATE`, which fail while another session is connected to the
//!   database: a utility hook pauses the database (no writer starts) and waits for its writer to
//!   leave before the statement runs;
//! - write to a database where keyhippo is not installed (`DROP EXTENSION`): its uses are
//!   dropped.
//!
//! A write that fails is logged with its reason, shown in `keyhippo.worker_status`, and its uses
//! go back to the buffer for the next try.

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::prelude::*;
use pgrx::PgTryBuilder;
use std::time::Duration;

use crate::pg::backend::{self, DatabaseState};
use crate::pg::shmem::SHARED;
use crate::pg::utility;
use crate::settings::flush_interval_micros;
use crate::{credits, usage, usage_counts};

/// Writers running at once. `max_worker_processes` (8 by default) is shared with parallel
/// query and other extensions.
const MAX_WRITERS: usize = 3;
/// How long one writer runs at most (microseconds) before leaving its turn to the launcher.
const WRITER_LIFETIME: i64 = 60_000_000;
/// A writer asked for and not started after this long (microseconds) is asked for again.
const START_TIMEOUT: i64 = 60_000_000;
/// At most how long (microseconds) after a failed write a writer tries again (sooner when the
/// flush interval is shorter).
const RETRY_AFTER_FAILURE: i64 = 10_000_000;
/// How long a utility statement waits for a database's writer to leave (microseconds).
const STEP_ASIDE_WAIT: i64 = 30_000_000;
/// How long a pause lasts at most (microseconds), should the pausing backend never lift it.
const PAUSE_LIMIT: i64 = 600_000_000;

fn flush_interval() -> Duration {
    Duration::from_micros(flush_interval_micros() as u64)
}

fn now() -> i64 {
    backend::clock()
}

/// Registers the launcher (from `_PG_init` while preloading). Not during `pg_upgrade`.
pub fn register_launcher() {
    if backend::binary_upgrade() {
        return;
    }
    BackgroundWorkerBuilder::new("keyhippo launcher")
        .set_type("keyhippo launcher")
        .set_library("keyhippo")
        .set_function("keyhippo_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
    utility::install(pause_database, resume_database);
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn keyhippo_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: the launcher reads only pg_database, a shared catalog.
    BackgroundWorker::connect_worker_to_spi(None, None);
    SHARED.exclusive().launcher_latch = backend::my_latch();
    while BackgroundWorker::wait_latch(Some(flush_interval())) {
        if BackgroundWorker::sighup_received() {
            backend::reload_config();
        }
        launch_writers();
    }
    SHARED.exclusive().launcher_latch = 0;
}

/// Starts a writer for each database with uses waiting that may have one now.
/// The databases with key uses or verification counts waiting.
fn pending_work() -> Vec<u32> {
    let mut dbs: Vec<u32> = usage::pending_per_database()
        .into_iter()
        .chain(usage_counts::pending_per_database())
        .chain(credits::pending_per_database())
        .map(|(db, _)| db)
        .collect();
    dbs.sort_unstable();
    dbs.dedup();
    dbs
}

/// Drops what waits for database `db` (dropped, a template, or this is a standby).
fn discard(db: u32) {
    usage::drain(db);
    usage_counts::drain(db);
}

fn launch_writers() {
    let pending = pending_work();
    if pending.is_empty() {
        return;
    }
    // A hot standby cannot write: what verify recorded there is dropped.
    if backend::in_recovery() {
        for &db in &pending {
            discard(db);
        }
        return;
    }
    let states: Vec<(u32, DatabaseState)> = BackgroundWorker::transaction(|| {
        pending
            .iter()
            .map(|&db| (db, backend::database_state(db)))
            .collect()
    });
    let now = now();
    for (db, state) in states {
        if state != DatabaseState::Connectable {
            // Dropped, or a template (or closed to connections) since the uses were recorded.
            discard(db);
            if let Some(slot) = SHARED.exclusive().slot(db) {
                if state == DatabaseState::Gone && slot.writer_pid == 0 {
                    slot.oid = 0;
                }
            }
            continue;
        }
        {
            let mut shared = SHARED.exclusive();
            let running = shared
                .dbs
                .iter()
                .filter(|s| s.writer_pid != 0 || s.starting_since != 0)
                .count();
            let slot = shared.slot_or_new(db);
            let starting = slot.starting_since != 0 && now - slot.starting_since < START_TIMEOUT;
            if slot.writer_pid != 0 || starting {
                // Its writer is there (or coming), and writes on its own schedule.
                continue;
            }
            if slot.paused_until > now || slot.retry_at > now || running >= MAX_WRITERS {
                continue;
            }
            slot.starting_since = now;
        }
        let started = BackgroundWorkerBuilder::new("keyhippo writer")
            .set_type("keyhippo writer")
            .set_library("keyhippo")
            .set_function("keyhippo_writer_main")
            .enable_spi_access()
            .set_argument(Some(pg_sys::Datum::from(db)))
            .set_restart_time(None)
            .load_dynamic();
        if started.is_err() {
            let mut shared = SHARED.exclusive();
            let slot = shared.slot_or_new(db);
            slot.starting_since = 0;
            slot.retry_at = now + flush_interval_micros();
            slot.set_error(
                "no background worker slot free to write key uses: raise max_worker_processes",
            );
            log!("keyhippo: no background worker slot free to write key uses of database {db}: raise max_worker_processes");
        }
    }
}

/// Clears the writer's claim on its database's slot when it exits, however it exits.
fn release_slot(db: u32) {
    let pid = backend::process_id();
    let launcher = {
        let mut shared = SHARED.exclusive();
        if let Some(slot) = shared.slot(db) {
            if slot.writer_pid == pid {
                slot.writer_pid = 0;
                slot.writer_latch = 0;
                slot.woken_at = 0;
            }
        }
        shared.launcher_latch
    };
    // Another database may be waiting for a writer slot.
    backend::set_latch(launcher);
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn keyhippo_writer_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let db = arg.value() as u32;
    let started = now();
    {
        // The claim and the pause are decided under one lock: either a pausing statement sees
        // this writer and waits for it, or this writer sees the pause and leaves.
        let mut shared = SHARED.exclusive();
        let slot = shared.slot_or_new(db);
        slot.starting_since = 0;
        if slot.writer_pid != 0 || slot.paused_until > started {
            return;
        }
        slot.writer_pid = backend::process_id();
        slot.writer_latch = backend::my_latch();
    }
    backend::before_exit(release_slot, db);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(pg_sys::Oid::from(db)), None);

    let mut idle_since = started;
    loop {
        let paused = SHARED
            .exclusive()
            .slot(db)
            .is_none_or(|s| s.paused_until > now());
        if paused {
            break;
        }
        let uses = usage::drain(db);
        let counts = take_counts(db);
        let balances = credits::changed(db);
        if !uses.is_empty() || !counts.is_empty() || !balances.is_empty() {
            if !write_batch(db, &uses, &counts, &balances) {
                break;
            }
            idle_since = now();
        } else if now() - idle_since >= flush_interval_micros() {
            break;
        }
        if now() - started >= WRITER_LIFETIME && others_waiting(db) {
            break;
        }
        if !BackgroundWorker::wait_latch(Some(flush_interval())) {
            // Shutdown: what has been recorded until now is written first (the postmaster saves
            // whatever comes later).
            let uses = usage::drain(db);
            let counts = take_counts(db);
            let balances = credits::changed(db);
            if !uses.is_empty() || !counts.is_empty() || !balances.is_empty() {
                write_batch(db, &uses, &counts, &balances);
            }
            break;
        }
        if BackgroundWorker::sighup_received() {
            backend::reload_config();
        }
    }
    // Background workers report table statistics only when asked: without this the dead row
    // versions the writes leave are invisible to autovacuum.
    backend::report_stats();
}

/// Whether a database other than `db` has uses waiting and no writer (so that a writer that has
/// run its time leaves its slot to it).
fn others_waiting(db: u32) -> bool {
    let waiting = pending_work();
    let mut shared = SHARED.exclusive();
    waiting
        .iter()
        .any(|&other| other != db && shared.slot(other).is_none_or(|s| s.writer_pid == 0))
}

/// Database `db`'s verification counts, logging any dropped for want of room.
fn take_counts(db: u32) -> Vec<keyhippo_core::usagecount::Cell> {
    let (counts, dropped) = usage_counts::drain(db);
    if dropped > 0 {
        log!("keyhippo: {dropped} verification counts were dropped: the shared table was full between two writes");
    }
    counts
}

/// Writes one batch of database `db`'s uses in a transaction of its own; false when the writer
/// should stop (keyhippo is not installed there, or the write failed: its uses are back in the
/// buffer and the error is logged and shown in `keyhippo.worker_status`).
fn write_batch(
    db: u32,
    uses: &[usage::Use],
    counts: &[keyhippo_core::usagecount::Cell],
    balances: &[keyhippo_core::credits::Balance],
) -> bool {
    let outcome = PgTryBuilder::new(|| {
        BackgroundWorker::transaction(|| {
            Spi::connect_mut(|client| -> crate::error::Result<bool> {
                let installed = client
                    .select(
                        "SELECT pg_catalog.to_regclass('keyhippo.api_key_metadata') IS NOT NULL",
                        None,
                        &[],
                    )?
                    .first()
                    .get::<bool>(1)?
                    .unwrap_or(false);
                if installed {
                    // Recording use is not a change to audit.
                    client.update("SET LOCAL session_replication_role = replica", None, &[])?;
                    // Each row through its primary key, whatever the batch size: a hash or
                    // merge join would read the whole key table.
                    client.update("SET LOCAL enable_hashjoin = off", None, &[])?;
                    client.update("SET LOCAL enable_mergejoin = off", None, &[])?;
                    // Never the one that waits: a DROP EXTENSION (or other DDL) that locks
                    // keyhippo's tables in its own order while this holds one of them would
                    // otherwise end in a deadlock that aborts the DDL. Giving up early (before
                    // deadlock_timeout) lets it through; what was taken is kept and written
                    // at the next try.
                    client.update("SET LOCAL lock_timeout = '100ms'", None, &[])?;
                    usage::write(client, uses)?;
                    usage_counts::write(client, counts)?;
                    credits::write(client, balances)?;
                }
                Ok(installed)
            })
        })
        .map_err(|e| format!("{e:?}"))
    })
    .catch_others(|e| {
        backend::abort_transaction();
        Err(match e {
            pg_sys::panic::CaughtError::PostgresError(report)
            | pg_sys::panic::CaughtError::ErrorReport(report) => report.message().to_string(),
            pg_sys::panic::CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
        })
    })
    .execute();
    let mut shared = SHARED.exclusive();
    let slot = shared.slot_or_new(db);
    match outcome {
        Ok(true) => {
            credits::written(balances);
            slot.last_write = now();
            slot.written += uses.len() as u64;
            slot.installed = 1;
            slot.set_error("");
            true
        }
        Ok(false) => {
            slot.installed = 2;
            false
        }
        Err(message) => {
            slot.set_error(&message);
            slot.retry_at = now() + flush_interval_micros().min(RETRY_AFTER_FAILURE);
            drop(shared);
            usage::give_back(db, uses);
            usage_counts::give_back(counts);
            log!(
                "keyhippo: writing {} key uses and {} verification counts failed, kept for the next try: {message}",
                uses.len(),
                counts.len()
            );
            false
        }
    }
}

/// Pauses database `oid`'s writing before a statement that needs it to itself: no writer starts,
/// and the one running is woken to see the pause and waited for (at most [`STEP_ASIDE_WAIT`]).
fn pause_database(oid: u32) {
    let deadline = now() + STEP_ASIDE_WAIT;
    loop {
        let latch = {
            let mut shared = SHARED.exclusive();
            let slot = shared.slot_or_new(oid);
            slot.paused_until = now() + PAUSE_LIMIT;
            if slot.writer_pid == 0 {
                break;
            }
            slot.writer_latch
        };
        backend::set_latch(latch);
        if now() > deadline {
            break;
        }
        pgrx::check_for_interrupts!();
        backend::sleep_micros(10_000);
    }
}

/// Lifts the pause once the statement has run (or failed); a dropped database's uses go too.
fn resume_database(oid: u32, dropped: bool) {
    if dropped {
        usage::drain(oid);
    }
    if let Some(slot) = SHARED.exclusive().slot(oid) {
        slot.paused_until = 0;
        slot.woken_at = 0;
    }
}
