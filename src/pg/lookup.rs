//! The verify lookup done with two index probes instead of an SPI statement.
//!
//! Verify only needs "the row of `api_key_metadata` with this prefix, and its hash"; even a
//! cached plan pays for executor start-up and shutdown around that. This reads exactly that
//! through the access methods, under the caller's active snapshot (the same snapshot a
//! read-only SPI statement would use), with AccessShareLock held to the end of the transaction
//! as the executor would. When the extension's tables or indexes cannot be found it returns
//! `Err(())`, and verify runs the same lookup as a prepared statement instead.
//!
//! Every call into PostgreSQL goes through pgrx's bindings (an ERROR raised inside becomes a Rust
//! panic that unwinds through this code); the calls whose signature differs between major
//! versions go through [`super::compat`]. The relations are resolved once per backend and
//! forgotten by a relation-cache invalidation callback (DROP / CREATE EXTENSION, ALTER TABLE ...).

use pgrx::pg_sys;

use std::cell::Cell;

use crate::model::KeyRow;
use std::ffi::CStr;

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
    /// Attribute numbers of id, user_id, scope_id, last_used_at, expires_at, is_revoked,
    /// disabled_at.
    metadata_atts: [i16; 7],
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
}

/// Schema invalidation (a schema renamed or dropped): forget everything resolved by name.
unsafe extern "C-unwind" fn forget_schemas(_arg: pg_sys::Datum, _cache: i32, _hash: u32) {
    RELS.with(|r| r.set(None));
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
            att(metadata, c"disabled_at"),
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

/// An index scan for one equality key, under `snapshot`.
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
            let heap = pg_sys::table_open(table, LOCK);
            let idx = pg_sys::index_open(index, LOCK);
            let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
            // The key's collation must be the index's: B-tree descends with it.
            let collation = *(*idx).rd_indcollation;
            let strategy = if (*(*idx).rd_rel).relam == pg_sys::HASH_AM_OID {
                pg_sys::HTEqualStrategyNumber
            } else {
                pg_sys::BTEqualStrategyNumber
            };
            pg_sys::ScanKeyEntryInitialize(
                &mut key,
                0,
                1,
                strategy as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                collation,
                pg_sys::Oid::from(eq_proc),
                value,
            );
            let scan = super::compat::index_beginscan(heap, idx, snapshot, 1, 0);
            (*scan).xs_want_itup = want_index_tuple;
            pg_sys::index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
            Probe {
                heap,
                index: idx,
                scan,
            }
        }
    }

    unsafe fn end(self) {
        unsafe {
            pg_sys::index_endscan(self.scan);
            // Locks are kept to the end of the transaction, as the executor does.
            pg_sys::index_close(self.index, NO_LOCK);
            pg_sys::table_close(self.heap, NO_LOCK);
        }
    }
}

/// The longest key hash verify reads; longer stored values cannot be one of keyhippo's hashes
/// (`sha256$` / `sha512$` and hex digits) and are read as "no match".
const HASH_MAX: usize = 256;

/// The lookup's result as plain values.
struct Found {
    id: [u8; 16],
    user_id: [u8; 16],
    scope_id: Option<[u8; 16]>,
    last_used_at: Option<i64>,
    expires_at: i64,
    is_revoked: bool,
    is_disabled: bool,
    hash: [u8; HASH_MAX],
    hash_len: usize,
    /// Whether the stored hash was longer than [`HASH_MAX`].
    hash_too_long: bool,
}

unsafe fn uuid_bytes(datum: pg_sys::Datum) -> [u8; 16] {
    unsafe { *(datum.cast_mut_ptr::<[u8; 16]>()) }
}

