//! Recording key use (`last_used_at`) without writing on the verify path.
//!
//! When keyhippo is in `shared_preload_libraries`, verify appends (database, key id, time) to a
//! buffer in shared memory, and background workers write the buffer to
//! `api_key_metadata.last_used_at` of each database (see [`crate::worker`]). Verify then never
//! writes a row, so it costs little more than its index lookup and works in READ ONLY
//! transactions and on hot standbys (where the buffer is discarded: a standby cannot write).
//! At a clean shutdown the postmaster saves what is still buffered to a file in the data
//! directory, and reads it back at the next start.
//!
//! Without preloading (and in template databases, during `pg_upgrade`, or when the buffer is
//! full), verify falls back to a synchronous update at commit (src/fallback_use.rs): at most
//! once per `keyhippo.last_used_interval` seconds per key, never waiting for a lock, skipped in
//! read-only transactions.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgLwLock};
use std::cell::{Cell, RefCell};
use std::sync::atomic::{AtomicBool, AtomicPtr, Ordering};

use crate::error::Result;
use crate::plans::{types, Plan};
use pgrx::datum::TimestampWithTimeZone;

/// Uses held between two writes. A full buffer makes verify fall back to the synchronous path.
pub const CAPACITY: usize = 128 * 1024;

/// Uses that wake their database's writer before the flush interval is up (a database with no
/// writer wakes the launcher at its first use, which starts one).
/// Small batches keep the writes cheap: a key row's page has room (fillfactor 80) for a few new
/// row versions, so a write that updates a few rows per page makes each a HOT update (no index
/// entries), where one that updated every row of a page would move most of them to other pages
/// and insert an entry in each of the table's indexes for each. And each row is found by its
/// primary key (nested loop) instead of a scan of the whole table.
const WAKE_BATCH: usize = 2048;

/// How often (microseconds) verify wakes the launcher at most for a database that has no writer
/// and does not get one (paused, or every writer slot taken).
const WAKE_AGAIN_AFTER: i64 = 1_000_000;

/// Databases whose writing the workers keep track of at once (status, writer, pause).
pub const MAX_DATABASES: usize = 32;

/// Seconds between two recorded uses of one key (both paths): how fresh last_used_at is kept.
pub static LAST_USED_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);
/// Seconds between two writes of the shared buffer by the background workers.
pub static FLUSH_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(10);

/// What the workers know of one database's writing: in [`Shared::dbs`], under its lock.
#[derive(Copy, Clone)]
pub struct DbSlot {
    /// The database's OID; 0: a free slot.
    pub oid: u32,
    /// The writer connected to it, 0 when none runs.
    pub writer_pid: i32,
    /// Address of that writer's latch (in shared memory), 0 when none runs.
    pub writer_latch: usize,
    /// When the launcher asked for a writer that has not started yet (TimestampTz), 0 if not.
    pub starting_since: i64,
    /// No writer connects before this time (TimestampTz): a utility statement that cannot run
    /// while anyone is connected to the database is running (see [`crate::worker`]).
    pub paused_until: i64,
    /// After a failed write, no new writer before this time (TimestampTz).
    pub retry_at: i64,
    /// When a verify last woke the launcher for this database, which had no writer
    /// (TimestampTz); 0 once a writer has come and gone, or a pause has ended.
    pub woken_at: i64,
    /// The last successful write (TimestampTz), 0 if none yet.
    pub last_write: i64,
    /// Key uses written since the server started.
    pub written: u64,
    /// 1: keyhippo is installed there; 2: it is not (uses are discarded); 0: not known yet.
    pub installed: u8,
    /// The last write's error, NUL-padded; empty after a successful write.
    pub error: [u8; 160],
}

impl DbSlot {
    const FREE: DbSlot = DbSlot {
        oid: 0,
        writer_pid: 0,
        writer_latch: 0,
        starting_since: 0,
        paused_until: 0,
        retry_at: 0,
        woken_at: 0,
        last_write: 0,
        written: 0,
        installed: 0,
        error: [0; 160],
    };

