//! The verify lookup done with two B-tree probes instead of an SPI statement.
//!
//! Executing even a cached plan costs tens of microseconds of executor start-up and shutdown;
//! verify only needs "the row of `api_key_metadata` with this prefix, and its hash". This does
//! exactly that through the access methods, under the caller's active snapshot (the same
//! snapshot a read-only SPI statement would use), with AccessShareLock held to the end of the
//! transaction as the executor would. When the extension's tables or indexes cannot be found
//! (a broken installation) it returns `Err(())` and verify raises an internal error.
//!
//! The probes call PostgreSQL through [`raw`], inside one `pg_guard_ffi_boundary` for the whole
//! lookup rather than pgrx's guard around each of its ~30 calls (a `sigsetjmp` each, about 4,000
//! instructions per verify in all). The relations are resolved once per backend and forgotten
//! by a relation-cache invalidation callback (DROP / CREATE EXTENSION, ALTER TABLE ...).

use pgrx::pg_sys;

use crate::direct_insert::LockedRow;
use std::cell::Cell;
use std::ffi::CStr;

/// What verify needs of one key.
pub struct KeyRow {
    pub id: pgrx::Uuid,
    pub user_id: pgrx::Uuid,
    pub scope_id: Option<pgrx::Uuid>,
    pub key_hash: String,
    /// Microseconds since 2000-01-01 (TimestampTz).
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
    pub is_revoked: bool,
    /// Where the row is: the tuple id its index entries point to (the root of its HOT chain),
    /// from which the background worker finds the row to write `last_used_at` without looking
    /// the key up again.
    pub tid: crate::usage_writer::Tid,
}

#[derive(Clone, Copy)]
struct Rels {
    metadata: pg_sys::Oid,
    /// The index verify finds a prefix with: the hash index on prefix when there is one (one
    /// bucket page instead of a B-tree descent), the unique B-tree otherwise.
    prefix_index: pg_sys::Oid,
    /// The unique B-tree index on prefix (the constraint).
    prefix_unique: pg_sys::Oid,
    /// Attribute number of prefix: every row found is checked to have the prefix looked up (a
    /// hash index returns every row whose prefix has the same 32-bit hash code).
    prefix_att: i16,
    secrets: pg_sys::Oid,
    secrets_pkey: pg_sys::Oid,
    /// The hash index on api_key_secrets.key_metadata_id, when there is one: how verify finds
    /// the hash (one bucket page and the row, instead of a B-tree descent to the primary key's
    /// INCLUDE column).
    secrets_hash: pg_sys::Oid,
    /// Attribute number of key_metadata_id (rows the hash index returns are checked for it).
    secrets_key_att: i16,
    audit_log: pg_sys::Oid,
    /// Attribute numbers of id, user_id, scope_id, last_used_at, expires_at, is_revoked.
    metadata_atts: [i16; 6],
    /// The highest of them (how far a metadata row is deformed).
    metadata_last_att: i16,
    /// Attribute number of key_hash.
    hash_att: i16,
    /// Whether key_hash is the second column (INCLUDE) of api_key_secrets_pkey.
    hash_in_index: bool,
}

