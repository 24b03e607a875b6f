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
        let rels = Rels {
            metadata,
            prefix_index: relid(c"api_key_metadata_prefix_key", namespace),
            secrets,
            secrets_pkey: relid(c"api_key_secrets_pkey", namespace),
            audit_log: relid(c"audit_log", namespace),
            metadata_atts: [
                att(metadata, c"id"),
                att(metadata, c"user_id"),
                att(metadata, c"scope_id"),
                att(metadata, c"last_used_at"),
                att(metadata, c"expires_at"),
                att(metadata, c"is_revoked"),
            ],
            hash_att: att(secrets, c"key_hash"),
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
        pg_sys::index_rescan(scan, &mut key, 1, std::ptr::null_mut(), 0);
        let slot = pg_sys::table_slot_create(heap, std::ptr::null_mut());
        let result = if pg_sys::index_getnext_slot(
            scan,
            pg_sys::ScanDirection::ForwardScanDirection,
            slot,
        ) {
            Some(read(slot))
        } else {
            None
        };
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::index_endscan(scan);
        // Locks are kept to the end of the transaction, as the executor does.
        pg_sys::index_close(idx, pg_sys::NoLock as pg_sys::LOCKMODE);
        pg_sys::table_close(heap, pg_sys::NoLock as pg_sys::LOCKMODE);
        result
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
        let hash = probe(
            rels.secrets,
            rels.secrets_pkey,
            pg_sys::F_UUID_EQ,
            id_datum,
            |slot| attr::<String>(slot, rels.hash_att),
        );
        let Some(Some(key_hash)) = hash else {
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