    pub fn set_error(&mut self, message: &str) {
        self.error = [0; 160];
        let mut end = message.len().min(self.error.len() - 1);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        self.error[..end].copy_from_slice(&message.as_bytes()[..end]);
    }

    pub fn error(&self) -> Option<String> {
        let end = self.error.iter().position(|&b| b == 0).unwrap_or(0);
        (end > 0).then(|| String::from_utf8_lossy(&self.error[..end]).into_owned())
    }
}

/// The workers' shared state, under its lock.
#[derive(Copy, Clone)]
pub struct Shared {
    /// Address of the launcher's latch (in shared memory), 0 when it does not run.
    pub launcher_latch: usize,
    pub dbs: [DbSlot; MAX_DATABASES],
}

impl Default for Shared {
    fn default() -> Self {
        Shared {
            launcher_latch: 0,
            dbs: [DbSlot::FREE; MAX_DATABASES],
        }
    }
}

impl Shared {
    /// The slot of database `oid`, if it has one.
    pub fn slot(&mut self, oid: u32) -> Option<&mut DbSlot> {
        self.dbs.iter_mut().find(|s| s.oid == oid)
    }

    /// The slot of database `oid`, taking a free one (or the least recently written one with no
    /// writer) when it has none.
    pub fn slot_or_new(&mut self, oid: u32) -> &mut DbSlot {
        let i = match self.dbs.iter().position(|s| s.oid == oid) {
            Some(i) => i,
            None => {
                let i = self
                    .dbs
                    .iter()
                    .position(|s| s.oid == 0)
                    .or_else(|| {
                        (0..MAX_DATABASES)
                            .filter(|&i| {
                                self.dbs[i].writer_pid == 0 && self.dbs[i].starting_since == 0
                            })
                            .min_by_key(|&i| self.dbs[i].last_write)
                    })
                    .unwrap_or(0);
                self.dbs[i] = DbSlot {
                    oid,
                    ..DbSlot::FREE
                };
                i
            }
        };
        &mut self.dbs[i]
    }
}

// SAFETY: plain old data; the latch addresses are in shared memory, valid in every process.
unsafe impl PGRXSharedMemory for Shared {}

/// The uses in the buffer, `len` of them: read and written only under the lock of [`SHARED`]
/// (and by the postmaster when no other process runs). Allocated in shared memory by
/// [`request_slots`] / [`attach_slots`] and zeroed there: pgrx's `pg_shmem_init!` would build
/// the 3.6 MB value on the postmaster's stack first, which overflows it in an unoptimised build.
#[repr(C)]
struct UseSlots {
    len: usize,
    /// The database of each use (its OID).
    dbs: [u32; CAPACITY],
    ids: [[u8; 16]; CAPACITY],
    /// When (TimestampTz: microseconds since 2000-01-01).
    at: [i64; CAPACITY],
}

impl UseSlots {
    /// Appends one use; false when the buffer is full.
    fn push(&mut self, database: u32, id: [u8; 16], at: i64) -> bool {
        let i = self.len;
        if i >= CAPACITY {
            return false;
        }
        self.dbs[i] = database;
        self.ids[i] = id;
        self.at[i] = at;
        self.len = i + 1;
        true
    }
}

/// This process's address of the shared [`UseSlots`] (set in the postmaster, inherited).
static SLOTS: AtomicPtr<UseSlots> = AtomicPtr::new(std::ptr::null_mut());
static mut PREV_SHMEM_STARTUP: Option<unsafe extern "C-unwind" fn()> = None;

/// Asks for the buffer's shared memory (from `shmem_request_hook`, or `_PG_init` on 14).
pub fn request_slots() {
    // SAFETY: the postmaster's shared memory set-up, single-threaded.
    unsafe { pg_sys::RequestAddinShmemSpace(std::mem::size_of::<UseSlots>()) };
}

#[pg_guard]
unsafe extern "C-unwind" fn attach_slots() {
    // SAFETY: the postmaster's (or, with EXEC_BACKEND, each process's) shared memory set-up;
    // AddinShmemInitLock serialises ShmemInitStruct as for every extension.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        let init_lock = crate::compat::addin_shmem_init_lock();
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
        if !pg_sys::IsUnderPostmaster {
            // The postmaster: uses saved at the last clean shutdown come back; at exit, what is
            // left is saved again.
            if !found {
                load_saved_uses(&mut *slots);
            }
            pg_sys::on_shmem_exit(Some(save_uses_at_exit), pg_sys::Datum::from(0));
        }
    }
}

