//! Everything keyhippo keeps in shared memory, and its set-up when the library is preloaded:
//! the buffer of recorded key uses and the background workers' state ([`SHARED`], its
//! [`UseSlots`]), the two counters that keep the per-backend caches correct
//! ([`CACHE_EPOCH`], [`CACHE_IN_FLIGHT`]; see src/cache.rs), and the rate-limit counters
//! ([`RATE_LOCK`], [`rate_counters`]; see src/limits.rs), and the verification counts
//! ([`COUNTS_LOCK`], [`counts`]; see src/usage_counts.rs), and the credit balances
//! ([`BALANCES_LOCK`], [`balances`]; see src/credits.rs). The buffer of uses and the balances
//! not yet written are saved to files when the postmaster shuts down cleanly and read back at
//! the next start.

use keyhippo_core::credits::{Balance, Balances};
use keyhippo_core::ratelimit::Counter;
use keyhippo_core::usagecount::Cell as CountCell;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic, PgLwLock};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};

/// Uses held between two writes. A full buffer makes verify fall back to the synchronous path.
pub const CAPACITY: usize = 128 * 1024;

/// Databases whose writing the workers keep track of at once (status, writer, pause).
pub const MAX_DATABASES: usize = 32;

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
pub struct UseSlots {
    pub len: usize,
    /// The database of each use (its OID).
    pub dbs: [u32; CAPACITY],
    pub ids: [[u8; 16]; CAPACITY],
    /// When (TimestampTz: microseconds since 2000-01-01).
    pub at: [i64; CAPACITY],
}

