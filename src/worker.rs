//! The background workers that write recorded key uses, in every database, with no
//! configuration.
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

use crate::usage::{self, SHARED};

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
    Duration::from_secs(usage::FLUSH_INTERVAL.get().max(1) as u64)
}

fn flush_interval_micros() -> i64 {
    usage::FLUSH_INTERVAL.get().max(1) as i64 * 1_000_000
}

fn now() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// This process's latch, as an address other processes can set (it is in shared memory).
fn my_latch() -> usize {
    // SAFETY: MyProc is this process's PGPROC, in shared memory for the life of the server.
    unsafe { std::ptr::addr_of_mut!((*pg_sys::MyProc).procLatch) as usize }
}

fn set_latch(latch: usize) {
    if latch != 0 {
        // SAFETY: the address of a latch in shared memory; setting a latch its owner has left
        // is harmless.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// Registers the launcher (from `_PG_init` while preloading). Not during `pg_upgrade`.
pub fn register_launcher() {
    // SAFETY: a postmaster global, set from its command line before libraries are preloaded.
    if unsafe { pg_sys::IsBinaryUpgrade } {
        return;
    }
    BackgroundWorkerBuilder::new("keyhippo launcher")
        .set_type("keyhippo launcher")
        .set_library("keyhippo")
        .set_function("keyhippo_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
    // SAFETY: library load in the postmaster, single-threaded: the hook chains the one
    // installed before.
    unsafe {
        PREV_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(step_aside);
    }
}

/// What `pg_database` says of a database.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum DbState {
    Connectable,
    /// A template, or connections are not allowed.
    Closed,
    Gone,
}

/// Reads database `oid`'s row of `pg_database` (a shared catalog: readable with no database
/// connection). Inside a transaction.
unsafe fn db_state(oid: pg_sys::Oid) -> DbState {
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::DATABASEOID as i32,
            pg_sys::Datum::from(oid),
        );
        if tuple.is_null() {
            return DbState::Gone;
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
        let state = if (*form).datistemplate || !(*form).datallowconn {
            DbState::Closed
        } else {
            DbState::Connectable
        };
        pg_sys::ReleaseSysCache(tuple);
        state
    }
}

/// Whether database `oid` is a template (verify there records uses synchronously).
///
/// # Safety
/// Inside a transaction.
pub unsafe fn is_template(oid: pg_sys::Oid) -> bool {
    unsafe { db_state(oid) == DbState::Closed }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn keyhippo_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: the launcher reads only pg_database, a shared catalog.
    BackgroundWorker::connect_worker_to_spi(None, None);
    SHARED.exclusive().launcher_latch = my_latch();
    while BackgroundWorker::wait_latch(Some(flush_interval())) {
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file, as every process does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        launch_writers();
    }
    SHARED.exclusive().launcher_latch = 0;
}

/// Starts a writer for each database with uses waiting that may have one now.
fn launch_writers() {
    let pending = usage::pending_per_database();
    if pending.is_empty() {
        return;
    }
    // A hot standby cannot write: what verify recorded there is dropped.
    // SAFETY: reads shared recovery state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        for (db, _) in &pending {
            usage::drain(*db);
        }
        return;
    }
    let states: Vec<(u32, DbState)> = BackgroundWorker::transaction(|| {
        pending
            .iter()
            // SAFETY: inside the transaction.
            .map(|&(db, _)| (db, unsafe { db_state(pg_sys::Oid::from(db)) }))
            .collect()
    });
    let now = now();
    for (db, state) in states {
        if state != DbState::Connectable {
            // Dropped, or a template (or closed to connections) since the uses were recorded.
            usage::drain(db);
            if let Some(slot) = SHARED.exclusive().slot(db) {
                if state == DbState::Gone && slot.writer_pid == 0 {
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
#[pg_guard]
unsafe extern "C-unwind" fn release_slot(_code: i32, arg: pg_sys::Datum) {
    let db = arg.value() as u32;
    let pid = unsafe { pg_sys::MyProcPid };
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
    set_latch(launcher);
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
        slot.writer_pid = unsafe { pg_sys::MyProcPid };
        slot.writer_latch = my_latch();
    }
    // SAFETY: registering an exit callback for this process.
    unsafe { pg_sys::before_shmem_exit(Some(release_slot), pg_sys::Datum::from(db)) };
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
        if !uses.is_empty() {
            if !write_batch(db, &uses) {
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
            if !uses.is_empty() {
                write_batch(db, &uses);
            }
            break;
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file, as every process does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
    // Background workers report table statistics only when asked: without this the dead row
    // versions the writes leave are invisible to autovacuum.
    // SAFETY: outside any transaction, as the main loop of every backend calls it.
    unsafe { pg_sys::pgstat_report_stat(true) };
}

/// Whether a database other than `db` has uses waiting and no writer (so that a writer that has
/// run its time leaves its slot to it).
fn others_waiting(db: u32) -> bool {
    let waiting = usage::pending_per_database();
    let mut shared = SHARED.exclusive();
    waiting
        .iter()
        .any(|&(other, _)| other != db && shared.slot(other).is_none_or(|s| s.writer_pid == 0))
}

/// Writes one batch of database `db`'s uses in a transaction of its own; false when the writer
/// should stop (keyhippo is not installed there, or the write failed: its uses are back in the
/// buffer and the error is logged and shown in `keyhippo.worker_status`).
fn write_batch(db: u32, uses: &[usage::Use]) -> bool {
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
                    usage::write(client, uses)?;
                }
                Ok(installed)
            })
        })
        .map_err(|e| format!("{e:?}"))
    })
    .catch_others(|e| {
        // SAFETY: the failed transaction is rolled back, as a backend's error recovery does.
        unsafe { pg_sys::AbortCurrentTransaction() };
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
            log!(
                "keyhippo: writing {} key uses failed, kept for the next try: {message}",
                uses.len()
            );
            false
        }
    }
}