/// The shared uses; only while holding [`SHARED`]'s lock exclusively (the guard proves it).
fn slots(_locked: &mut Shared) -> &mut UseSlots {
    // SAFETY: set at startup in every process that preloaded keyhippo (the only ones that
    // reach here: callers check `preloaded()`); exclusive access under the lock.
    unsafe { &mut *SLOTS.load(Ordering::Relaxed) }
}

/// The shared uses, to read; only while holding [`SHARED`]'s lock (the guard proves it).
fn slots_to_read(_locked: &Shared) -> &UseSlots {
    // SAFETY: as in `slots`; no writer while the lock is held.
    unsafe { &*SLOTS.load(Ordering::Relaxed) }
}

pub static SHARED: PgLwLock<Shared> = unsafe { PgLwLock::new(c"keyhippo_pending_uses") };

/// Whether this process belongs to a server that preloaded keyhippo (set in the postmaster
/// before it forks, so every backend inherits it).
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Where the postmaster keeps the buffer across a clean restart (relative to the data
/// directory, its working directory).
const SAVED_USES: &str = "pg_stat/keyhippo_pending_uses";
const SAVED_MAGIC: &[u8; 8] = b"KHUSES01";

/// Saves the buffer when the postmaster exits cleanly (every other process has exited).
#[pg_guard]
unsafe extern "C-unwind" fn save_uses_at_exit(code: i32, _arg: pg_sys::Datum) {
    let slots = SLOTS.load(Ordering::Relaxed);
    // After a crash the buffer may be half-written: nothing is saved.
    if code != 0 || slots.is_null() {
        return;
    }
    // SAFETY: no other process is left to touch the buffer.
    let slots = unsafe { &*slots };
    let len = slots.len.min(CAPACITY);
    if len == 0 {
        return;
    }
    let mut out = Vec::with_capacity(16 + len * 28);
    out.extend_from_slice(SAVED_MAGIC);
    out.extend_from_slice(&(len as u64).to_le_bytes());
    for i in 0..len {
        out.extend_from_slice(&slots.dbs[i].to_le_bytes());
        out.extend_from_slice(&slots.ids[i]);
        out.extend_from_slice(&slots.at[i].to_le_bytes());
    }
    let tmp = format!("{SAVED_USES}.tmp");
    if std::fs::write(&tmp, &out)
        .and_then(|()| std::fs::rename(&tmp, SAVED_USES))
        .is_err()
    {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Reads the uses [`save_uses_at_exit`] saved, once, into the fresh buffer.
fn load_saved_uses(slots: &mut UseSlots) {
    let Ok(data) = std::fs::read(SAVED_USES) else {
        return;
    };
    let _ = std::fs::remove_file(SAVED_USES);
    if data.len() < 16 || &data[..8] != SAVED_MAGIC {
        return;
    }
    let len = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes")) as usize;
    let records = data[16..].chunks_exact(28).take(len.min(CAPACITY));
    let mut n = 0;
    for record in records {
        slots.dbs[n] = u32::from_le_bytes(record[..4].try_into().expect("4 bytes"));
        slots.ids[n].copy_from_slice(&record[4..20]);
        slots.at[n] = i64::from_le_bytes(record[20..28].try_into().expect("8 bytes"));
        n += 1;
    }
    slots.len = n;
}

/// Slots of [`Recent`]: a power of two.
const RECENT_SLOTS: usize = 4096;

/// Keys this backend has recently put in the buffer, and when: one entry per key per interval
/// is enough, whatever the request rate. Direct-mapped (a key has one slot, chosen by its id's
/// random bits; a key that takes another's slot makes that one be recorded again, which the
/// writer folds into one write): 80 kB that stay in the CPU caches, where a hash map of every
/// key recorded would grow with the number of keys in service.
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
    /// Whether this backend's database may be served by the workers (looked up once).
    static SERVED: Cell<Option<bool>> = const { Cell::new(None) };
}

pub fn init() {
    GucRegistry::define_int_guc(
        c"keyhippo.last_used_interval",
        c"Seconds between two recorded uses of the same API key.",
        c"last_used_at is kept accurate to within this interval (plus the flush interval when the background workers are used).",
        &LAST_USED_INTERVAL,
        1,
        86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"keyhippo.last_used_flush_interval",
        c"Seconds between two writes of recorded key uses by keyhippo's background workers.",
        c"Only used when keyhippo is in shared_preload_libraries.",
        &FLUSH_INTERVAL,
        1,
        3_600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"keyhippo.verify_index_probes",
        c"Whether verify finds keys with two index probes instead of a prepared SQL statement.",
        c"On (the default): the faster path. Off: the same lookup as a prepared statement, for comparison.",
        &crate::keys::INDEX_PROBES,
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
        pg_shmem_init!(SHARED = Shared::default());
        crate::compat::request_shmem(request_slots);
        // SAFETY: library load in the postmaster, single-threaded: our hook chains the one
        // installed before.
        unsafe {
            PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
            pg_sys::shmem_startup_hook = Some(attach_slots);
        }
        crate::cache::init_shmem();
        PRELOADED.store(true, Ordering::Relaxed);
        crate::worker::register_launcher();
    }
}

/// Whether a use at `now` must be recorded, the key's last known use being `last_used`
/// (TimestampTz; None: never used): once per `keyhippo.last_used_interval`. The one rule for
/// the row's `last_used_at`, the verified-key cache and this backend's memory of recorded keys.
pub fn due(last_used: Option<i64>, now: i64) -> bool {
    let interval = LAST_USED_INTERVAL.get().max(1) as i64 * 1_000_000;
    last_used.is_none_or(|used| now.saturating_sub(used) >= interval)
}

/// Whether this server preloaded keyhippo (shared memory and the workers exist).
pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}

/// Whether this backend hands uses to the background workers: keyhippo is preloaded, this is
/// not `pg_upgrade`, and this database is not a template (no worker ever connects to one).
pub fn served_here() -> bool {
    if !preloaded() {
        return false;
    }
    SERVED.with(|served| {
        if let Some(known) = served.get() {
            return known;
        }
        // SAFETY: reads of backend state and one syscache lookup of this database's row.
        let known = unsafe {
            !pg_sys::IsBinaryUpgrade && !crate::worker::is_template(pg_sys::MyDatabaseId)
        };
        served.set(Some(known));
        known
    })
}

/// Records a use of key `id` at `now` (TimestampTz) for the background workers. Returns false when the caller must fall
/// back to the synchronous update (not served here, buffer full).
pub fn record(id: pgrx::Uuid, now: i64) -> bool {
    if !served_here() {
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
    // SAFETY: a plain read of backend state.
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let wake = {
        let mut shared = SHARED.exclusive();
        let uses = slots(&mut shared);
        let len = uses.len;
        if !uses.push(database, key, now) {
            return false;
        }
        let launcher = shared.launcher_latch;
        match shared.slot(database) {
            // A writer is there: woken for each batch.
            Some(db) if db.writer_pid != 0 => {
                if (len + 1).is_multiple_of(WAKE_BATCH) {
                    db.writer_latch
                } else {
                    0
                }
            }
            // One is starting, or the launcher was woken for this database a moment ago.
            Some(db) if db.starting_since != 0 || now - db.woken_at < WAKE_AGAIN_AFTER => 0,
            // No writer: the launcher starts one.
            _ => {
                shared.slot_or_new(database).woken_at = now;
                launcher
            }
        }
    };
    if wake != 0 {
        // SAFETY: the address of a latch in shared memory (a worker's PGPROC); setting a latch
        // its owner has left is harmless.
        unsafe { pg_sys::SetLatch(wake as *mut pg_sys::Latch) };
    }
    RECENT.with(|r| {
        let mut r = r.borrow_mut();
        r.ids[slot] = key;
        r.at[slot] = now;
    });
    true
}

/// One recorded use of a key: its id, when (TimestampTz).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Use {
    pub id: [u8; 16],
    pub at: i64,
}

/// One use per key, the latest, in key order.
pub fn latest_per_key(mut uses: Vec<Use>) -> Vec<Use> {
    uses.sort_unstable_by(|a, b| a.id.cmp(&b.id).then(b.at.cmp(&a.at)));
    uses.dedup_by(|later, kept| later.id == kept.id);
    uses
}

/// Takes the uses of database `database` out of the shared buffer (the latest of each key).
pub fn drain(database: u32) -> Vec<Use> {
    let mut taken = Vec::new();
    {
        let mut shared = SHARED.exclusive();
        let uses = slots(&mut shared);
        let mut kept = 0;
        for i in 0..uses.len {
            if uses.dbs[i] == database {
                taken.push(Use {
                    id: uses.ids[i],
                    at: uses.at[i],
                });
            } else {
                uses.dbs[kept] = uses.dbs[i];
                uses.ids[kept] = uses.ids[i];
                uses.at[kept] = uses.at[i];
                kept += 1;
            }
        }
        uses.len = kept;
    }
    latest_per_key(taken)
}

/// Puts uses a writer could not write back into the buffer (as many as fit), for the next try.
pub fn give_back(database: u32, uses: &[Use]) {
    let mut shared = SHARED.exclusive();
    let slots = slots(&mut shared);
    for u in uses {
        if !slots.push(database, u.id, u.at) {
            break;
        }
    }
}

/// How many uses are buffered per database.
pub fn pending_per_database() -> Vec<(u32, usize)> {
    let mut counts: Vec<(u32, usize)> = Vec::new();
    let shared = SHARED.share();
    let uses = slots_to_read(&shared);
    for &db in &uses.dbs[..uses.len] {
        match counts.iter_mut().find(|(d, _)| *d == db) {
            Some((_, n)) => *n += 1,
            None => counts.push((db, 1)),
        }
    }
    counts
}

const FLUSH: Plan = Plan {
    // DISTINCT ON ... ORDER BY id: the latest use of each key, in key order, so the index and
    // heap pages are visited in order (key ids grow with time, and so does the heap).
    sql: "UPDATE keyhippo.api_key_metadata m SET last_used_at = v.used_at \
            FROM (SELECT DISTINCT ON (u.id) u.id, u.used_at \
                    FROM ROWS FROM (pg_catalog.unnest($1::uuid[]), pg_catalog.unnest($2::timestamptz[])) \
                         AS u(id, used_at) \
                   ORDER BY u.id, u.used_at DESC) v \
           WHERE m.id = v.id AND (m.last_used_at IS NULL OR m.last_used_at < v.used_at)",
    args: &[types::UUID_ARRAY, types::TIMESTAMPTZ_ARRAY],
    mutating: true,
};

/// Writes `uses` to this database's `api_key_metadata.last_used_at` with one UPDATE statement,
/// never moving a time back.
pub fn write(client: &mut pgrx::spi::SpiClient<'_>, uses: &[Use]) -> Result<()> {
    if uses.is_empty() {
        return Ok(());
    }
    let (ids, at): (Vec<pgrx::Uuid>, Vec<TimestampWithTimeZone>) = uses
        .iter()
        .filter_map(|u| {
            let at = TimestampWithTimeZone::try_from(u.at).ok()?;
            Some((pgrx::Uuid::from_bytes(u.id), at))
        })
        .unzip();
    FLUSH.run(client, &[ids.into(), at.into()])?;
    Ok(())
}

/// Writes this database's buffered uses now (tests and operators: no need to wait for the
/// worker). Returns how many keys had uses to write; 0 when keyhippo is not preloaded.
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
    if !preloaded() {
        return 0;
    }
    // SAFETY: a plain read of backend state.
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let uses = drain(database);
    if uses.is_empty() {
        return 0;
    }
    let written = Spi::connect_mut(|client| write(client, &uses));
    if written.is_err() {
        give_back(database, &uses);
    }
    crate::error::or_raise(written);
    uses.len() as i64
}