impl UseSlots {
    /// Appends one use; false when the buffer is full.
    pub fn push(&mut self, database: u32, id: [u8; 16], at: i64) -> bool {
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
fn request_slots() {
    let counters = rate_counters_len() * std::mem::size_of::<Counter>();
    // SAFETY: the postmaster's shared memory set-up, single-threaded.
    unsafe {
        pg_sys::RequestAddinShmemSpace(std::mem::size_of::<UseSlots>());
        pg_sys::RequestAddinShmemSpace(counters);
        pg_sys::RequestAddinShmemSpace(COUNT_CELLS * std::mem::size_of::<CountCell>());
        pg_sys::RequestAddinShmemSpace(BALANCE_SLOTS * std::mem::size_of::<Balance>());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn attach_slots() {
    // SAFETY: the postmaster's (or, with EXEC_BACKEND, each process's) shared memory set-up;
    // AddinShmemInitLock serialises ShmemInitStruct as for every extension.
    unsafe {
        if let Some(prev) = PREV_SHMEM_STARTUP {
            prev();
        }
        let init_lock = super::compat::addin_shmem_init_lock();
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
        let len = rate_counters_len();
        let mut counters_found = false;
        let counters = pg_sys::ShmemInitStruct(
            c"keyhippo_rate_counters_table".as_ptr(),
            len * std::mem::size_of::<Counter>(),
            &mut counters_found,
        )
        .cast::<Counter>();
        if !counters_found {
            // All zeroes: every counter unused.
            std::ptr::write_bytes(counters, 0, len);
        }
        let mut cells_found = false;
        let cells = pg_sys::ShmemInitStruct(
            c"keyhippo_usage_count_table".as_ptr(),
            COUNT_CELLS * std::mem::size_of::<CountCell>(),
            &mut cells_found,
        )
        .cast::<CountCell>();
        if !cells_found {
            std::ptr::write_bytes(cells, 0, COUNT_CELLS);
        }
        let mut balances_found = false;
        let balances = pg_sys::ShmemInitStruct(
            c"keyhippo_credit_balance_table".as_ptr(),
            BALANCE_SLOTS * std::mem::size_of::<Balance>(),
            &mut balances_found,
        )
        .cast::<Balance>();
        if !balances_found {
            std::ptr::write_bytes(balances, 0, BALANCE_SLOTS);
        }
        pg_sys::LWLockRelease(init_lock);
        BALANCES.store(balances, Ordering::Relaxed);
        COUNTS.store(cells, Ordering::Relaxed);
        SLOTS.store(slots, Ordering::Relaxed);
        RATE_COUNTERS.store(counters, Ordering::Relaxed);
        RATE_COUNTERS_LEN.store(len, Ordering::Relaxed);
        if !pg_sys::IsUnderPostmaster {
            // The postmaster: uses saved at the last clean shutdown come back; at exit, what is
            // left is saved again.
            if !found {
                load_saved_uses(&mut *slots);
            }
            if !balances_found {
                load_saved_balances(std::slice::from_raw_parts_mut(balances, BALANCE_SLOTS));
            }
            pg_sys::on_shmem_exit(Some(save_uses_at_exit), pg_sys::Datum::from(0));
            pg_sys::on_shmem_exit(Some(save_balances_at_exit), pg_sys::Datum::from(0));
        }
    }
}

/// The shared uses; only while holding [`SHARED`]'s lock exclusively (the guard proves it).
pub fn slots(_locked: &mut Shared) -> &mut UseSlots {
    // SAFETY: set at startup in every process that preloaded keyhippo (the only ones that
    // reach here: callers check `preloaded()`); exclusive access under the lock.
    unsafe { &mut *SLOTS.load(Ordering::Relaxed) }
}

/// The shared uses, to read; only while holding [`SHARED`]'s lock (the guard proves it).
pub fn slots_to_read(_locked: &Shared) -> &UseSlots {
    // SAFETY: as in `slots`; no writer while the lock is held.
    unsafe { &*SLOTS.load(Ordering::Relaxed) }
}

// SAFETY: set up in `setup` while the library is preloaded; used only when `preloaded()`.
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

// SAFETY (both counters): pgrx's shared atomics are set up in `setup` while the library is
// preloaded, and read only when `preloaded()` says they were.
/// Cache epoch: bumped when a transaction starts changing what verify depends on, and again when
/// it ends (src/cache.rs).
pub static CACHE_EPOCH: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"keyhippo_cache_epoch") };
/// Transactions changing what verify depends on that have not ended yet (src/cache.rs).
// SAFETY: as above.
pub static CACHE_IN_FLIGHT: PgAtomic<AtomicU64> =
    unsafe { PgAtomic::new(c"keyhippo_cache_in_flight") };

/// What the lock of the rate-limit counters (src/limits.rs) guards: nothing of its own (a byte,
/// so that its shared memory is not empty). The counters are allocated in shared memory by
/// [`request_slots`] / [`attach_slots`] (their number is a setting), zeroed: an empty table.
#[derive(Clone, Copy, Default)]
pub struct RateLock {
    _unused: u8,
}

// SAFETY: plain old data.
unsafe impl PGRXSharedMemory for RateLock {}

// SAFETY: set up in `setup` while the library is preloaded; used only when `preloaded()`.
pub static RATE_LOCK: PgLwLock<RateLock> = unsafe { PgLwLock::new(c"keyhippo_rate_counters") };

/// This process's address of the shared rate-limit counters (set in the postmaster, inherited).
static RATE_COUNTERS: AtomicPtr<Counter> = AtomicPtr::new(std::ptr::null_mut());
/// How many there are (set in the postmaster from the setting, inherited).
static RATE_COUNTERS_LEN: AtomicUsize = AtomicUsize::new(0);

/// What the lock of the verification counts (src/usage_counts.rs) guards: the number of counts
/// dropped because the table was full since the last write (the counts themselves are
/// allocated like the rate-limit counters).
#[derive(Clone, Copy, Default)]
pub struct CountsLock {
    pub dropped: u64,
}

// SAFETY: plain old data.
unsafe impl PGRXSharedMemory for CountsLock {}

// SAFETY: set up in `setup` while the library is preloaded; used only when `preloaded()`.
pub static COUNTS_LOCK: PgLwLock<CountsLock> = unsafe { PgLwLock::new(c"keyhippo_usage_counts") };

/// Verification counts held between two writes.
pub const COUNT_CELLS: usize = 32_768;

/// This process's address of the shared verification counts (set in the postmaster, inherited).
static COUNTS: AtomicPtr<CountCell> = AtomicPtr::new(std::ptr::null_mut());

/// The verification counts; only while holding [`COUNTS_LOCK`] exclusively (the guard proves it).
pub fn counts(_locked: &mut CountsLock) -> &mut [CountCell] {
    // SAFETY: allocated at startup in every process that preloaded keyhippo (the only ones that
    // reach here: callers check `preloaded()`), COUNT_CELLS of them; exclusive under the lock.
    unsafe { std::slice::from_raw_parts_mut(COUNTS.load(Ordering::Relaxed), COUNT_CELLS) }
}

/// The verification counts, to read; only while holding [`COUNTS_LOCK`].
pub fn counts_to_read(_locked: &CountsLock) -> &[CountCell] {
    // SAFETY: as in `counts`; no writer while the lock is held.
    unsafe { std::slice::from_raw_parts(COUNTS.load(Ordering::Relaxed), COUNT_CELLS) }
}

/// What the lock of the credit balances (src/credits.rs) guards: nothing of its own (the
/// balances are allocated like the rate-limit counters).
#[derive(Clone, Copy, Default)]
pub struct BalancesLock {
    _unused: u8,
}

// SAFETY: plain old data.
unsafe impl PGRXSharedMemory for BalancesLock {}

// SAFETY: set up in `setup` while the library is preloaded; used only when `preloaded()`.
pub static BALANCES_LOCK: PgLwLock<BalancesLock> =
    unsafe { PgLwLock::new(c"keyhippo_credit_balances") };

/// Credit balances held at once (keys with credits in use).
pub const BALANCE_SLOTS: usize = 16_384;

/// This process's address of the shared credit balances (set in the postmaster, inherited).
static BALANCES: AtomicPtr<Balance> = AtomicPtr::new(std::ptr::null_mut());

/// The credit balances; only while holding [`BALANCES_LOCK`] (the guard proves it; readers
/// take it exclusively too: reading a balance can refill it).
pub fn balances(_locked: &mut BalancesLock) -> &mut [Balance] {
    // SAFETY: allocated at startup in every process that preloaded keyhippo (the only ones that
    // reach here: callers check `preloaded()`), BALANCE_SLOTS of them; exclusive under the lock.
    unsafe { std::slice::from_raw_parts_mut(BALANCES.load(Ordering::Relaxed), BALANCE_SLOTS) }
}

/// Where the postmaster keeps changed balances across a clean restart.
const SAVED_BALANCES: &str = "pg_stat/keyhippo_credit_balances";
const SAVED_BALANCES_MAGIC: &[u8; 8] = b"KHCRED01";
const BALANCE_RECORD: usize = 8 + 8 + 8 + 4 + 16;

/// Saves the balances changed since they were last written, when the postmaster exits cleanly.
#[pg_guard]
unsafe extern "C-unwind" fn save_balances_at_exit(code: i32, _arg: pg_sys::Datum) {
    let table = BALANCES.load(Ordering::Relaxed);
    if code != 0 || table.is_null() {
        return;
    }
    // SAFETY: no other process is left to touch the table.
    let slots = unsafe { std::slice::from_raw_parts_mut(table, BALANCE_SLOTS) };
    let dirty = Balances::new(slots).all_dirty();
    if dirty.is_empty() {
        return;
    }
    let mut out = Vec::with_capacity(16 + dirty.len() * BALANCE_RECORD);
    out.extend_from_slice(SAVED_BALANCES_MAGIC);
    out.extend_from_slice(&(dirty.len() as u64).to_le_bytes());
    for b in &dirty {
        out.extend_from_slice(&b.generation.to_le_bytes());
        out.extend_from_slice(&b.window.to_le_bytes());
        out.extend_from_slice(&b.committed.to_le_bytes());
        out.extend_from_slice(&b.db.to_le_bytes());
        out.extend_from_slice(&b.id);
    }
    let tmp = format!("{SAVED_BALANCES}.tmp");
    if std::fs::write(&tmp, &out)
        .and_then(|()| std::fs::rename(&tmp, SAVED_BALANCES))
        .is_err()
    {
        let _ = std::fs::remove_file(&tmp);
    }
}

/// Reads the balances [`save_balances_at_exit`] saved, once, into the fresh table.
fn load_saved_balances(slots: &mut [Balance]) {
    let Ok(data) = std::fs::read(SAVED_BALANCES) else {
        return;
    };
    let _ = std::fs::remove_file(SAVED_BALANCES);
    if data.len() < 16 || &data[..8] != SAVED_BALANCES_MAGIC {
        return;
    }
    let len = u64::from_le_bytes(data[8..16].try_into().expect("8 bytes")) as usize;
    let mut table = Balances::new(slots);
    for r in data[16..].chunks_exact(BALANCE_RECORD).take(len) {
        let i64_at = |at: usize| i64::from_le_bytes(r[at..at + 8].try_into().expect("8 bytes"));
        let mut id = [0u8; 16];
        id.copy_from_slice(&r[28..44]);
        table.restore(&Balance {
            generation: i64_at(0),
            window: i64_at(8),
            committed: i64_at(16),
            reserved: 0,
            db: u32::from_le_bytes(r[24..28].try_into().expect("4 bytes")),
            dirty: 1,
            id,
        });
    }
}

/// The number of rate-limit counters to allocate.
fn rate_counters_len() -> usize {
    usize::try_from(crate::settings::RATE_LIMIT_COUNTERS.get())
        .unwrap_or(1_024)
        .max(1_024)
}

/// The rate-limit counters; only while holding [`RATE_LOCK`] exclusively (the guard proves it).
pub fn rate_counters(_locked: &mut RateLock) -> &mut [Counter] {
    let len = RATE_COUNTERS_LEN.load(Ordering::Relaxed);
    // SAFETY: allocated at startup in every process that preloaded keyhippo (the only ones that
    // reach here: callers check `preloaded()`), `len` counters; exclusive under the lock.
    unsafe { std::slice::from_raw_parts_mut(RATE_COUNTERS.load(Ordering::Relaxed), len) }
}

/// Sets up keyhippo's shared memory: from `_PG_init` while the library is preloaded.
pub fn setup() {
    pg_shmem_init!(SHARED = Shared::default());
    pg_shmem_init!(RATE_LOCK);
    pg_shmem_init!(COUNTS_LOCK);
    pg_shmem_init!(BALANCES_LOCK);
    pg_shmem_init!(CACHE_EPOCH);
    pg_shmem_init!(CACHE_IN_FLIGHT);
    super::compat::request_shmem(request_slots);
    // SAFETY: library load in the postmaster, single-threaded: our hook chains the one
    // installed before.
    unsafe {
        PREV_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(attach_slots);
    }
    PRELOADED.store(true, Ordering::Relaxed);
}

/// Whether this server preloaded keyhippo (shared memory and the workers exist).
pub fn preloaded() -> bool {
    PRELOADED.load(Ordering::Relaxed)
}