thread_local! {
    static RELS: Cell<Option<Rels>> = const { Cell::new(None) };
    static CALLBACKS_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// PostgreSQL functions declared without pgrx's per-call guard. Called only inside one
/// `pg_guard_ffi_boundary` that covers a whole sequence of them: an ERROR raised by any of them
/// longjmps to that boundary and continues as a Rust panic from there, so the code in between
/// must own nothing that needs dropping (plain values and raw pointers only, no allocations,
/// no borrows of Rust cells), exactly like the closure pgrx itself puts around each call.
mod raw {
    use pgrx::pg_sys::*;
    use std::ffi::{c_char, c_int};
    unsafe extern "C-unwind" {
        pub fn table_open(relation_id: Oid, lockmode: LOCKMODE) -> Relation;
        pub fn table_close(relation: Relation, lockmode: LOCKMODE);
        pub fn index_open(relation_id: Oid, lockmode: LOCKMODE) -> Relation;
        pub fn index_close(relation: Relation, lockmode: LOCKMODE);
        pub fn GetActiveSnapshot() -> Snapshot;
        pub fn GetTransactionSnapshot() -> Snapshot;
        pub fn ScanKeyEntryInitialize(
            entry: ScanKey,
            flags: c_int,
            attribute_number: AttrNumber,
            strategy: StrategyNumber,
            subtype: Oid,
            collation: Oid,
            procedure: RegProcedure,
            argument: Datum,
        );
        pub fn index_beginscan(
            heap: Relation,
            index: Relation,
            snapshot: Snapshot,
            nkeys: c_int,
            norderbys: c_int,
        ) -> IndexScanDesc;
        pub fn index_rescan(
            scan: IndexScanDesc,
            keys: ScanKey,
            nkeys: c_int,
            orderbys: ScanKey,
            norderbys: c_int,
        );
        pub fn index_getnext_tid(
            scan: IndexScanDesc,
            direction: ScanDirection::Type,
        ) -> ItemPointer;
        pub fn index_fetch_heap(scan: IndexScanDesc, slot: *mut TupleTableSlot) -> bool;
        pub fn index_endscan(scan: IndexScanDesc);
        pub fn table_slot_create(rel: Relation, reglist: *mut *mut List) -> *mut TupleTableSlot;
        pub fn ExecDropSingleTupleTableSlot(slot: *mut TupleTableSlot);
        pub fn slot_getsomeattrs_int(slot: *mut TupleTableSlot, attnum: c_int);
        pub fn visibilitymap_get_status(
            rel: Relation,
            block: BlockNumber,
            vmbuf: *mut Buffer,
        ) -> u8;
        pub fn index_deform_tuple(
            tup: IndexTuple,
            desc: TupleDesc,
            values: *mut Datum,
            isnull: *mut bool,
        );
        /// storage/predicate.h: what an index-only scan takes on a heap page it did not read,
        /// so SERIALIZABLE transactions still see conflicts with writers.
        pub fn PredicateLockPage(relation: Relation, block: BlockNumber, snapshot: Snapshot);
        pub fn ReleaseBuffer(buffer: Buffer);
        pub fn cstring_to_text_with_len(s: *const c_char, len: c_int) -> *mut text;
        pub fn pg_detoast_datum_packed(datum: *mut varlena) -> *mut varlena;
        pub fn GetCurrentCommandId(used: bool) -> CommandId;
        /// access/tableam.h's inline function, through pgrx's C shim.
        #[link_name = "table_tuple_lock__pgrx_cshim"]
        pub fn table_tuple_lock(
            rel: Relation,
            tid: ItemPointer,
            snapshot: Snapshot,
            slot: *mut TupleTableSlot,
            cid: CommandId,
            mode: LockTupleMode::Type,
            wait_policy: LockWaitPolicy::Type,
            flags: u8,
            tmfd: *mut TM_FailureData,
        ) -> TM_Result::Type;
    }
}

unsafe fn relid(name: &CStr, namespace: pg_sys::Oid) -> pg_sys::Oid {
    unsafe { pg_sys::get_relname_relid(name.as_ptr(), namespace) }
}

/// The OIDs of schema `schema` and of its table `table`, when both exist.
unsafe fn schema_table(schema: &CStr, table: &CStr) -> Option<(pg_sys::Oid, pg_sys::Oid)> {
    unsafe {
        let namespace = pg_sys::get_namespace_oid(schema.as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return None;
        }
        let table = relid(table, namespace);
        (table != pg_sys::InvalidOid).then_some((namespace, table))
    }
}

/// Relation-cache invalidation: forget what was resolved when one of those relations (or every
/// relation) is invalidated. Runs inside PostgreSQL's invalidation processing: must not fail.
unsafe extern "C-unwind" fn forget_relations(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let ours = |r: &Rels| {
        [
            r.metadata,
            r.prefix_index,
            r.prefix_unique,
            r.secrets,
            r.secrets_pkey,
            r.secrets_hash,
            r.audit_log,
        ]
        .contains(&relid)
    };
    if relid == pg_sys::InvalidOid || RELS.with(Cell::get).is_some_and(|r| ours(&r)) {
        RELS.with(|r| r.set(None));
    }
    if relid == pg_sys::InvalidOid
        || AUTH_USERS
            .with(Cell::get)
            .is_some_and(|a| a.table == relid || a.pkey == relid)
    {
        AUTH_USERS.with(|a| a.set(None));
    }
}

/// Schema invalidation (a schema renamed or dropped): forget everything resolved by name.
unsafe extern "C-unwind" fn forget_schemas(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    RELS.with(|r| r.set(None));
    AUTH_USERS.with(|a| a.set(None));
}

/// Registers the invalidation callbacks, once per backend (PostgreSQL cannot unregister them).
unsafe fn register_callbacks() {
    if CALLBACKS_REGISTERED.with(Cell::get) {
        return;
    }
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(forget_relations), pg_sys::Datum::from(0));
        pg_sys::CacheRegisterSyscacheCallback(
            pg_sys::SysCacheIdentifier::NAMESPACEOID as i32,
            Some(forget_schemas),
            pg_sys::Datum::from(0),
        );
    }
    CALLBACKS_REGISTERED.with(|c| c.set(true));
}

