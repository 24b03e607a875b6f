//! Writing recorded key uses to `api_key_metadata.last_used_at` where verify found the rows.
//!
//! At a million keys nearly every verify is a key's first use within
//! `keyhippo.last_used_interval`, so the background worker writes about one row per verify. As
//! an `UPDATE ... FROM unnest(...)` statement each row cost a sort, a descent of the primary key
//! (three or four pages of a B-tree that does not fit in the CPU caches), the executor's
//! projection and the update: ~14 µs of the worker's CPU per verify, on the same two cores the
//! verifying backends run on (measured with `perf`, 1,000,000 keys, pgbench).
//!
//! Verify already knows where the row is: the tuple id of the version it read. The worker
//! fetches that tuple the way an index scan does (following a HOT chain to the version its
//! snapshot sees, pruning the page first), checks that it is still the row of the key recorded
//! (a tuple id can be reused after VACUUM), and updates it through the table access method,
//! inserting index entries when the update is not HOT — what `ExecSimpleRelationUpdate` (the
//! logical replication apply worker's update) does. Whatever it cannot write this way goes to
//! the caller's SQL statement: rows that moved (a non-HOT update) or changed concurrently, and every use when the table has something
//! an `UPDATE` statement would run that this does not — an UPDATE trigger that fires when
//! `session_replication_role` is `replica` (as the worker sets it: recording a use is not a
//! change to audit), rules, stored generated columns, forced row level security, another table
//! access method.
//!
//! A key used before (last_used_at already set) has only those 8 bytes to change: they are
//! overwritten where they are ([`overwrite`]), like `heap_inplace_update` does for `pg_class`,
//! when nothing could tell the difference from a new row version ([`in_place_allowed`], and
//! `keyhippo.last_used_in_place`): no dead version for pruning and VACUUM, no HOT chain for the
//! next verify. An UPDATE that read the row before an overwrite and writes its new version
//! after it keeps the later time through the `keyhippo_keep_last_used` trigger. The version is
//! checked and overwritten under the page lock at the tuple id verify read when it holds that
//! version (or redirects to it), the common case; otherwise where the fetch above finds it.

use pgrx::pg_sys;
use std::cell::RefCell;

/// Uses [`write`] overwrote where verify read the row, without fetching it: for the tests to
/// tell that path from the fetch.
#[cfg(any(test, feature = "pg_test"))]
pub static WRITTEN_WHERE_FOUND: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

thread_local! {
    /// The table and the pages the last [`write`] of this process updated rows on: each holds
    /// a dead row version once that transaction has committed, and the next [`write`] prunes
    /// them (what the next reader of the page would otherwise do: a verify, with a WAL record
    /// of its own to write and the WAL writer to wake).
    static UPDATED_PAGES: RefCell<(pg_sys::Oid, Vec<u32>)> =
        const { RefCell::new((pg_sys::InvalidOid, Vec::new())) };
}

/// Pins block `block` of `rel`'s main fork (reading it into shared buffers if needed).
unsafe fn read_block(rel: pg_sys::Relation, block: pg_sys::BlockNumber) -> pg_sys::Buffer {
    unsafe {
        pg_sys::ReadBufferExtended(
            rel,
            pg_sys::ForkNumber::MAIN_FORKNUM,
            block,
            pg_sys::ReadBufferMode::RBM_NORMAL,
            std::ptr::null_mut(),
        )
    }
}

/// Prunes the pages the previous [`write`] updated rows on, when they are of `rel` and still
/// in it (the dead row versions of that write's committed transaction: no snapshot needs them
/// any more, or `heap_page_prune_opt` leaves them).
unsafe fn prune_previous_pages(rel: pg_sys::Relation, blocks: pg_sys::BlockNumber) {
    let (table, pages) = UPDATED_PAGES.with(|p| std::mem::take(&mut *p.borrow_mut()));
    if table != unsafe { (*rel).rd_id } {
        return;
    }
    for block in pages.into_iter().filter(|&b| b < blocks) {
        unsafe {
            let buffer = read_block(rel, block);
            pg_sys::heap_page_prune_opt(rel, buffer);
            pg_sys::ReleaseBuffer(buffer);
        }
    }
}

