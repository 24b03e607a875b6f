//! Recording key use (`last_used_at`) without writing on the verify path.
//!
//! When keyhippo is in `shared_preload_libraries`, verify appends (key id, time) to a buffer in
//! shared memory and a background worker writes the buffer to `api_key_metadata.last_used_at`
//! every `keyhippo.last_used_flush_interval` seconds and once more at shutdown. Verify then never
//! writes a row, so it costs little more than its index lookup and works in READ ONLY
//! transactions and on hot standbys (where the worker discards the buffer: a standby cannot
//! write).
//!
//! Without preloading (or for databases other than `keyhippo.database`, the one the worker
//! serves), verify falls back to a throttled synchronous update: at most once per
//! `keyhippo.last_used_interval` seconds per key, never waiting for a lock, skipped in read-only
//! transactions.

use pgrx::bgworkers::{BackgroundWorker, BackgroundWorkerBuilder, SignalWakeFlags};
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::Result;
use crate::plans::{types, Plan};
use pgrx::datum::TimestampWithTimeZone;

/// Uses held between two flushes. A full buffer makes verify fall back to the synchronous path.
const CAPACITY: usize = 128 * 1024;

/// Uses that wake the worker before its interval is up. Small batches keep the writes cheap:
/// a key row's page has room (fillfactor 80) for a few new row versions, so a flush that
/// updates a few rows per page writes each as a HOT update (no index entries), where one that
/// updated every row of a page would move most of them to other pages and insert an entry in
/// each of the table's indexes for each (about four times the work per row, measured). And
/// each row is found by its primary key (nested loop) instead of a scan of the whole table.
const FLUSH_BATCH: usize = 2048;

/// Seconds between two recorded uses of one key (both paths): how fresh last_used_at is kept.
pub static LAST_USED_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);
/// Seconds between two flushes of the shared buffer by the background worker.
pub static FLUSH_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(10);
/// The database whose key uses the background worker writes.
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));

#[derive(Copy, Clone)]
pub struct PendingUses {
    len: usize,
    /// Address of the worker's latch (in shared memory), 0 when no worker runs.
    worker_latch: usize,
    ids: [[u8; 16]; CAPACITY],
    /// Unix time in microseconds.
    at: [i64; CAPACITY],
}

impl Default for PendingUses {
    fn default() -> Self {
        PendingUses {
            len: 0,
            worker_latch: 0,
            ids: [[0; 16]; CAPACITY],
            at: [0; CAPACITY],
        }
    }
}

// SAFETY: plain old data; worker_latch is an address in shared memory, valid in every process.
unsafe impl PGRXSharedMemory for PendingUses {}

static PENDING: PgLwLock<PendingUses> = unsafe { PgLwLock::new(c"keyhippo_pending_uses") };

/// Whether this process belongs to a server that preloaded keyhippo (set in the postmaster
/// before it forks, so every backend inherits it).
static PRELOADED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Keys this backend has already put in the buffer, and when: one entry per key per
    /// interval is enough, whatever the request rate.
    static RECORDED: RefCell<HashMap<[u8; 16], Instant>> = RefCell::new(HashMap::new());
    /// Whether this backend's database is the one the worker serves (looked up once).
    static SERVED: RefCell<Option<bool>> = const { RefCell::new(None) };
}

