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
use std::ffi::CString;
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};
use std::time::Duration;

use crate::error::Result;
use crate::plans::{types, Plan};
use crate::usage_writer::{Tid, Use};
use pgrx::datum::TimestampWithTimeZone;

/// Uses held between two flushes. A full buffer makes verify fall back to the synchronous path.
const CAPACITY: usize = 128 * 1024;

/// Uses to be written as new row versions (a key's first use, whose row grows from NULL to a
/// time; every use when `keyhippo.last_used_in_place` is off) that wake the worker before its
/// interval is up. Small batches keep those writes cheap: a key row's page has room (fillfactor
/// 80) for a few new row versions, so a flush that updates a few rows per page writes each as a
/// HOT update (no index entries), where one that updated every row of a page would move most of
/// them to other pages and insert an entry in each of the table's indexes for each (about four
/// times the work per row, measured). And each row is found by its primary key (nested loop)
/// instead of a scan of the whole table.
const ROW_UPDATE_BATCH: usize = 2048;

/// Uses of any kind that wake the worker before its interval is up. Uses overwritten in place
/// (keys used before: the common case at a million keys in service) cost the worker a visit of
/// the row's page each, mostly CPU cache misses; in tuple id order, a large batch has several
/// uses on a page, which share one visit. Half the buffer: the other half takes the uses that
/// come while the worker writes.
const IN_PLACE_BATCH: usize = CAPACITY / 2;

/// Seconds between two recorded uses of one key (both paths): how fresh last_used_at is kept.
pub static LAST_USED_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);
/// Seconds between two flushes of the shared buffer by the background worker.
pub static FLUSH_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(10);
/// Whether a use of a key whose last_used_at is set is written over the old time where it is
/// (no new row version) when the table allows it; see `usage_writer`.
pub static IN_PLACE: GucSetting<bool> = GucSetting::<bool>::new(true);
/// The database whose key uses the background worker writes.
pub static DATABASE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"postgres"));

/// The shared buffer's state, under its lock.
#[derive(Copy, Clone, Default)]
pub struct PendingUses {
    len: usize,
    /// How many of them will be written as new row versions (see [`ROW_UPDATE_BATCH`]).
    row_updates: usize,
    /// Address of the worker's latch (in shared memory), 0 when no worker runs.
    worker_latch: usize,
}

// SAFETY: plain old data; worker_latch is an address in shared memory, valid in every process.
unsafe impl PGRXSharedMemory for PendingUses {}

/// The uses in the buffer, `PendingUses::len` of them: read and written only under the lock of
/// [`PENDING`]. Allocated in shared memory by [`request_slots`] / [`attach_slots`] and zeroed
/// there: pgrx's `pg_shmem_init!` would build the 3.9 MB value on the postmaster's stack first,
/// which overflows it in an unoptimised build.
#[repr(C)]
struct UseSlots {
    ids: [[u8; 16]; CAPACITY],
    /// Where verify found each key's row (block, line pointer of the root of its HOT chain).
    blocks: [u32; CAPACITY],
    offsets: [u16; CAPACITY],
    /// When (TimestampTz: microseconds since 2000-01-01).
    at: [i64; CAPACITY],
}

/// This process's address of the shared [`UseSlots`] (set in the postmaster, inherited).
static SLOTS: AtomicPtr<UseSlots> = AtomicPtr::new(std::ptr::null_mut());
static mut PREV_SHMEM_REQUEST: Option<unsafe extern "C-unwind" fn()> = None;
static mut PREV_SHMEM_STARTUP: Option<unsafe extern "C-unwind" fn()> = None;