/// A tuple id: block and line pointer (offset from 1; 0 is no tuple).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub struct Tid {
    pub block: u32,
    pub offset: u16,
}

impl Tid {
    #[cfg(any(test, feature = "pg_test"))]
    pub const NONE: Tid = Tid {
        block: pg_sys::InvalidBlockNumber,
        offset: 0,
    };

    fn is_valid(self) -> bool {
        self.block != pg_sys::InvalidBlockNumber && self.offset != 0
    }

    fn item_pointer(self) -> pg_sys::ItemPointerData {
        let mut tid = pg_sys::ItemPointerData::default();
        pgrx::itemptr::item_pointer_set_all(&mut tid, self.block, self.offset);
        tid
    }
}

impl From<pg_sys::ItemPointerData> for Tid {
    fn from(tid: pg_sys::ItemPointerData) -> Tid {
        let (block, offset) = pgrx::itemptr::item_pointer_get_both(tid);
        Tid { block, offset }
    }
}

/// One recorded use of a key: its id, where verify read its row, when (TimestampTz).
#[derive(Clone, Copy, Debug)]
pub struct Use {
    pub id: [u8; 16],
    pub tid: Tid,
    pub at: i64,
}

/// One use per key — the latest, with the latest known tuple id of its row — in tuple id order
/// (the pages of the table in order).
pub fn latest_per_key(mut uses: Vec<Use>) -> Vec<Use> {
    uses.sort_unstable_by(|a, b| a.id.cmp(&b.id).then(b.at.cmp(&a.at)));
    let mut latest: Vec<Use> = Vec::with_capacity(uses.len());
    for u in uses {
        match latest.last_mut() {
            Some(last) if last.id == u.id => {
                if !last.tid.is_valid() {
                    last.tid = u.tid;
                }
            }
            _ => latest.push(u),
        }
    }
    latest.sort_unstable_by_key(|u| u.tid);
    latest
}

/// Whether an UPDATE of `rel` runs nothing but the update itself and its index entries when
/// `session_replication_role` is `replica`: what [`write`] does is then what that statement
/// would do.
unsafe fn plain_update_target(rel: pg_sys::Relation) -> bool {
    unsafe {
        let form = (*rel).rd_rel;
        if (*form).relkind != pg_sys::RELKIND_RELATION as std::ffi::c_char
            || (*rel).rd_tableam != pg_sys::GetHeapamTableAmRoutine()
            || (*form).relhasrules
            || (*form).relforcerowsecurity
        {
            return false;
        }
        let constr = (*(*rel).rd_att).constr;
        if !constr.is_null() && (*constr).has_generated_stored {
            return false;
        }
        let triggers = (*rel).trigdesc;
        if !triggers.is_null() {
            let all =
                std::slice::from_raw_parts((*triggers).triggers, (*triggers).numtriggers as usize);
            let fires_on_replica = |t: &pg_sys::Trigger| {
                (t.tgenabled == pg_sys::TRIGGER_FIRES_ALWAYS as std::ffi::c_char
                    || t.tgenabled == pg_sys::TRIGGER_FIRES_ON_REPLICA as std::ffi::c_char)
                    && !inert_on_use(t)
            };
            if all
                .iter()
                .any(|t| t.tgtype & pg_sys::TRIGGER_TYPE_UPDATE as i16 != 0 && fires_on_replica(t))
            {
                return false;
            }
        }
        true
    }
}

/// keyhippo's own UPDATE triggers that fire in every replication role (sql/finalize.sql: a
/// revocation or a change verify depends on must take effect however it is written) and do
/// nothing when only last_used_at changes: their column lists or WHEN conditions name revocation,
/// expiry, owner, scope and prefix only.
const INERT_ON_USE: [&std::ffi::CStr; 3] = [
    c"keyhippo_sync_revocation",
    c"keyhippo_delete_revoked_secret",
    c"keyhippo_cache_update",
];