/// The key hash of key row `found.id` through the hash index on key_metadata_id: the bucket
/// page, then the row (checked to be this key's: the index returns every row whose id has the
/// same 32-bit hash code).
unsafe fn secret_hash_by_hash_index(
    rels: &Rels,
    snapshot: pg_sys::Snapshot,
    found: &mut Found,
) -> bool {
    unsafe {
        let id = found.id;
        let read = |slot: *mut pg_sys::TupleTableSlot| {
            if slot_value(slot, rels.secrets_key_att).is_none_or(|d| uuid_bytes(d) != id) {
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
/// yet.
unsafe fn slot_value(slot: *mut pg_sys::TupleTableSlot, att: i16) -> Option<pg_sys::Datum> {
    unsafe {
        if (*slot).tts_nvalid < att {
            pg_sys::slot_getsomeattrs_int(slot, att as i32);
        }
        let i = (att - 1) as usize;
        (!*(*slot).tts_isnull.add(i)).then(|| *(*slot).tts_values.add(i))
    }
}

/// Whether text datum `datum` holds exactly `bytes`.
unsafe fn text_equals(datum: pg_sys::Datum, bytes: &[u8]) -> bool {
    unsafe {
        let text = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
        let len = pgrx::varlena::varsize_any_exhdr(text);
        len == bytes.len()
            && std::slice::from_raw_parts(pgrx::varlena::vardata_any(text) as *const u8, len)
                == bytes
    }
}

/// Copies the text datum `datum` into `found.hash`.
unsafe fn copy_hash(datum: pg_sys::Datum, found: &mut Found) {
    unsafe {
        let text = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
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
unsafe fn metadata_row(
    rels: &Rels,
    snapshot: pg_sys::Snapshot,
    prefix: &[u8],
    found: &mut Found,
) -> bool {
    unsafe {
        let text = pg_sys::cstring_to_text_with_len(prefix.as_ptr().cast(), prefix.len() as i32);
        let read = |slot: *mut pg_sys::TupleTableSlot| {
            let [a_id, a_user, a_scope, a_used, a_expires, a_revoked, a_disabled] =
                rels.metadata_atts;
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
            found.is_disabled = value(a_disabled).is_some();
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
/// and calls `read` on each visible row it returns until `read` returns Some (the row is the
/// one looked for).
unsafe fn matching_row<R>(
    table: pg_sys::Oid,
    index: pg_sys::Oid,
    snapshot: pg_sys::Snapshot,
    eq_proc: u32,
    value: pg_sys::Datum,
    mut read: impl FnMut(*mut pg_sys::TupleTableSlot) -> Option<R>,
) -> Option<R> {
    unsafe {
        let probe = Probe::begin(table, index, snapshot, eq_proc, value, false);
        let slot = pg_sys::table_slot_create(probe.heap, std::ptr::null_mut());
        let mut result = None;
        while result.is_none() && pg_sys::index_getnext_slot(probe.scan, FORWARD, slot) {
            result = read(slot);
        }
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        probe.end();
        result
    }
}

/// The key hash of key row `found.id`, read the way an index-only scan reads: from the primary
/// key's INCLUDE column when the visibility map says the heap page is visible to every
/// transaction (hashes are only ever inserted and deleted, so after VACUUM nearly all are), from
/// the heap row otherwise. One buffer less per verify, and at a million keys one cache-missing
/// page less.
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
        let serializable = pg_sys::XactIsoLevel == pg_sys::XACT_SERIALIZABLE as i32;
        let mut vm_buffer: pg_sys::Buffer = pg_sys::InvalidBuffer as pg_sys::Buffer;
        let mut slot: *mut pg_sys::TupleTableSlot = std::ptr::null_mut();
        let mut got = false;
        loop {
            let tid = pg_sys::index_getnext_tid(probe.scan, FORWARD);
            if tid.is_null() {
                break;
            }
            let block = pgrx::itemptr::item_pointer_get_block_number(tid);
            // Not in SERIALIZABLE: the heap fetch takes the predicate lock that lets PostgreSQL
            // see conflicts with writers.
            let all_visible = rels.hash_in_index
                && !serializable
                && !(*probe.scan).xs_itup.is_null()
                && pg_sys::visibilitymap_get_status(probe.heap, block, &mut vm_buffer)
                    & pg_sys::VISIBILITYMAP_ALL_VISIBLE as u8
                    != 0;
            if all_visible {
                let mut values = [pg_sys::Datum::from(0); 2];
                let mut nulls = [true; 2];
                // The index has exactly two columns (checked in `rels`).
                pg_sys::index_deform_tuple(
                    (*probe.scan).xs_itup,
                    (*probe.scan).xs_itupdesc,
                    values.as_mut_ptr(),
                    nulls.as_mut_ptr(),
                );
                if !nulls[1] {
                    copy_hash(values[1], found);
                    got = true;
                }
                break;
            }
            if slot.is_null() {
                slot = pg_sys::table_slot_create(probe.heap, std::ptr::null_mut());
            }
            if pg_sys::index_fetch_heap(probe.scan, slot) {
                if let Some(hash) = slot_value(slot, rels.hash_att) {
                    copy_hash(hash, found);
                    got = true;
                }
                break;
            }
        }
        if vm_buffer != pg_sys::InvalidBuffer as pg_sys::Buffer {
            pg_sys::ReleaseBuffer(vm_buffer);
        }
        if !slot.is_null() {
            pg_sys::ExecDropSingleTupleTableSlot(slot);
        }
        probe.end();
        got
    }
}

/// The key row with this prefix and its hash, as the active snapshot sees them; Ok(None) when
/// there is none; Err(()) when the lookup cannot be done here.
pub fn find(prefix: &str) -> Result<Option<KeyRow>, ()> {
    // SAFETY: called from a SQL function inside a transaction. Every relation opened is closed
    // and every scan ended before it returns; an ERROR raised inside unwinds to the caller's
    // guard and the transaction abort releases what was left.
    unsafe {
        let Some(rels) = rels() else { return Err(()) };
        let mut found = Found {
            id: [0; 16],
            user_id: [0; 16],
            scope_id: None,
            last_used_at: None,
            expires_at: 0,
            is_revoked: false,
            is_disabled: false,
            hash: [0; HASH_MAX],
            hash_len: 0,
            hash_too_long: false,
        };
        let prefix = prefix.as_bytes();
        let snapshot = snapshot();
        let complete = metadata_row(&rels, snapshot, prefix, &mut found)
            && secret_hash(&rels, snapshot, &mut found);
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
            is_disabled: found.is_disabled,
        }))
    }
}

/// The active snapshot, or the transaction's when none is active.
unsafe fn snapshot() -> pg_sys::Snapshot {
    unsafe {
        let snapshot = pg_sys::GetActiveSnapshot();
        if snapshot.is_null() {
            pg_sys::GetTransactionSnapshot()
        } else {
            snapshot
        }
    }
}