#[pg_guard]
unsafe extern "C-unwind" fn request_slots() {
    // SAFETY: the postmaster's shared memory set-up, single-threaded; the previous hook as
    // installed before ours.
    unsafe {
        if let Some(prev) = PREV_SHMEM_REQUEST {
            pg_sys::ffi::pg_guard_ffi_boundary(|| prev());
        }
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<UseSlots>());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn attach_slots() {
    // SAFETY: as in `request_slots`; AddinShmemInitLock (MainLWLockArray[21]) serialises
    // ShmemInitStruct as for every extension.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            pg_sys::ffi::pg_guard_ffi_boundary(|| prev());
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let slots = pg_sys::ShmemInitStruct(
            c"keyhippo_pending_use_slots".as_ptr(),
            std::mem::size_of::<UseSlots>(),
            &mut found,
        )
        .cast::<UseSlots>();
        if !found {
            std::ptr::write_bytes(slots, 0, 1);
        }
        pg_sys::LWLockRelease(init_lock);
        SLOTS.store(slots, Ordering::Relaxed);
    }
}

/// The shared uses; only while holding [`PENDING`]'s lock (the guard proves it).
fn slots(_locked: &mut PendingUses) -> &mut UseSlots {
    // SAFETY: set at startup in every process that preloaded keyhippo (the only ones that
    // reach here: `record` and `drain` run after `worker_serves_this_database` / for the
    // worker); exclusive access under the lock.
    unsafe { &mut *SLOTS.load(Ordering::Relaxed) }
}

static PENDING: PgLwLock<PendingUses> = unsafe { PgLwLock::new(c"keyhippo_pending_uses") };

/// Whether this process belongs to a server that preloaded keyhippo (set in the postmaster
/// before it forks, so every backend inherits it).
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Slots of [`Recent`]: a power of two.
const RECENT_SLOTS: usize = 4096;

/// Keys this backend has recently put in the buffer, and when: one entry per key per interval
/// is enough, whatever the request rate. Direct-mapped (a key has one slot, chosen by its id's
/// random bits; a key that takes another's slot makes that one be recorded again, which the
/// worker folds into one write): 80 kB that stay in the CPU caches, where a hash map of every
/// key recorded grew to hundreds of thousands of entries at a million keys (0.7 µs per verify,
/// measured with `perf`).
struct Recent {
    ids: [[u8; 16]; RECENT_SLOTS],
    at: [i64; RECENT_SLOTS],
}

impl Recent {
    fn slot(id: &[u8; 16]) -> usize {
        // Bytes 8..16 of a UUID (v4 or v7) are random but for the variant bits.
        let bits = u64::from_le_bytes(id[8..16].try_into().expect("8 bytes"));
        (bits.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> (64 - RECENT_SLOTS.trailing_zeros())) as usize
    }
}

