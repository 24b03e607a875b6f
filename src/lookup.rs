//! The verify lookup done with two B-tree probes instead of an SPI statement.
//!
//! Executing even a cached plan costs tens of microseconds of executor start-up and shutdown;
//! verify only needs "the row of `api_key_metadata` with this prefix, and its hash". This does
//! exactly that through the access methods, under the caller's active snapshot (the same
//! snapshot a read-only SPI statement would use), with AccessShareLock held to the end of the
//! transaction as the executor would. When the extension's tables or indexes cannot be found
//! (a broken installation) it returns `Err(())` and verify raises an internal error.

use pgrx::pg_sys;
use pgrx::FromDatum;
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
}

#[derive(Clone, Copy)]
struct Rels {
    metadata: pg_sys::Oid,
    prefix_index: pg_sys::Oid,
    secrets: pg_sys::Oid,
    secrets_pkey: pg_sys::Oid,
    audit_log: pg_sys::Oid,
    /// Attribute numbers of id, user_id, scope_id, last_used_at, expires_at, is_revoked.
    metadata_atts: [i16; 6],
    /// Attribute number of key_hash.
    hash_att: i16,
    /// Whether key_hash is the second column (INCLUDE) of api_key_secrets_pkey.
    hash_in_index: bool,
}

thread_local! {
    static RELS: Cell<Option<Rels>> = const { Cell::new(None) };
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

/// The relations and attribute numbers, resolved once per backend and re-resolved when the
/// extension was dropped and created again (the metadata table's OID changes).
unsafe fn rels() -> Option<Rels> {
    unsafe {
        let (namespace, metadata) = schema_table(c"keyhippo", c"api_key_metadata")?;
        if let Some(rels) = RELS.with(Cell::get).filter(|r| r.metadata == metadata) {
            return Some(rels);
        }
        let att = |rel: pg_sys::Oid, name: &CStr| pg_sys::get_attnum(rel, name.as_ptr());
        let secrets = relid(c"api_key_secrets", namespace);
        let secrets_pkey = relid(c"api_key_secrets_pkey", namespace);
        let hash_att = att(secrets, c"key_hash");
        let rels = Rels {
            metadata,
            prefix_index: relid(c"api_key_metadata_prefix_key", namespace),
            secrets,
            secrets_pkey,
            audit_log: relid(c"audit_log", namespace),
            metadata_atts: [
                att(metadata, c"id"),
                att(metadata, c"user_id"),
                att(metadata, c"scope_id"),
                att(metadata, c"last_used_at"),
                att(metadata, c"expires_at"),
                att(metadata, c"is_revoked"),
            ],
            hash_att,
            hash_in_index: secrets_pkey != pg_sys::InvalidOid
                && hash_att > 0
                && hash_included(secrets_pkey, hash_att),
        };
        let all_found = rels.prefix_index != pg_sys::InvalidOid
            && rels.secrets != pg_sys::InvalidOid
            && rels.secrets_pkey != pg_sys::InvalidOid
            && rels.metadata_atts.iter().all(|&a| a > 0)
            && rels.hash_att > 0;
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
        let idx = pg_sys::index_open(index, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let form = (*idx).rd_index;
        let keys = (*form).indkey.values.as_slice((*form).indnatts as usize);
        let included = (*form).indnatts == 2 && keys[1] == att;
        pg_sys::index_close(idx, pg_sys::NoLock as pg_sys::LOCKMODE);
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

/// An index scan for one equality key, under the active snapshot.
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
        eq_proc: u32,
        value: pg_sys::Datum,
        want_index_tuple: bool,
    ) -> Probe {
        unsafe {
            let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
            let heap = pg_sys::table_open(table, lock);
            let idx = pg_sys::index_open(index, lock);
            let mut snapshot = pg_sys::GetActiveSnapshot();
            if snapshot.is_null() {
                snapshot = pg_sys::GetTransactionSnapshot();
            }
            let mut key: pg_sys::ScanKeyData = std::mem::zeroed();
            // The key's collation must be the index's: B-tree descends with it.
            let collation = *(*idx).rd_indcollation;
            pg_sys::ScanKeyEntryInitialize(
                &mut key,
                0,
                1,
                pg_sys::BTEqualStrategyNumber as pg_sys::StrategyNumber,
                pg_sys::InvalidOid,
                collation,
                pg_sys::Oid::from(eq_proc),
                value,
            );
            let scan = pg_sys::index_beginscan(heap, idx, snapshot, 1, 0);
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
            pg_sys::index_close(self.index, pg_sys::NoLock as pg_sys::LOCKMODE);
            pg_sys::table_close(self.heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
    }
}

/// Probes `index` of `table` for `value` (with equality function `eq_proc`) and calls `read` on
/// the first visible tuple.
unsafe fn probe<R>(
    table: pg_sys::Oid,
    index: pg_sys::Oid,
    eq_proc: u32,
    value: pg_sys::Datum,
    read: impl FnOnce(*mut pg_sys::TupleTableSlot) -> R,
) -> Option<R> {
    unsafe {
        let probe = Probe::begin(table, index, eq_proc, value, false);
        let slot = pg_sys::table_slot_create(probe.heap, std::ptr::null_mut());
        let result = if pg_sys::index_getnext_slot(
            probe.scan,
            pg_sys::ScanDirection::ForwardScanDirection,
            slot,
        ) {
            Some(read(slot))
        } else {
            None
        };
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        probe.end();
        result
    }
}

unsafe extern "C-unwind" {
    /// storage/predicate.h (not in pgrx's bindings): what an index-only scan takes on a heap
    /// page it did not read, so SERIALIZABLE transactions still see conflicts with writers.
    fn PredicateLockPage(
        relation: pg_sys::Relation,
        blkno: pg_sys::BlockNumber,
        snapshot: pg_sys::Snapshot,
    );
}

/// The key hash of key row `id`, read the way an index-only scan reads: from the primary key's
/// INCLUDE column when the visibility map says the heap page is visible to every transaction
/// (hashes are only ever inserted and deleted, so after VACUUM nearly all are), from the heap
/// row otherwise. One buffer less per verify, and at a million keys one cache-missing page less.
unsafe fn secret_hash(rels: &Rels, id: pg_sys::Datum) -> Option<String> {
    unsafe {
        let probe = Probe::begin(rels.secrets, rels.secrets_pkey, pg_sys::F_UUID_EQ, id, true);
        let mut vm_buffer: pg_sys::Buffer = pg_sys::InvalidBuffer as pg_sys::Buffer;
        let mut slot: *mut pg_sys::TupleTableSlot = std::ptr::null_mut();
        let mut found = None;
        loop {
            let tid =
                pg_sys::index_getnext_tid(probe.scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tid.is_null() {
                break;
            }
            let block = pgrx::itemptr::item_pointer_get_block_number(tid);
            let all_visible = rels.hash_in_index
                && !(*probe.scan).xs_itup.is_null()
                && pg_sys::visibilitymap_get_status(probe.heap, block, &mut vm_buffer)
                    & pg_sys::VISIBILITYMAP_ALL_VISIBLE as u8
                    != 0;
            if all_visible {
                let mut values = [pg_sys::Datum::from(0); pg_sys::INDEX_MAX_KEYS as usize];
                let mut nulls = [true; pg_sys::INDEX_MAX_KEYS as usize];
                pg_sys::index_deform_tuple(
                    (*probe.scan).xs_itup,
                    (*probe.scan).xs_itupdesc,
                    values.as_mut_ptr(),
                    nulls.as_mut_ptr(),
                );
                let snapshot = (*probe.scan).xs_snapshot;
                pg_sys::ffi::pg_guard_ffi_boundary(|| {
                    PredicateLockPage(probe.heap, block, snapshot)
                });
                found = <String as FromDatum>::from_datum(values[1], nulls[1]);
                break;
            }
            if slot.is_null() {
                slot = pg_sys::table_slot_create(probe.heap, std::ptr::null_mut());
            }
            if pg_sys::index_fetch_heap(probe.scan, slot) {
                found = attr::<String>(slot, rels.hash_att);
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
        found
    }
}

unsafe fn attr<T: FromDatum>(slot: *mut pg_sys::TupleTableSlot, att: i16) -> Option<T> {
    unsafe {
        let mut isnull = false;
        let datum = pg_sys::slot_getattr(slot, att as i32, &mut isnull);
        T::from_datum(datum, isnull)
    }
}

/// The key row with this prefix and its hash, as the active snapshot sees them; Ok(None) when
/// there is none; Err(()) when the lookup cannot be done here.
pub fn find(prefix: &str) -> Result<Option<KeyRow>, ()> {
    // SAFETY: called from a SQL function inside a transaction; every relation opened is closed
    // and every scan ended before returning; an ERROR raised inside unwinds through pgrx and
    // the transaction abort releases what was left.
    unsafe {
        let Some(rels) = rels() else { return Err(()) };
        let prefix_datum = pgrx::IntoDatum::into_datum(prefix).ok_or(())?;
        let [a_id, a_user, a_scope, a_used, a_expires, a_revoked] = rels.metadata_atts;
        let row = probe(
            rels.metadata,
            rels.prefix_index,
            pg_sys::F_TEXTEQ,
            prefix_datum,
            |slot| {
                (
                    attr::<pgrx::Uuid>(slot, a_id),
                    attr::<pgrx::Uuid>(slot, a_user),
                    attr::<pgrx::Uuid>(slot, a_scope),
                    attr::<i64>(slot, a_used),
                    attr::<i64>(slot, a_expires),
                    attr::<bool>(slot, a_revoked),
                )
            },
        );
        let Some((
            Some(id),
            Some(user_id),
            scope_id,
            last_used_at,
            Some(expires_at),
            Some(is_revoked),
        )) = row
        else {
            return Ok(None);
        };
        let id_datum = pgrx::IntoDatum::into_datum(id).ok_or(())?;
        let Some(key_hash) = secret_hash(&rels, id_datum) else {
            return Ok(None);
        };
        Ok(Some(KeyRow {
            id,
            user_id,
            scope_id,
            key_hash,
            expires_at,
            last_used_at,
            is_revoked,
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
}

thread_local! {
    static AUTH_USERS: Cell<Option<AuthUsers>> = const { Cell::new(None) };
}

/// auth.users and its primary key index, when it is a single uuid column (Supabase's shape).
unsafe fn auth_users() -> Option<AuthUsers> {
    unsafe {
        let (_, table) = schema_table(c"auth", c"users")?;
        if let Some(found) = AUTH_USERS.with(Cell::get).filter(|a| a.table == table) {
            return Some(found);
        }
        let lock = pg_sys::AccessShareLock as pg_sys::LOCKMODE;
        let heap = pg_sys::table_open(table, lock);
        let pkey = pg_sys::RelationGetPrimaryKeyIndex(heap);
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        if pkey == pg_sys::InvalidOid {
            return None;
        }
        let idx = pg_sys::index_open(pkey, lock);
        let single_uuid =
            (*(*idx).rd_index).indnatts == 1 && *(*idx).rd_opcintype == pg_sys::UUIDOID;
        pg_sys::index_close(idx, pg_sys::NoLock as pg_sys::LOCKMODE);
        if !single_uuid {
            return None;
        }
        let found = AuthUsers { table, pkey };
        AUTH_USERS.with(|a| a.set(Some(found)));
        Some(found)
    }
}

/// Whether auth.users holds `id`, by one probe of its primary key under the active snapshot.
/// None when there is no auth.users with a uuid primary key (the caller then asks SQL).
pub fn auth_user_exists(id: pgrx::Uuid) -> Option<bool> {
    // SAFETY: as for `find`.
    unsafe {
        let users = auth_users()?;
        let datum = pgrx::IntoDatum::into_datum(id)?;
        Some(probe(users.table, users.pkey, pg_sys::F_UUID_EQ, datum, |_| ()).is_some())
    }
}