/// The relations and attribute numbers, resolved once per backend and again after an
/// invalidation of any of them (see [`forget_relations`]).
unsafe fn rels() -> Option<Rels> {
    if let Some(rels) = RELS.with(Cell::get) {
        return Some(rels);
    }
    unsafe {
        register_callbacks();
        let (namespace, metadata) = schema_table(c"keyhippo", c"api_key_metadata")?;
        let att = |rel: pg_sys::Oid, name: &CStr| pg_sys::get_attnum(rel, name.as_ptr());
        let secrets = relid(c"api_key_secrets", namespace);
        let secrets_pkey = relid(c"api_key_secrets_pkey", namespace);
        let secrets_hash = relid(c"api_key_secrets_key_metadata_id_hash_idx", namespace);
        let hash_att = att(secrets, c"key_hash");
        let metadata_atts = [
            att(metadata, c"id"),
            att(metadata, c"user_id"),
            att(metadata, c"scope_id"),
            att(metadata, c"last_used_at"),
            att(metadata, c"expires_at"),
            att(metadata, c"is_revoked"),
        ];
        let prefix_att = att(metadata, c"prefix");
        let prefix_unique = relid(c"api_key_metadata_prefix_key", namespace);
        let prefix_hash = relid(c"api_key_metadata_prefix_hash_idx", namespace);
        let rels = Rels {
            metadata,
            prefix_index: if prefix_hash != pg_sys::InvalidOid {
                prefix_hash
            } else {
                prefix_unique
            },
            prefix_unique,
            prefix_att,
            secrets,
            secrets_pkey,
            secrets_hash,
            secrets_key_att: att(secrets, c"key_metadata_id"),
            audit_log: relid(c"audit_log", namespace),
            metadata_atts,
            metadata_last_att: *metadata_atts.iter().max().unwrap_or(&0).max(&prefix_att),
            hash_att,
            hash_in_index: secrets_pkey != pg_sys::InvalidOid
                && hash_att > 0
                && hash_included(secrets_pkey, hash_att),
        };
        let all_found = rels.prefix_index != pg_sys::InvalidOid
            && rels.prefix_att > 0
            && rels.secrets != pg_sys::InvalidOid
            && rels.secrets_pkey != pg_sys::InvalidOid
            && rels.metadata_atts.iter().all(|&a| a > 0)
            && rels.hash_att > 0
            && rels.secrets_key_att > 0;
        if !all_found {
            return None;
        }
        RELS.with(|r| r.set(Some(rels)));
        Some(rels)
    }
}

/// Whether `index` holds exactly two columns, the second being table column `att`.
unsafe fn hash_included(index: pg_sys::Oid, att: i16) -> bool {
    unsafe {
        let idx = pg_sys::index_open(index, LOCK);
        let form = (*idx).rd_index;
        let keys = (*form).indkey.values.as_slice((*form).indnatts as usize);
        let included = (*form).indnatts == 2 && keys[1] == att;
        pg_sys::index_close(idx, NO_LOCK);
        included
    }
}

/// keyhippo.api_key_metadata, api_key_secrets and audit_log, when installed.
pub fn key_tables() -> Option<(pg_sys::Oid, pg_sys::Oid, pg_sys::Oid)> {
    // SAFETY: catalog lookups inside a transaction.
    unsafe {
        let rels = rels()?;
        (rels.audit_log != pg_sys::InvalidOid).then_some((
            rels.metadata,
            rels.secrets,
            rels.audit_log,
        ))
    }
}