/// Whether trigger `t` is one of [`INERT_ON_USE`].
fn inert_on_use(t: &pg_sys::Trigger) -> bool {
    // SAFETY: tgname is the NUL-terminated name in the relation's trigger descriptor.
    let name = unsafe { std::ffi::CStr::from_ptr(t.tgname) };
    INERT_ON_USE.contains(&name)
}

/// What [`overwrite`] did.
enum Overwrite {
    Written,
    /// The row already holds this time or a later one.
    NotNeeded,
    /// Not a row version it may overwrite there (see [`overwrite`]).
    Elsewhere,
}

/// `XLOG_HEAP_INPLACE` (access/heapam_xlog.h): the record `heap_inplace_update` writes, whose
/// main data is the tuple's offset (`xl_heap_inplace` as in PostgreSQL 13 to 16; newer
/// versions add cache invalidation data to it, so no overwrite is made there) and whose block
/// data is the tuple's new contents.
const XLOG_HEAP_INPLACE: u8 = 0x70;

/// Whether last_used_at of `rel` may be overwritten in place: a permanent table not created
/// in this transaction (its changes are always WAL-logged), no index on the column (its
/// entries would go stale), not published for logical replication of updates (an overwrite
/// is not decoded).
unsafe fn in_place_allowed(rel: pg_sys::Relation, used_att: pg_sys::AttrNumber) -> bool {
    // The WAL record `overwrite` writes has PostgreSQL 13 to 16's layout.
    if !cfg!(any(
        feature = "pg13",
        feature = "pg14",
        feature = "pg15",
        feature = "pg16"
    )) {
        return false;
    }
    unsafe {
        if (*(*rel).rd_rel).relpersistence != pg_sys::RELPERSISTENCE_PERMANENT as std::ffi::c_char
            || (*rel).rd_createSubid != 0
            || (*rel).rd_firstRelfilenodeSubid != 0
        {
            return false;
        }
        let indexed = pg_sys::RelationGetIndexAttrBitmap(
            rel,
            pg_sys::IndexAttrBitmapKind::INDEX_ATTR_BITMAP_ALL,
        );
        let member = used_att as i32 - pg_sys::FirstLowInvalidHeapAttributeNumber;
        if pg_sys::bms_is_member(member, indexed) {
            return false;
        }
        let mut publications: pg_sys::PublicationDesc = std::mem::zeroed();
        pg_sys::RelationBuildPublicationDesc(rel, &mut publications);
        !publications.pubactions.pubupdate
    }
}

/// Whether no transaction is updating or locking the row version `tuple` (its page locked):
/// no xmax, or only a lock (not a MultiXact) by a transaction that has ended. (An UPDATE
/// through the executor leaves its own transaction as a key-share locker on the new version
/// when a BEFORE ROW trigger locked the row first, as keyhippo's do: once it has committed,
/// that is no lock.)
unsafe fn unlocked(tuple: pg_sys::HeapTupleHeader) -> bool {
    unsafe {
        let infomask = (*tuple).t_infomask as u32;
        let xmax = (*tuple).t_choice.t_heap.t_xmax;
        if infomask & pg_sys::HEAP_XMAX_INVALID != 0 || xmax == pg_sys::InvalidTransactionId {
            return true;
        }
        // HEAP_XMAX_IS_LOCKED_ONLY
        let lock_only = infomask & pg_sys::HEAP_XMAX_LOCK_ONLY != 0
            || infomask & (pg_sys::HEAP_XMAX_IS_MULTI | pg_sys::HEAP_LOCK_MASK)
                == pg_sys::HEAP_XMAX_EXCL_LOCK;
        infomask & pg_sys::HEAP_XMAX_IS_MULTI == 0
            && lock_only
            && !pg_sys::TransactionIdIsInProgress(xmax)
    }
}