thread_local! {
    static RECENT: RefCell<Box<Recent>> = RefCell::new(Box::new(Recent {
        ids: [[0; 16]; RECENT_SLOTS],
        at: [i64::MIN; RECENT_SLOTS],
    }));
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
        c"keyhippo.last_used_in_place",
        c"Whether recorded key uses overwrite last_used_at in place instead of writing a new row version.",
        c"Only for rows whose last_used_at is already set, in a table with no index on last_used_at that no publication replicates updates of. Off: every recorded use is a row update (transactional, decoded by logical replication, more WAL, dead row versions for VACUUM).",
        &IN_PLACE,
        GucContext::Suset,
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
        // SAFETY: library load in the postmaster, single-threaded: our hooks chain the ones
        // installed before.
        unsafe {
            PREV_SHMEM_REQUEST = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(request_slots);
            PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
            pg_sys::shmem_startup_hook = Some(attach_slots);
        }
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

/// Whether a use at `now` must be recorded, the key's last known use being `last_used`
/// (TimestampTz; None: never used): once per `keyhippo.last_used_interval`. The one rule for
/// the row's `last_used_at`, the verified-key cache and this backend's memory of recorded keys.
pub fn due(last_used: Option<i64>, now: i64) -> bool {
    let interval = LAST_USED_INTERVAL.get().max(1) as i64 * 1_000_000;
    last_used.is_none_or(|used| now.saturating_sub(used) >= interval)
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

/// Records a use of key `id`, whose row verify read at `tid`, at `now` (TimestampTz) for the
/// background worker; `first`: the row's last_used_at is NULL (the write will be a new row
/// version). Returns false when the caller must fall back to the synchronous update (not
/// preloaded, another database, buffer full).
pub fn record(id: pgrx::Uuid, tid: Tid, now: i64, first: bool) -> bool {
    if !worker_serves_this_database() {
        return false;
    }
    let key = *id.as_bytes();
    let slot = Recent::slot(&key);
    let fresh = RECENT.with(|r| {
        let r = r.borrow();
        r.ids[slot] == key && !due(Some(r.at[slot]), now)
    });
    if fresh {
        return true;
    }
    let row_update = first || !IN_PLACE.get();
    let wake = {
        let mut pending = PENDING.exclusive();
        let len = pending.len;
        if len >= CAPACITY {
            return false;
        }
        let slots = slots(&mut pending);
        slots.ids[len] = key;
        slots.blocks[len] = tid.block;
        slots.offsets[len] = tid.offset;
        slots.at[len] = now;
        pending.len = len + 1;
        if row_update {
            pending.row_updates += 1;
        }
        if (row_update && pending.row_updates == ROW_UPDATE_BATCH) || pending.len == IN_PLACE_BATCH
        {
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
    RECENT.with(|r| {
        let mut r = r.borrow_mut();
        r.ids[slot] = key;
        r.at[slot] = now;
    });
    true
}

/// Takes everything out of the shared buffer: the latest use of each key.
fn drain() -> Vec<Use> {
    let uses = {
        let mut pending = PENDING.exclusive();
        let len = pending.len;
        let slots = slots(&mut pending);
        let uses: Vec<Use> = (0..len)
            .map(|i| Use {
                id: slots.ids[i],
                tid: Tid {
                    block: slots.blocks[i],
                    offset: slots.offsets[i],
                },
                at: slots.at[i],
            })
            .collect();
        pending.len = 0;
        pending.row_updates = 0;
        uses
    };
    crate::usage_writer::latest_per_key(uses)
}

/// Writes `uses` where verify read the rows, and through the FLUSH statement those it could not
/// (see `usage_writer`).
fn write(client: &mut pgrx::spi::SpiClient<'_>, uses: &[Use]) -> Result<()> {
    let rest = match crate::lookup::metadata_columns() {
        // SAFETY: inside a transaction, as the worker (superuser) or the extension owner.
        Some((table, id_att, used_att)) => unsafe {
            crate::usage_writer::write(table, id_att, used_att, uses)
        },
        None => uses.to_vec(),
    };
    debug1!(
        "keyhippo: {} key uses written where verify found the rows, {} by the UPDATE statement",
        uses.len() - rest.len(),
        rest.len()
    );
    if rest.is_empty() {
        return Ok(());
    }
    let (ids, at): (Vec<pgrx::Uuid>, Vec<TimestampWithTimeZone>) = rest
        .iter()
        .filter_map(|u| {
            let at = TimestampWithTimeZone::try_from(u.at).ok()?;
            Some((pgrx::Uuid::from_bytes(u.id), at))
        })
        .unzip();
    FLUSH.run(client, &[ids.into(), at.into()])?;
    Ok(())
}

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
    let uses = drain();
    if uses.is_empty() {
        return Ok(0);
    }
    // SAFETY: plain read of backend state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        return Ok(0);
    }
    let n = uses.len();
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
                // milliseconds per flush); the uses left to it are few (see usage_writer).
                client.update("SET LOCAL enable_hashjoin = off", None, &[])?;
                client.update("SET LOCAL enable_mergejoin = off", None, &[])?;
                write(client, &uses)?;
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
/// Returns how many keys had uses to write; 0 when keyhippo is not preloaded.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn flush_key_usage() -> i64 {
    // Refused (25006) before anything is taken from the buffer: taking uses and then failing to
    // write them would lose them.
    // SAFETY: plain checks of transaction state; they raise an ERROR naming the function.
    unsafe {
        pg_sys::PreventCommandIfReadOnly(c"flush_key_usage()".as_ptr());
        pg_sys::PreventCommandDuringRecovery(c"flush_key_usage()".as_ptr());
    }
    if !PRELOADED.load(Ordering::Relaxed) {
        return 0;
    }
    let uses = drain();
    if uses.is_empty() {
        return 0;
    }
    crate::error::or_raise(Spi::connect_mut(|client| write(client, &uses)));
    uses.len() as i64
}