/// keyhippo.api_key_metadata and the attribute numbers of its id and last_used_at, when
/// installed.
pub fn metadata_columns() -> Option<(pg_sys::Oid, pg_sys::AttrNumber, pg_sys::AttrNumber)> {
    // SAFETY: catalog lookups inside a transaction.
    unsafe {
        let rels = rels()?;
        Some((rels.metadata, rels.metadata_atts[0], rels.metadata_atts[3]))
    }
}

/// The owner of a relation, InvalidOid when it does not exist.
unsafe fn relation_owner(rel: pg_sys::Oid) -> pg_sys::Oid {
    unsafe {
        if rel == pg_sys::InvalidOid {
            return pg_sys::InvalidOid;
        }
        let relation = pg_sys::RelationIdGetRelation(rel);
        if relation.is_null() {
            return pg_sys::InvalidOid;
        }
        let owner = (*(*relation).rd_rel).relowner;
        pg_sys::RelationClose(relation);
        owner
    }
}

/// The owner of keyhippo's tables (the role that created the extension), when installed. Read
/// from the relation cache at every call, so a change of owner is followed at once.
pub fn owner() -> Option<pg_sys::Oid> {
    // SAFETY: catalog lookups inside a transaction.
    unsafe {
        let owner = relation_owner(rels()?.secrets);
        (owner != pg_sys::InvalidOid).then_some(owner)
    }
}

const LOCK: pg_sys::LOCKMODE = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
const NO_LOCK: pg_sys::LOCKMODE = pg_sys::NoLock as pg_sys::LOCKMODE;
const FORWARD: pg_sys::ScanDirection::Type = pg_sys::ScanDirection::ForwardScanDirection;

/// An index scan for one equality key, under `snapshot`. Only inside the lookup's boundary.
struct Probe {
    heap: pg_sys::Relation,
    index: pg_sys::Relation,
    scan: pg_sys::IndexScanDesc,
}

impl Probe {
    /// Opens `table` and `index` and starts a scan of `index` for `value` (with equality
    /// function `eq_proc`). `want_index_tuple` asks the index for its tuples (index-only reads).
    unsafe fn begin(
        table: pg_sys::Oid,
        index: pg_sys::Oid,
        snapshot: pg_sys::Snapshot,
        eq_proc: u32,
        value: pg_sys::Datum,
        want_index_tuple: bool,
    ) -> Probe {
        unsafe {
            let heap = raw::table_open(table, LOCK);
            let idx = raw::index_open(index, LOCK);
            let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
            // The key's collation must be the index's: B-tree descends with it.
            let collation = *(*idx).rd_indcollation;
            let strategy = if (*(*idx).rd_rel).relam == pg_sys::HASH_AM_OID {
                pg_sys::HTEqualStrategyNumber
            } else {
                pg_sys::BTEqualStrategyNumber
            };
            raw::ScanKeyEntryInitialize(
                &mut key,
                0,
                1,
                strategy as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                collation,
                pg_sys::Oid::from(eq_proc),
                value,
            );
            let scan = raw::index_beginscan(heap, idx, snapshot, 1, 0);
            (*scan).xs_want_itup = want_index_tuple;
            raw::index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
            Probe {
                heap,
                index: idx,
                scan,
            }
        }
    }

    unsafe fn end(self) {
        unsafe {
            raw::index_endscan(self.scan);
            // Locks are kept to the end of the transaction, as the executor does.
            raw::index_close(self.index, NO_LOCK);
            raw::table_close(self.heap, NO_LOCK);
        }
    }
}

/// The longest key hash verify reads; longer stored values cannot be one of keyhippo's hashes
/// (`sha256$` / `sha512$` and hex digits) and are read as "no match".
const HASH_MAX: usize = 256;

/// The lookup's result as plain values, filled inside the boundary.
struct Found {
    id: [u8; 16],
    user_id: [u8; 16],
    scope_id: Option<[u8; 16]>,
    last_used_at: Option<i64>,
    expires_at: i64,
    is_revoked: bool,
    hash: [u8; HASH_MAX],
    hash_len: usize,
    /// Whether the stored hash was longer than [`HASH_MAX`].
    hash_too_long: bool,
    tid: pg_sys::ItemPointerData,
}

unsafe fn uuid_bytes(datum: pg_sys::Datum) -> [u8; 16] {
    unsafe { *(datum.cast_mut_ptr::<[u8; 16]>()) }
}