/// Where column `att` (from 0) of `desc` starts in the data of row version `tuple` (`data_len`
/// bytes from `t_hoff`), None when it is NULL or not in the tuple (a column added later):
/// the walk over the columns before it that `nocachegetattr` makes (alignment, NULLs,
/// variable lengths; a varlena with a 1-byte header is not aligned).
unsafe fn field_offset(
    desc: pg_sys::TupleDesc,
    tuple: pg_sys::HeapTupleHeader,
    data_len: usize,
    att: usize,
) -> Option<usize> {
    unsafe {
        let in_tuple = ((*tuple).t_infomask2 as u32 & pg_sys::HEAP_NATTS_MASK) as usize;
        if att >= in_tuple || att >= (*desc).natts as usize {
            return None;
        }
        let has_nulls = (*tuple).t_infomask as u32 & pg_sys::HEAP_HASNULL != 0;
        let bits = (*tuple).t_bits.as_ptr();
        let data = (tuple as *const u8).add((*tuple).t_hoff as usize);
        let attrs = (*desc).attrs.as_slice(att + 1);
        let mut off = 0usize;
        for (i, a) in attrs.iter().enumerate() {
            // att_isnull: a clear bit is a NULL.
            if has_nulls && *bits.add(i >> 3) & (1 << (i & 7)) == 0 {
                if i == att {
                    return None;
                }
                continue;
            }
            let align: usize = match a.attalign as u8 {
                b'c' => 1,
                b's' => 2,
                b'i' => 4,
                b'd' => 8,
                _ => return None,
            };
            // att_align_pointer: a varlena whose first byte is not a pad byte (zero) has a
            // 1-byte header and starts where it is.
            if off >= data_len {
                return None;
            }
            if !(a.attlen == -1 && *data.add(off) != 0) {
                off = (off + align - 1) & !(align - 1);
            }
            if i == att {
                return Some(off);
            }
            if off >= data_len {
                return None;
            }
            off += match a.attlen {
                len if len > 0 => len as usize,
                -1 => pgrx::varlena::varsize_any(data.add(off).cast()),
                -2 => std::ffi::CStr::from_ptr(data.add(off).cast()).count_bytes() + 1,
                _ => return None,
            };
        }
        None
    }
}

