//! Recording key use (`last_used_at`) without writing on the verify path.
//!
//! When keyhippo is in `shared_preload_libraries`, verify appends (database, key id, time) to a
//! buffer in shared memory, and background workers write the buffer to
//! `api_key_metadata.last_used_at` of each database (see src/worker.rs). Verify then never
//! writes a row, so it costs little more than its index lookup and works in READ ONLY
//! transactions and on hot standbys (where the buffer is discarded: a standby cannot write).
//! At a clean shutdown the postmaster saves what is still buffered to a file in the data
//! directory, and reads it back at the next start.
//!
//! Without preloading (and in template databases, during `pg_upgrade`, or when the buffer is
//! full), verify falls back to a synchronous update at commit (src/fallback_use.rs): at most
//! once per `keyhippo.last_used_interval` seconds per key, never waiting for a lock, skipped in
//! read-only transactions.

use pgrx::datum::TimestampWithTimeZone;
use std::cell::{Cell, RefCell};

use crate::error::Result;
use crate::pg::backend;
use crate::pg::plans::{types, Plan};
use crate::pg::shmem::{self, slots, slots_to_read, SHARED};
use crate::settings;

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

/// Whether a use at `now` must be recorded, the key's last known use being `last_used`
/// (TimestampTz; None: never used): once per `keyhippo.last_used_interval`. The one rule for
/// the row's `last_used_at`, the verified-key cache and this backend's memory of recorded keys.
pub fn due(last_used: Option<i64>, now: i64) -> bool {
    let interval = settings::last_used_interval_micros();
    last_used.is_none_or(|used| now.saturating_sub(used) >= interval)
}

/// Whether this backend hands uses to the background workers: keyhippo is preloaded, this is
/// not `pg_upgrade`, and this database is not a template (no worker ever connects to one).
pub fn served_here() -> bool {
    if !shmem::preloaded() {
        return false;
    }
    SERVED.with(|served| {
        if let Some(known) = served.get() {
            return known;
        }
        let known = !backend::binary_upgrade()
            && backend::database_state(backend::database_id()) != backend::DatabaseState::Closed;
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
    let database = backend::database_id();
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
    backend::set_latch(wake);
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

/// Writes this database's buffered uses now; returns how many keys had uses to write (0 when
/// keyhippo is not preloaded).
pub fn flush_here() -> Result<i64> {
    // Refused (25006) before anything is taken from the buffer: taking uses and then failing to
    // write them would lose them.
    backend::prevent_write("flush_key_usage()");
    if !shmem::preloaded() {
        return Ok(0);
    }
    let database = backend::database_id();
    let uses = drain(database);
    if uses.is_empty() {
        return Ok(0);
    }
    let written = pgrx::spi::Spi::connect_mut(|client| write(client, &uses));
    if written.is_err() {
        give_back(database, &uses);
    }
    written.map(|()| uses.len() as i64)
}