/// The key hash of key row `found.id` through the hash index on key_metadata_id: the bucket
/// page, then the row (checked to be this key's: the index returns every row whose id has the
/// same 32-bit hash code). Only inside the lookup's boundary.
unsafe fn secret_hash_by_hash_index(
    rels: &Rels,
    snapshot: pg_sys::Snapshot,
    found: &mut Found,
) -> bool {
    unsafe {
        let id = found.id;
        let read = |_: pg_sys::Relation, slot: *mut pg_sys::TupleTableSlot, _| {
            if !slot_value(slot, rels.secrets_key_att).is_some_and(|d| uuid_bytes(d) == id) {
                return None;
            }
            Some(match slot_value(slot, rels.hash_att) {
                Some(hash) => {
                    copy_hash(hash, found);
                    true
                }
                None => false,
            })
        };
        matching_row(
            rels.secrets,
            rels.secrets_hash,
            snapshot,
            pg_sys::F_UUID_EQ,
            pg_sys::Datum::from(id.as_ptr()),
            read,
        )
        .unwrap_or(false)
    }
}

/// Column `att` of the row in `slot` (None for NULL), deforming the row that far if it is not
/// yet. Only inside a boundary.
unsafe fn slot_value(slot: *mut pg_sys::TupleTableSlot, att: i16) -> Option<pg_sys::Datum> {
    unsafe {
        if ((*slot).tts_nvalid as i16) < att {
            raw::slot_getsomeattrs_int(slot, att as i32);
        }
        let i = (att - 1) as usize;
        (!*(*slot).tts_isnull.add(i)).then(|| *(*slot).tts_values.add(i))
    }
}

/// Whether text datum `datum` holds exactly `bytes`. Only inside a boundary.
unsafe fn text_equals(datum: pg_sys::Datum, bytes: &[u8]) -> bool {
    unsafe {
        let text = raw::pg_detoast_datum_packed(datum.cast_mut_ptr());
        let len = pgrx::varlena::varsize_any_exhdr(text);
        len == bytes.len()
            && std::slice::from_raw_parts(pgrx::varlena::vardata_any(text) as *const u8, len)
                == bytes
    }
}

/// Copies the text datum `datum` into `found.hash`.
unsafe fn copy_hash(datum: pg_sys::Datum, found: &mut Found) {
    unsafe {
        let text = raw::pg_detoast_datum_packed(datum.cast_mut_ptr());
        let len = pgrx::varlena::varsize_any_exhdr(text);
        found.hash_too_long = len > HASH_MAX;
        found.hash_len = len.min(HASH_MAX);
        std::ptr::copy_nonoverlapping(
            pgrx::varlena::vardata_any(text) as *const u8,
            found.hash.as_mut_ptr(),
            found.hash_len,
        );
    }
}

/// The metadata row with this prefix (probe of its unique index, row read from the heap).
/// Only inside the lookup's boundary.
unsafe fn metadata_row(
    rels: &Rels,
    snapshot: pg_sys::Snapshot,
    prefix: &[u8],
    found: &mut Found,
) -> bool {
    unsafe {
        let text = raw::cstring_to_text_with_len(prefix.as_ptr().cast(), prefix.len() as i32);
        let read = |_: pg_sys::Relation,
                    slot: *mut pg_sys::TupleTableSlot,
                    root: pg_sys::ItemPointerData| {
            let [a_id, a_user, a_scope, a_used, a_expires, a_revoked] = rels.metadata_atts;
            // Every column read below, deformed at once.
            slot_value(slot, rels.metadata_last_att);
            let value = |att: i16| slot_value(slot, att);
            // Another prefix with the same hash code: not this key, look further.
            if !value(rels.prefix_att).is_some_and(|d| text_equals(d, prefix)) {
                return None;
            }
            let (Some(id), Some(user), Some(expires), Some(revoked)) = (
                value(a_id),
                value(a_user),
                value(a_expires),
                value(a_revoked),
            ) else {
                return Some(false);
            };
            found.id = uuid_bytes(id);
            found.user_id = uuid_bytes(user);
            found.scope_id = value(a_scope).map(|d| uuid_bytes(d));
            found.last_used_at = value(a_used).map(|d| d.value() as i64);
            found.expires_at = expires.value() as i64;
            found.is_revoked = revoked.value() != 0;
            found.tid = root;
            Some(true)
        };
        let key = pg_sys::Datum::from(text);
        matching_row(
            rels.metadata,
            rels.prefix_index,
            snapshot,
            pg_sys::F_TEXTEQ,
            key,
            read,
        )
        .unwrap_or(false)
    }
}