/// Overwrites last_used_at of key `u`'s row with `u.at` where it is: the row version at line
/// pointer `offset` of `buffer`'s page (pinned by the caller), or the one that line pointer
/// redirects to once the page is pruned. Only when that version is the one `snapshot` sees, has
/// no newer version and no updater or locker ([`unlocked`]; else the row is written as a new
/// version, which waits for them), is `u`'s key and has last_used_at set (NULL, a first use, makes
/// the row grow). Checked and written under the page's exclusive lock in one go, the column found
/// by [`field_offset`]; WAL-logged as `heap_inplace_update` does, so replay and standbys see it.
unsafe fn overwrite(
    rel: pg_sys::Relation,
    snapshot: pg_sys::Snapshot,
    buffer: pg_sys::Buffer,
    offset: pg_sys::OffsetNumber,
    u: &Use,
    id_i: usize,
    used_i: usize,
) -> Overwrite {
    unsafe {
        pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_EXCLUSIVE as i32);
        let page = pg_sys::BufferGetPage(buffer);
        let last = pg_sys::PageGetMaxOffsetNumber(page);
        let result = 'check: {
            let mut offset = offset;
            if offset == 0 || offset > last {
                break 'check Overwrite::Elsewhere;
            }
            let mut item = pg_sys::PageGetItemId(page, offset);
            // A row updated once in place of its first version (HOT) and pruned since: the
            // tuple id verify read points to the version that replaced it.
            if (*item).lp_flags() == pg_sys::LP_REDIRECT {
                offset = (*item).lp_off() as pg_sys::OffsetNumber;
                if offset == 0 || offset > last {
                    break 'check Overwrite::Elsewhere;
                }
                item = pg_sys::PageGetItemId(page, offset);
            }
            if (*item).lp_flags() != pg_sys::LP_NORMAL {
                break 'check Overwrite::Elsewhere;
            }
            let tuple = pg_sys::PageGetItem(page, item) as pg_sys::HeapTupleHeader;
            let len = (*item).lp_len() as usize;
            let hoff = (*tuple).t_hoff as usize;
            if (*tuple).t_infomask2 as u32 & pg_sys::HEAP_HOT_UPDATED != 0
                || !unlocked(tuple)
                || len <= hoff
            {
                break 'check Overwrite::Elsewhere;
            }
            let mut version = pg_sys::HeapTupleData {
                t_len: len as u32,
                t_self: Tid {
                    block: pg_sys::BufferGetBlockNumber(buffer),
                    offset,
                }
                .item_pointer(),
                t_tableOid: (*rel).rd_id,
                t_data: tuple,
            };
            if !pg_sys::HeapTupleSatisfiesVisibility(&mut version, snapshot, buffer) {
                break 'check Overwrite::Elsewhere;
            }
            let desc = (*rel).rd_att;
            let data = (tuple as *mut u8).add(hoff);
            let data_len = len - hoff;
            let is_key = field_offset(desc, tuple, data_len, id_i).is_some_and(|at| {
                at + 16 <= data_len && std::slice::from_raw_parts(data.add(at), 16) == u.id
            });
            let Some(field) = field_offset(desc, tuple, data_len, used_i) else {
                break 'check Overwrite::Elsewhere;
            };
            // The data starts MAXALIGNed, so a timestamptz is 8-aligned within it.
            if !is_key || field % 8 != 0 || field + 8 > data_len {
                break 'check Overwrite::Elsewhere;
            }
            if std::ptr::read(data.add(field) as *const i64) >= u.at {
                break 'check Overwrite::NotNeeded;
            }
            // START_CRIT_SECTION: an error from here to the WAL record would be a PANIC.
            pg_sys::CritSectionCount += 1;
            // One aligned 8-byte store: a reader holding only a pin sees the old time or the
            // new one, never a mix.
            std::ptr::write_volatile(data.add(field) as *mut i64, u.at);
            pg_sys::MarkBufferDirty(buffer);
            pg_sys::XLogBeginInsert();
            let mut offnum: pg_sys::OffsetNumber = offset;
            pg_sys::XLogRegisterData(
                std::ptr::addr_of_mut!(offnum).cast(),
                std::mem::size_of::<pg_sys::OffsetNumber>() as i32,
            );
            pg_sys::XLogRegisterBuffer(0, buffer, pg_sys::REGBUF_STANDARD as u8);
            pg_sys::XLogRegisterBufData(0, data.cast(), data_len as i32);
            let lsn = pg_sys::XLogInsert(pg_sys::RmgrIds::RM_HEAP_ID as u8, XLOG_HEAP_INPLACE);
            let header = page as *mut pg_sys::PageHeaderData;
            (*header).pd_lsn.xlogid = (lsn >> 32) as u32;
            (*header).pd_lsn.xrecoff = lsn as u32;
            pg_sys::CritSectionCount -= 1;
            Overwrite::Written
        };
        pg_sys::LockBuffer(buffer, pg_sys::BUFFER_LOCK_UNLOCK as i32);
        result
    }
}