pub fn init() {
    GucRegistry::define_int_guc(
        c"keyhippo.last_used_interval",
        c"Seconds between two recorded uses of the same API key.",
        c"last_used_at is kept accurate to within this interval (plus the flush interval when the background worker is used).",
        &LAST_USED_INTERVAL,
        1,
        86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"keyhippo.last_used_flush_interval",
        c"Seconds between two writes of recorded key uses by keyhippo's background worker.",
        c"Only used when keyhippo is in shared_preload_libraries.",
        &FLUSH_INTERVAL,
        1,
        3_600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"keyhippo.database",
        c"The database whose API key uses keyhippo's background worker records.",
        c"Backends of other databases record uses with a throttled synchronous update. The worker connects at server start: changing this needs a restart to move it.",
        &DATABASE,
        // Not Postmaster: Postgres forbids defining such a setting after startup, which is
        // when it is defined in servers that do not preload keyhippo.
        GucContext::Sighup,
        GucFlags::default(),
    );

    GucRegistry::define_bool_guc(
        c"keyhippo.verified_key_cache",
        c"Whether each backend caches the API keys it has verified.",
        c"Only when keyhippo is in shared_preload_libraries (the cache's invalidation needs shared memory). Off (the default): every verify looks the key up; permissions are cached either way.",
        &crate::cache::ENABLED,
        GucContext::Suset,
        GucFlags::default(),
    );

    // SAFETY: a plain read of a postmaster global during library load.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pg_shmem_init!(PENDING = PendingUses::default());
        crate::cache::init_shmem();
        PRELOADED.store(true, Ordering::Relaxed);
        BackgroundWorkerBuilder::new("keyhippo last_used_at writer")
            .set_type("keyhippo")
            .set_library("keyhippo")
            .set_function("keyhippo_usage_worker_main")
            .enable_spi_access()
            .set_restart_time(Some(Duration::from_secs(5)))
            .load();
    }
}

fn now_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Whether this server preloaded keyhippo (shared memory and the worker exist).
pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Whether this backend can hand uses to the background worker.
pub fn worker_serves_this_database() -> bool {
    if !PRELOADED.load(Ordering::Relaxed) {
        return false;
    }
    SERVED.with(|served| {
        *served.borrow_mut().get_or_insert_with(|| {
            let Some(name) = DATABASE.get() else {
                return false;
            };
            // SAFETY: backend-local catalog lookup; missing_ok = true.
            let oid = unsafe { pg_sys::get_database_oid(name.as_ptr(), true) };
            oid != pg_sys::InvalidOid && oid == unsafe { pg_sys::MyDatabaseId }
        })
    })
}

/// Records a use of key `id` for the background worker. Returns false when the caller must
/// fall back to the synchronous update (not preloaded, another database, buffer full).
pub fn record(id: pgrx::Uuid) -> bool {
    if !worker_serves_this_database() {
        return false;
    }
    let key = *id.as_bytes();
    let interval = Duration::from_secs(LAST_USED_INTERVAL.get().max(1) as u64);
    let fresh = RECORDED.with(|r| r.borrow().get(&key).is_some_and(|t| t.elapsed() < interval));
    if fresh {
        return true;
    }
    let wake = {
        let mut pending = PENDING.exclusive();
        let len = pending.len;
        if len >= CAPACITY {
            return false;
        }
        pending.ids[len] = key;
        pending.at[len] = now_micros();
        pending.len = len + 1;
        if pending.len == FLUSH_BATCH {
            pending.worker_latch
        } else {
            0
        }
    };
    if wake != 0 {
        // SAFETY: the address of a latch in shared memory (the worker's PGPROC); setting a
        // latch its owner has left is harmless.
        unsafe { pg_sys::SetLatch(wake as *mut pg_sys::Latch) };
    }
    RECORDED.with(|r| {
        let mut r = r.borrow_mut();
        if r.len() > 4 * CAPACITY {
            r.clear();
        }
        r.insert(key, Instant::now());
    });
    true
}