/// Probes `index` of `table` for `value` (with equality function `eq_proc`) under `snapshot`
/// and calls `read` (with the table, and the tuple id the index gave: the root of the row's
/// HOT chain) on each visible row it returns until `read` returns Some (the row is the one
/// looked for). Only inside a boundary, with a `read` that owns nothing needing a drop.
unsafe fn matching_row<R>(
    table: pg_sys::Oid,
    index: pg_sys::Oid,
    snapshot: pg_sys::Snapshot,
    eq_proc: u32,
    value: pg_sys::Datum,
    mut read: impl FnMut(
        pg_sys::Relation,
        *mut pg_sys::TupleTableSlot,
        pg_sys::ItemPointerData,
    ) -> Option<R>,
) -> Option<R> {
    unsafe {
        let probe = Probe::begin(table, index, snapshot, eq_proc, value, false);
        let slot = raw::table_slot_create(probe.heap, std::ptr::null_mut());
        let mut result = None;
        let mut root = pg_sys::ItemPointerData::default();
        // index_getnext_slot's loop, keeping the index's tuple id (the fetch replaces the
        // scan's copy with the id of the version it finds).
        while result.is_none() {
            if !(*probe.scan).xs_heap_continue {
                let tid = raw::index_getnext_tid(probe.scan, FORWARD);
                if tid.is_null() {
                    break;
                }
                root = *tid;
            }
            if raw::index_fetch_heap(probe.scan, slot) {
                result = read(probe.heap, slot, root);
            }
        }
        raw::ExecDropSingleTupleTableSlot(slot);
        probe.end();
        result
    }
}

/// The key hash of key row `found.id`, read the way an index-only scan reads: from the primary
/// key's INCLUDE column when the visibility map says the heap page is visible to every
/// transaction (hashes are only ever inserted and deleted, so after VACUUM nearly all are), from
/// the heap row otherwise. One buffer less per verify, and at a million keys one cache-missing
/// page less. Only inside the lookup's boundary.
unsafe fn secret_hash(rels: &Rels, snapshot: pg_sys::Snapshot, found: &mut Found) -> bool {
    unsafe {
        let id = found.id;
        if rels.secrets_hash != pg_sys::InvalidOid {
            return secret_hash_by_hash_index(rels, snapshot, found);
        }
        let probe = Probe::begin(
            rels.secrets,
            rels.secrets_pkey,
            snapshot,
            pg_sys::F_UUID_EQ,
            pg_sys::Datum::from(id.as_ptr()),
            true,
        );
        let mut vm_buffer: pg_sys::Buffer = pg_sys::InvalidBuffer as pg_sys::Buffer;
        let mut slot: *mut pg_sys::TupleTableSlot = std::ptr::null_mut();
        let mut got = false;
        loop {
            let tid = raw::index_getnext_tid(probe.scan, FORWARD);
            if tid.is_null() {
                break;
            }
            let block = pgrx::itemptr::item_pointer_get_block_number(tid);
            let all_visible = rels.hash_in_index
                && !(*probe.scan).xs_itup.is_null()
                && raw::visibilitymap_get_status(probe.heap, block, &mut vm_buffer)
                    & pg_sys::VISIBILITYMAP_ALL_VISIBLE as u8
                    != 0;
            if all_visible {
                let mut values = [pg_sys::Datum::from(0); 2];
                let mut nulls = [true; 2];
                // The index has exactly two columns (checked in `rels`).
                raw::index_deform_tuple(
                    (*probe.scan).xs_itup,
                    (*probe.scan).xs_itupdesc,
                    values.as_mut_ptr(),
                    nulls.as_mut_ptr(),
                );
                raw::PredicateLockPage(probe.heap, block, (*probe.scan).xs_snapshot);
                if !nulls[1] {
                    copy_hash(values[1], found);
                    got = true;
                }
                break;
            }
            if slot.is_null() {
                slot = raw::table_slot_create(probe.heap, std::ptr::null_mut());
            }
            if raw::index_fetch_heap(probe.scan, slot) {
                if let Some(hash) = slot_value(slot, rels.hash_att) {
                    copy_hash(hash, found);
                    got = true;
                }
                break;
            }
        }
        if vm_buffer != pg_sys::InvalidBuffer as pg_sys::Buffer {
            raw::ReleaseBuffer(vm_buffer);
        }
        if !slot.is_null() {
            raw::ExecDropSingleTupleTableSlot(slot);
        }
        probe.end();
        got
    }
}