/// Writes `uses` (from [`latest_per_key`]) to `last_used_at` of `table` where verify read the
/// rows (column `id_att` must hold the key's id, `used_att` is last_used_at), in place where
/// allowed and as new row versions otherwise, never moving a time back; returns the uses it did
/// not write and that the caller's UPDATE statement must: all of them when the table is not a
/// [`plain_update_target`]. Keys whose row was deleted are
/// neither written nor returned.
///
/// # Safety
/// Inside a transaction, as a role that may update the table (the worker, or keyhippo's
/// SECURITY DEFINER function): no privilege or row level security check is made.
pub unsafe fn write(
    table: pg_sys::Oid,
    id_att: pg_sys::AttrNumber,
    used_att: pg_sys::AttrNumber,
    uses: &[Use],
) -> Vec<Use> {
    let mut rest = Vec::new();
    if uses.iter().all(|u| !u.tid.is_valid()) {
        return uses.to_vec();
    }
    unsafe {
        pg_sys::PreventCommandIfReadOnly(c"UPDATE".as_ptr());
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let rel = pg_sys::table_open(table, lock);
        let desc = (*rel).rd_att;
        let natts = (*desc).natts as usize;
        let column_is = |att: pg_sys::AttrNumber, type_oid: pg_sys::Oid| {
            att >= 1 && att as usize <= natts && {
                let a = (*desc).attrs.as_slice(natts)[att as usize - 1];
                !a.attisdropped && a.atttypid == type_oid
            }
        };
        if !plain_update_target(rel)
            || !column_is(id_att, pg_sys::UUIDOID)
            || !column_is(used_att, pg_sys::TIMESTAMPTZOID)
        {
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            return uses.to_vec();
        }
        // What the executor checks before an UPDATE of a published table.
        pg_sys::CheckCmdReplicaIdentity(rel, pg_sys::CmdType::CMD_UPDATE);

        // Rows written by earlier commands of this transaction are seen, and the snapshot is
        // taken now (READ COMMITTED: a fresh one), as for the next statement.
        pg_sys::CommandCounterIncrement();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let estate = crate::direct_insert::begin_command(&[rel], lock);
        let rri = crate::direct_insert::result_relation(estate, 0, |_| {});
        let snapshot = (*estate).es_snapshot;
        let cid = (*estate).es_output_cid;
        let per_row = (*pg_sys::MakePerTupleExprContext(estate)).ecxt_per_tuple_memory;
        let am = &*(*rel).rd_tableam;
        let fetch = am.index_fetch_begin.expect("heap access method")(rel);
        let found = pg_sys::table_slot_create(rel, &mut (*estate).es_tupleTable);
        let new = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsVirtual);
        // A tuple id beyond the end of the table is not read (the table cannot shrink while
        // this transaction holds its lock: truncation needs an exclusive one).
        let blocks = pg_sys::RelationGetNumberOfBlocksInFork(rel, pg_sys::ForkNumber::MAIN_FORKNUM);
        let has_constraints = !(*desc).constr.is_null();
        prune_previous_pages(rel, blocks);
        let mut updated_pages: Vec<u32> = Vec::new();
        let outer = pg_sys::MemoryContextSwitchTo(per_row);
        let (id_i, used_i) = (id_att as usize - 1, used_att as usize - 1);
        // The row version of `u`'s key that this snapshot sees, found from where verify read
        // it (following a HOT chain): its values, or None when the caller's statement must
        // look for it (no tuple id, moved, or the tuple id now holds another row).
        let fetch_row = |u: &Use| -> Option<(&[pg_sys::Datum], &[bool])> {
            pg_sys::MemoryContextReset(per_row);
            if !u.tid.is_valid() || u.tid.block >= blocks {
                return None;
            }
            pg_sys::ExecClearTuple(found);
            let mut tid = u.tid.item_pointer();
            let (mut call_again, mut all_dead) = (false, false);
            let visible = am.index_fetch_tuple.expect("heap access method")(
                fetch,
                &mut tid,
                snapshot,
                found,
                &mut call_again,
                &mut all_dead,
            );
            if !visible {
                return None;
            }
            pg_sys::slot_getallattrs(found);
            let values = std::slice::from_raw_parts((*found).tts_values, natts);
            let nulls = std::slice::from_raw_parts((*found).tts_isnull, natts);
            if nulls[id_i] || *values[id_i].cast_mut_ptr::<[u8; 16]>() != u.id {
                return None;
            }
            Some((values, nulls))
        };
        // The found row with last_used_at set to `at`, in the slot `new`.
        let with_use = |values: &[pg_sys::Datum], nulls: &[bool], at: i64| {
            pg_sys::ExecClearTuple(new);
            std::ptr::copy_nonoverlapping(values.as_ptr(), (*new).tts_values, natts);
            std::ptr::copy_nonoverlapping(nulls.as_ptr(), (*new).tts_isnull, natts);
            *(*new).tts_values.add(used_i) = pg_sys::Datum::from(at);
            *(*new).tts_isnull.add(used_i) = false;
            pg_sys::ExecStoreVirtualTuple(new);
        };
        // First the rows whose last_used_at is set: overwritten where they are when possible,
        // before this transaction has an id (so logical decoding skips those WAL records).
        // Then, as row updates, the rest: first uses (NULL), and rows being updated or locked.
        let mut later: Vec<Use> = Vec::new();
        let in_place = crate::usage::IN_PLACE.get() && in_place_allowed(rel, used_att);
        // The page of the last use written in place stays pinned for the next (in tuple id
        // order, uses of one page come together).
        let mut pinned: Option<(u32, pg_sys::Buffer)> = None;
        for u in uses.iter().filter(|_| in_place) {
            if !u.tid.is_valid() || u.tid.block >= blocks {
                rest.push(*u);
                continue;
            }
            let buffer = match pinned {
                Some((block, buffer)) if block == u.tid.block => buffer,
                _ => {
                    if let Some((_, buffer)) = pinned.take() {
                        pg_sys::ReleaseBuffer(buffer);
                    }
                    let buffer = read_block(rel, u.tid.block);
                    pinned = Some((u.tid.block, buffer));
                    buffer
                }
            };
            // Where verify read the row: the common case, without fetching it.
            match overwrite(rel, snapshot, buffer, u.tid.offset, u, id_i, used_i) {
                Overwrite::Written => {
                    #[cfg(any(test, feature = "pg_test"))]
                    WRITTEN_WHERE_FOUND.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    continue;
                }
                Overwrite::NotNeeded => continue,
                Overwrite::Elsewhere => {}
            }
            // Else the version this snapshot sees, at the end of the row's HOT chain (on the
            // same page), unless the row has moved or the tuple id holds another key's row.
            if fetch_row(u).is_none() {
                rest.push(*u);
                continue;
            }
            let (block, offset) = pgrx::itemptr::item_pointer_get_both((*found).tts_tid);
            if block != u.tid.block {
                later.push(*u);
                continue;
            }
            if let Overwrite::Elsewhere = overwrite(rel, snapshot, buffer, offset, u, id_i, used_i)
            {
                later.push(*u);
            }
        }
        if let Some((_, buffer)) = pinned {
            pg_sys::ReleaseBuffer(buffer);
        }
        for u in if in_place { &later[..] } else { uses } {
            let Some((values, nulls)) = fetch_row(u) else {
                rest.push(*u);
                continue;
            };
            if !nulls[used_i] && values[used_i].value() as i64 >= u.at {
                continue;
            }
            with_use(values, nulls, u.at);
            if has_constraints {
                pg_sys::ExecConstraints(rri, new, estate);
            }
            let mut failure: pg_sys::TM_FailureData = std::mem::zeroed();
            let mut lock_mode = pg_sys::LockTupleMode::LockTupleNoKeyExclusive;
            let mut update_indexes = false;
            let mut version = (*found).tts_tid;
            let result = am.tuple_update.expect("heap access method")(
                rel,
                &mut version,
                new,
                cid,
                snapshot,
                std::ptr::null_mut(),
                true,
                &mut failure,
                &mut lock_mode,
                &mut update_indexes,
            );
            match result {
                pg_sys::TM_Result::TM_Ok => {
                    if updated_pages.last() != Some(&u.tid.block) {
                        updated_pages.push(u.tid.block);
                    }
                    if update_indexes && (*rri).ri_NumIndices > 0 {
                        pg_sys::ExecInsertIndexTuples(
                            rri,
                            new,
                            estate,
                            true,
                            false,
                            std::ptr::null_mut(),
                            std::ptr::null_mut(),
                        );
                    }
                }
                // The key was deleted meanwhile: nothing to write.
                pg_sys::TM_Result::TM_Deleted => {}
                // Updated by a transaction that committed meanwhile: the statement follows the
                // row to its new version.
                _ => rest.push(*u),
            }
        }
        pg_sys::MemoryContextSwitchTo(outer);
        UPDATED_PAGES.with(|p| *p.borrow_mut() = (table, updated_pages));
        am.index_fetch_end.expect("heap access method")(fetch);
        crate::direct_insert::end_command(estate);
        pg_sys::PopActiveSnapshot();
        pg_sys::CommandCounterIncrement();
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    }
    rest
}