/// Takes everything out of the shared buffer: key ids and when each was used.
fn drain() -> (Vec<pgrx::Uuid>, Vec<TimestampWithTimeZone>) {
    let (ids, micros) = {
        let mut pending = PENDING.exclusive();
        let len = pending.len;
        let taken = (pending.ids[..len].to_vec(), pending.at[..len].to_vec());
        pending.len = 0;
        taken
    };
    // Unix microseconds to PostgreSQL's timestamptz (microseconds since 2000-01-01), here rather
    // than in SQL, where the division was numeric arithmetic on every row.
    ids.iter()
        .zip(micros)
        .filter_map(|(id, us)| {
            let at = TimestampWithTimeZone::try_from(us - POSTGRES_EPOCH_MICROS).ok()?;
            Some((pgrx::Uuid::from_bytes(*id), at))
        })
        .unzip()
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

const FLUSH: Plan = Plan {
    // DISTINCT ON ... ORDER BY id: the latest use of each key, in key order, so the index and
    // heap pages are visited in order (key ids grow with time, and so does the heap). A
    // quarter cheaper than GROUP BY's hashed, random order on a million keys.
    sql: "UPDATE keyhippo.api_key_metadata m SET last_used_at = v.used_at \
            FROM (SELECT DISTINCT ON (u.id) u.id, u.used_at \
                    FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::timestamptz[])) \
                         AS u(id, used_at) \
                   ORDER BY u.id, u.used_at DESC) v \
           WHERE m.id = v.id AND (m.last_used_at IS NULL OR m.last_used_at < v.used_at)",
    args: &[types::UUID_ARRAY, types::TIMESTAMPTZ_ARRAY],
    mutating: true,
};

/// Writes the buffer to the table. On a standby (or before CREATE EXTENSION) the uses are
/// dropped: there is nothing to write them to.
fn flush() -> Result<usize> {
    let (ids, at) = drain();
    if ids.is_empty() {
        return Ok(0);
    }
    // SAFETY: plain read of backend state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return Ok(0);
    }
    let n = ids.len();
    BackgroundWorker::transaction(|| {
        Spi::connect_mut(|client| -> Result<()> {
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
                // Each row through its primary key, whatever the batch size: a hash or merge
                // join would read the whole key table for a batch (at a million keys, tens of
                // milliseconds per flush); the batches are small (FLUSH_BATCH).
                client.update("SET LOCAL enable_hashjoin = off", None, &[])?;
                client.update("SET LOCAL enable_mergejoin = off", None, &[])?;
                FLUSH.run(client, &[ids.into(), at.into()])?;
            }
            Ok(())
        })
    })?;
    Ok(n)
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn keyhippo_usage_worker_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = DATABASE.get().map(|d| d.to_string_lossy().into_owned());
    BackgroundWorker::connect_worker_to_spi(database.as_deref(), None);
    // SAFETY: MyProc is this process's PGPROC, in shared memory for the life of the server.
    let latch = unsafe { std::ptr::addr_of_mut!((*pg_sys::MyProc).procLatch) } as usize;
    PENDING.exclusive().worker_latch = latch;
    loop {
        let interval = Duration::from_secs(FLUSH_INTERVAL.get().max(1) as u64);
        let keep_running = BackgroundWorker::wait_latch(Some(interval));
        if BackgroundWorker::sighup_received() {
            // SAFETY: reloading the configuration file, as every process does on SIGHUP.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        // Also the final flush at shutdown: nothing recorded before SIGTERM is lost.
        if let Err(e) = flush() {
            log!("keyhippo: writing last_used_at failed: {e:?}");
        }
        // Background workers report table statistics only when asked; without this the dead
        // row versions the flushes leave are invisible to autovacuum and never cleaned up.
        // SAFETY: outside any transaction, as the main loop of every backend calls it.
        unsafe { pg_sys::pgstat_report_stat(true) };
        if !keep_running {
            break;
        }
    }
    PENDING.exclusive().worker_latch = 0;
}

/// Writes the shared buffer now (tests and operators: no need to wait for the worker).
/// Returns how many uses were written; 0 when keyhippo is not preloaded.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn flush_key_usage() -> i64 {
    if !PRELOADED.load(Ordering::Relaxed) {
        return 0;
    }
    let (ids, at) = drain();
    if ids.is_empty() || unsafe { pg_sys::RecoveryInProgress() } {
        return 0;
    }
    let n = ids.len() as i64;
    crate::error::or_raise(Spi::connect_mut(|client| -> Result<()> {
        FLUSH.run(client, &[ids.into(), at.into()])?;
        Ok(())
    }));
    n
}