/// The key row with this prefix and its hash, as the active snapshot sees them; Ok(None) when
/// there is none; Err(()) when the lookup cannot be done here.
pub fn find(prefix: &str) -> Result<Option<KeyRow>, ()> {
    // SAFETY: called from a SQL function inside a transaction. Everything between the boundary's
    // start and end is plain values and raw pointers (see `raw`); every relation opened is closed
    // and every scan ended before it returns; an ERROR raised inside becomes a panic at the
    // boundary and the transaction abort releases what was left.
    unsafe {
        let Some(rels) = rels() else { return Err(()) };
        let mut found = Found {
            id: [0; 16],
            user_id: [0; 16],
            scope_id: None,
            last_used_at: None,
            expires_at: 0,
            is_revoked: false,
            hash: [0; HASH_MAX],
            hash_len: 0,
            hash_too_long: false,
            tid: pg_sys::ItemPointerData::default(),
        };
        let prefix = prefix.as_bytes();
        let complete = pg_sys::ffi::pg_guard_ffi_boundary(|| {
            let snapshot = snapshot();
            metadata_row(&rels, snapshot, prefix, &mut found)
                && secret_hash(&rels, snapshot, &mut found)
        });
        if !complete {
            return Ok(None);
        }
        // A hash that is too long or not UTF-8 cannot match: read as an empty one.
        let key_hash = match std::str::from_utf8(&found.hash[..found.hash_len]) {
            Ok(hash) if !found.hash_too_long => hash.to_owned(),
            _ => String::new(),
        };
        Ok(Some(KeyRow {
            id: pgrx::Uuid::from_bytes(found.id),
            user_id: pgrx::Uuid::from_bytes(found.user_id),
            scope_id: found.scope_id.map(pgrx::Uuid::from_bytes),
            key_hash,
            expires_at: found.expires_at,
            last_used_at: found.last_used_at,
            is_revoked: found.is_revoked,
            tid: crate::usage_writer::Tid::from(found.tid),
        }))
    }
}

/// The transaction's start time (what `now()` returns), as TimestampTz microseconds.
pub fn now() -> i64 {
    // SAFETY: plain read of transaction state.
    unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }
}

#[derive(Clone, Copy)]
struct AuthUsers {
    table: pg_sys::Oid,
    pkey: pg_sys::Oid,
    /// The primary key's column.
    column: pg_sys::AttrNumber,
}

thread_local! {
    static AUTH_USERS: Cell<Option<AuthUsers>> = const { Cell::new(None) };
}

/// auth.users and its primary key index, when it is a single uuid column (Supabase's shape).
/// Resolved once per backend and again after an invalidation (see [`forget_relations`]).
unsafe fn auth_users() -> Option<AuthUsers> {
    if let Some(found) = AUTH_USERS.with(Cell::get) {
        return Some(found);
    }
    unsafe {
        register_callbacks();
        let (_, table) = schema_table(c"auth", c"users")?;
        let heap = pg_sys::table_open(table, LOCK);
        let pkey = pg_sys::RelationGetPrimaryKeyIndex(heap);
        pg_sys::table_close(heap, NO_LOCK);
        if pkey == pg_sys::InvalidOid {
            return None;
        }
        let idx = pg_sys::index_open(pkey, LOCK);
        let single_uuid =
            (*(*idx).rd_index).indnatts == 1 && *(*idx).rd_opcintype == pg_sys::UUIDOID;
        let column = (*(*idx).rd_index).indkey.values.as_slice(1)[0];
        pg_sys::index_close(idx, NO_LOCK);
        if !single_uuid || column <= 0 {
            return None;
        }
        let found = AuthUsers {
            table,
            pkey,
            column,
        };
        AUTH_USERS.with(|a| a.set(Some(found)));
        Some(found)
    }
}