static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// The database a utility statement needs to itself (no other session connected): DROP
/// DATABASE, ALTER DATABASE ... RENAME and SET TABLESPACE, CREATE DATABASE ... TEMPLATE.
unsafe fn needs_database_alone(stmt: *mut pg_sys::Node) -> Option<pg_sys::Oid> {
    unsafe {
        let name: *const std::ffi::c_char = if pgrx::is_a(stmt, pg_sys::NodeTag::T_DropdbStmt) {
            (*(stmt as *mut pg_sys::DropdbStmt)).dbname
        } else if pgrx::is_a(stmt, pg_sys::NodeTag::T_RenameStmt) {
            let rename = stmt as *mut pg_sys::RenameStmt;
            if (*rename).renameType != pg_sys::ObjectType::OBJECT_DATABASE {
                return None;
            }
            (*rename).subname
        } else if pgrx::is_a(stmt, pg_sys::NodeTag::T_AlterDatabaseStmt) {
            let alter = stmt as *mut pg_sys::AlterDatabaseStmt;
            option((*alter).options, c"tablespace")?;
            (*alter).dbname
        } else if pgrx::is_a(stmt, pg_sys::NodeTag::T_CreatedbStmt) {
            let create = stmt as *mut pg_sys::CreatedbStmt;
            option((*create).options, c"template")?
        } else {
            return None;
        };
        if name.is_null() {
            return None;
        }
        let oid = pg_sys::get_database_oid(name, true);
        (oid != pg_sys::InvalidOid).then_some(oid)
    }
}

/// The string value of option `name` in a list of DefElem, if present.
unsafe fn option(
    options: *mut pg_sys::List,
    name: &std::ffi::CStr,
) -> Option<*const std::ffi::c_char> {
    unsafe {
        let options = pgrx::PgList::<pg_sys::DefElem>::from_pg(options);
        let found = options.iter_ptr().find_map(|def| {
            let matches = !(*def).defname.is_null()
                && std::ffi::CStr::from_ptr((*def).defname) == name
                && !(*def).arg.is_null();
            matches.then(|| pg_sys::defGetString(def) as *const std::ffi::c_char)
        });
        found
    }
}

/// Pauses database `oid`'s writing while it lives: no writer starts, and the one running is
/// waited for (woken to see the pause) before the statement runs.
struct Pause(u32);

impl Pause {
    fn new(oid: u32) -> Pause {
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
            set_latch(latch);
            if now() > deadline {
                break;
            }
            pgrx::check_for_interrupts!();
            // SAFETY: a plain sleep.
            unsafe { pg_sys::pg_usleep(10_000) };
        }
        Pause(oid)
    }
}

impl Drop for Pause {
    fn drop(&mut self) {
        if let Some(slot) = SHARED.exclusive().slot(self.0) {
            slot.paused_until = 0;
            slot.woken_at = 0;
        }
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)] // ProcessUtility_hook's signature
unsafe extern "C-unwind" fn step_aside(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    unsafe {
        let stmt = (*pstmt).utilityStmt;
        let dropping = pgrx::is_a(stmt, pg_sys::NodeTag::T_DropdbStmt);
        let pause = needs_database_alone(stmt).map(|oid| Pause::new(oid.to_u32()));
        match PREV_UTILITY {
            Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query,
                read_only_tree,
                context,
                params,
                env,
                dest,
                qc,
            ),
        }
        if let (true, Some(pause)) = (dropping, &pause) {
            // The database is gone: so are its uses.
            usage::drain(pause.0);
        }
        drop(pause);
    }
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
    // SAFETY: plain reads of backend state.
    let (here, binary_upgrade) =
        unsafe { (pg_sys::MyDatabaseId.to_u32(), pg_sys::IsBinaryUpgrade) };
    let preloaded = usage::preloaded();
    let (slots, pending) = if preloaded {
        let slots: Vec<usage::DbSlot> = SHARED
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
            // SAFETY: a catalog lookup inside the calling transaction.
            let state = unsafe { db_state(pg_sys::Oid::from(oid)) };
            if state == DbState::Gone {
                return None;
            }
            // SAFETY: as above; NULL when the database is gone.
            let name = unsafe {
                let name = pg_sys::get_database_name(pg_sys::Oid::from(oid));
                (!name.is_null()).then(|| {
                    std::ffi::CStr::from_ptr(name)
                        .to_string_lossy()
                        .into_owned()
                })
            };
            let slot = slots.iter().find(|s| s.oid == oid);
            let served = preloaded
                && !binary_upgrade
                && state == DbState::Connectable
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
                slot.and_then(usage::DbSlot::error),
            ))
        })
        .collect();
    TableIterator::new(rows)
}