/// The active snapshot, or the transaction's when none is active. Only inside a boundary.
unsafe fn snapshot() -> pg_sys::Snapshot {
    unsafe {
        let snapshot = raw::GetActiveSnapshot();
        if snapshot.is_null() {
            raw::GetTransactionSnapshot()
        } else {
            snapshot
        }
    }
}

/// What [`lock_auth_user`] found.
pub enum UserRow {
    /// The user exists, and this transaction holds a FOR KEY SHARE lock on its row until it
    /// ends: a concurrent DELETE waits for it (and then cascades to the keys it wrote).
    Locked(LockedRow),
    /// No such user, or deleted by a transaction that committed meanwhile.
    Missing,
    /// Deleted (or its id changed) by a concurrent transaction that this REPEATABLE READ or
    /// SERIALIZABLE transaction cannot see.
    Conflict,
    /// A lock result PostgreSQL's own check would not expect either.
    Unexpected(u32),
}

/// Finds user `id` in auth.users and locks its row FOR KEY SHARE: the check PostgreSQL's
/// foreign key trigger from api_key_metadata.user_id makes (`SELECT 1 FROM auth.users WHERE id
/// = $1 FOR KEY SHARE`), by one index probe and `table_tuple_lock`, as `ExecLockRows` locks
/// the row: in READ COMMITTED it follows a concurrent update to the row's latest version and a
/// concurrent delete means no user; in REPEATABLE READ and SERIALIZABLE either is a
/// serialization failure. Waits for a transaction that is deleting the row. None when there is
/// no auth.users with a uuid primary key.
pub fn lock_auth_user(id: pgrx::Uuid) -> Option<UserRow> {
    // SAFETY: as for `find`: plain values only inside the boundary.
    unsafe {
        let users = auth_users()?;
        let bytes = *id.as_bytes();
        let key = pg_sys::Datum::from(bytes.as_ptr());
        Some(pg_sys::ffi::pg_guard_ffi_boundary(|| {
            let snapshot = snapshot();
            matching_row(
                users.table,
                users.pkey,
                snapshot,
                pg_sys::F_UUID_EQ,
                key,
                |heap, slot, _| Some(lock_row(heap, slot, snapshot, users, &bytes)),
            )
            .unwrap_or(UserRow::Missing)
        }))
    }
}

/// Locks the row in `slot` FOR KEY SHARE. Only inside a boundary.
#[allow(non_upper_case_globals)] // PostgreSQL's TM_Result names
unsafe fn lock_row(
    heap: pg_sys::Relation,
    slot: *mut pg_sys::TupleTableSlot,
    snapshot: pg_sys::Snapshot,
    users: AuthUsers,
    id: &[u8; 16],
) -> UserRow {
    use pg_sys::TM_Result::*;
    unsafe {
        let mut tid = (*slot).tts_tid;
        let xact_snapshot = pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32;
        let flags = if xact_snapshot {
            0
        } else {
            pg_sys::TUPLE_LOCK_FLAG_FIND_LAST_VERSION as u8
        };
        let mut failure: pg_sys::TM_FailureData = std::mem::zeroed();
        let result = raw::table_tuple_lock(
            heap,
            &mut tid,
            snapshot,
            slot,
            raw::GetCurrentCommandId(true),
            pg_sys::LockTupleMode::LockTupleKeyShare,
            pg_sys::LockWaitPolicy::LockWaitBlock,
            flags,
            &mut failure,
        );
        let locked = UserRow::Locked(LockedRow {
            table: users.table,
            column: users.column,
        });
        match result {
            TM_Ok if !failure.traversed => locked,
            // A newer version (READ COMMITTED): still this user only if the id is unchanged,
            // the recheck ExecLockRows makes.
            TM_Ok => {
                if slot_value(slot, users.column).is_some_and(|d| uuid_bytes(d) == *id) {
                    locked
                } else {
                    UserRow::Missing
                }
            }
            // Deleted by this transaction after the snapshot was taken, or by another
            // that committed (READ COMMITTED): no such user now.
            TM_SelfModified => UserRow::Missing,
            TM_Deleted if !xact_snapshot => UserRow::Missing,
            TM_Deleted | TM_Updated => UserRow::Conflict,
            other => UserRow::Unexpected(other),
        }
    }
}
