//! Inserting a new key's rows without planning and starting a statement for them.
//!
//! `create_api_key` writes three rows (the key, its hash, its audit row). As one SQL statement
//! that cost about as much in executor start-up, projection and shutdown as in the inserts
//! themselves. This inserts the rows the way PostgreSQL's logical replication apply worker does
//! (`ExecSimpleRelationInsert`, executor/execReplication.c): constraints are checked, every
//! index is maintained, BEFORE and AFTER row triggers fire — the foreign keys to `auth.users`
//! and from the hash to its key row are checked by PostgreSQL's own RI triggers at the end,
//! like at the end of a statement, and the audit and expiry triggers run as for any insert.
//!
//! What it does not do is what a statement of the table owner would not do either: privilege
//! checks and row level security (the caller is keyhippo's SECURITY DEFINER functions, running
//! as the owner of these tables). Every column is given a value; when a table does not have
//! exactly the columns named (someone altered it), nothing is written and the caller falls back
//! to its SQL statement.

use pgrx::pg_sys;
use std::ffi::CStr;

/// One row: the table and a value (None for NULL) for each of its columns, by name.
pub struct Row<'a> {
    pub table: pg_sys::Oid,
    pub values: &'a [(&'a CStr, Option<pg_sys::Datum>)],
    /// Foreign keys of this row that hold by construction: the referenced row is one of the
    /// rows written before it in the same call.
    pub references: &'a [Reference<'a>],
}

/// "`column` of this row holds the key of `parent`": a foreign key from that column to that
/// key holds by construction, so PostgreSQL's check of it (a statement that looks the parent
/// row up and locks it FOR KEY SHARE) is not queued for this row. Only single-column foreign
/// keys from exactly `column` to exactly the parent's column; every other foreign key and
/// trigger of the table fires as usual, and the parent table's own triggers (ON DELETE
/// CASCADE) are untouched, so deleting the parent later still reaches this row.
pub struct Reference<'a> {
    pub column: &'a CStr,
    pub parent: Parent<'a>,
}

pub enum Parent<'a> {
    /// Row `row` of the same call (written before this one), whose `column` has this row's
    /// value: this transaction has just inserted it, and no other can see or delete it.
    Earlier { row: usize, column: &'a CStr },
    /// The row of another table whose key column has this row's value, which this transaction
    /// has found and locked FOR KEY SHARE, as the check would have.
    Locked(LockedRow),
}

/// A row this transaction holds FOR KEY SHARE (see `lookup::lock_auth_user`): its table and
/// the key column (an attribute number) it was found by.
#[derive(Clone, Copy)]
pub struct LockedRow {
    pub table: pg_sys::Oid,
    pub column: pg_sys::AttrNumber,
}

/// The attribute number of every column of `desc` in `values` order, when the table's live
/// columns are exactly the named ones.
unsafe fn column_order(
    desc: pg_sys::TupleDesc,
    values: &[(&CStr, Option<pg_sys::Datum>)],
) -> Option<Vec<usize>> {
    unsafe {
        let natts = (*desc).natts as usize;
        let attrs = (*desc).attrs.as_slice(natts);
        let live = attrs.iter().filter(|a| !a.attisdropped).count();
        if live != values.len() {
            return None;
        }
        values
            .iter()
            .map(|(name, _)| {
                attrs.iter().position(|a| {
                    !a.attisdropped && CStr::from_ptr(a.attname.data.as_ptr()) == *name
                })
            })
            .collect()
    }
}

/// The attribute number (from 1) of live column `name` of `desc`.
unsafe fn attnum(desc: pg_sys::TupleDesc, name: &CStr) -> Option<pg_sys::AttrNumber> {
    unsafe {
        let attrs = (*desc).attrs.as_slice((*desc).natts as usize);
        attrs
            .iter()
            .position(|a| !a.attisdropped && CStr::from_ptr(a.attname.data.as_ptr()) == name)
            .map(|i| (i + 1) as pg_sys::AttrNumber)
    }
}

/// Removes from `rri`'s triggers (its own copy of the table's) the foreign key checks that
/// `reference` makes unnecessary: the RI_FKey_check_ins triggers of single-column foreign keys
/// from exactly that column to exactly that column of the parent's table. Anything that does
/// not match exactly keeps its check, and so does everything when a BEFORE ROW INSERT trigger
/// of this table (or of the earlier row's) could change the values the reference is about.
unsafe fn skip_checks_done(
    rri: *mut pg_sys::ResultRelInfo,
    rel: pg_sys::Relation,
    relations: &[pg_sys::Relation],
    reference: &Reference<'_>,
) {
    unsafe {
        let triggers = (*rri).ri_TrigDesc;
        let rewrites =
            |desc: *mut pg_sys::TriggerDesc| !desc.is_null() && (*desc).trig_insert_before_row;
        if rewrites(triggers) {
            return;
        }
        let (parent, parent_column) = match reference.parent {
            Parent::Earlier { row, column } if row < relations.len() => {
                let parent = relations[row];
                if rewrites((*parent).trigdesc) {
                    return;
                }
                ((*parent).rd_id, attnum((*parent).rd_att, column))
            }
            Parent::Earlier { .. } => return,
            Parent::Locked(row) => (row.table, Some(row.column)),
        };
        let (Some(column), Some(parent_column)) =
            (attnum((*rel).rd_att, reference.column), parent_column)
        else {
            return;
        };
        if triggers.is_null() {
            return;
        }
        // The table's foreign keys, from the relcache (no catalog read after the first).
        let fkeys = pg_sys::RelationGetFKeyList(rel);
        let mut satisfied = Vec::new();
        if !fkeys.is_null() {
            for i in 0..(*fkeys).length as usize {
                let fk =
                    (*(*fkeys).elements.add(i)).ptr_value as *const pg_sys::ForeignKeyCacheInfo;
                if (*fk).confrelid == parent
                    && (*fk).nkeys == 1
                    && (*fk).conkey[0] == column
                    && (*fk).confkey[0] == parent_column
                {
                    satisfied.push((*fk).conoid);
                }
            }
        }
        if satisfied.is_empty() {
            return;
        }
        let n = (*triggers).numtriggers as usize;
        let all = std::slice::from_raw_parts_mut((*triggers).triggers, n);
        let mut kept = 0;
        for i in 0..n {
            let t = all[i];
            if t.tgfoid == pg_sys::Oid::from(pg_sys::F_RI_FKEY_CHECK_INS)
                && satisfied.contains(&t.tgconstraint)
            {
                continue;
            }
            all[kept] = t;
            kept += 1;
        }
        (*triggers).numtriggers = kept as i32;
        // Whether an AFTER ROW INSERT trigger is left (the flag the executor reads).
        let row_insert = (pg_sys::TRIGGER_TYPE_ROW | pg_sys::TRIGGER_TYPE_INSERT) as i16;
        let not_after = (pg_sys::TRIGGER_TYPE_BEFORE | pg_sys::TRIGGER_TYPE_INSTEAD) as i16;
        (*triggers).trig_insert_after_row = all[..kept]
            .iter()
            .any(|t| t.tgtype & row_insert == row_insert && t.tgtype & not_after == 0);
    }
}

/// Inserts `rows`, in order, as one command; returns false (and writes nothing) when a table's
/// columns are not exactly the ones named.
///
/// # Safety
/// Only for keyhippo's own tables, from its SECURITY DEFINER functions (no privilege or RLS
/// check is made), inside a transaction with an active snapshot.
pub unsafe fn insert_rows(rows: &[Row<'_>]) -> bool {
    unsafe {
        // What the executor checks before an INSERT (ExecCheckXactReadOnly, and the standby's
        // refusal to assign a transaction id), as the same clean 25006 error.
        pg_sys::PreventCommandIfReadOnly(c"INSERT".as_ptr());
        pg_sys::PreventCommandDuringRecovery(c"INSERT".as_ptr());
        let lock = pg_sys::RowExclusiveLock as pg_sys::LOCKMODE;
        let mut relations = Vec::with_capacity(rows.len());
        let mut orders = Vec::with_capacity(rows.len());
        for row in rows {
            let rel = pg_sys::table_open(row.table, lock);
            relations.push(rel);
            match column_order((*rel).rd_att, row.values) {
                Some(order) => orders.push(order),
                None => {
                    for rel in relations {
                        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
                    }
                    return false;
                }
            }
        }

        let estate = begin_command(&relations, lock);

        // AFTER row triggers (RI checks, audit, expiry) are queued and fired at the end, as at
        // the end of a statement.
        pg_sys::AfterTriggerBeginQuery();
        for (i, (row, order)) in rows.iter().zip(&orders).enumerate() {
            let rri = result_relation(estate, i, |rri| {
                for reference in row.references {
                    // Earlier rows only: relations[..i].
                    skip_checks_done(rri, relations[i], &relations[..i], reference);
                }
            });
            let slot = pg_sys::table_slot_create(relations[i], &mut (*estate).es_tupleTable);
            pg_sys::ExecClearTuple(slot);
            let natts = (*(*slot).tts_tupleDescriptor).natts as usize;
            let values = std::slice::from_raw_parts_mut((*slot).tts_values, natts);
            let nulls = std::slice::from_raw_parts_mut((*slot).tts_isnull, natts);
            nulls.fill(true);
            for (&(_, value), &att) in row.values.iter().zip(order) {
                if let Some(datum) = value {
                    values[att] = datum;
                    nulls[att] = false;
                }
            }
            pg_sys::ExecStoreVirtualTuple(slot);
            pg_sys::ExecSimpleRelationInsert(rri, estate, slot);
        }
        pg_sys::AfterTriggerEndQuery(estate);
        end_command(estate);
        for rel in relations {
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
        // What was written is visible to the statements that follow in this transaction.
        pg_sys::CommandCounterIncrement();
        true
    }
}

/// The executor state of one command writing `relations` (opened with `lock`), as
/// ExecInitModifyTable would set it up: their range table, the command id, the active snapshot.
///
/// # Safety
/// Inside a transaction with an active snapshot; end with [`end_command`].
pub unsafe fn begin_command(
    relations: &[pg_sys::Relation],
    lock: pg_sys::LOCKMODE,
) -> *mut pg_sys::EState {
    unsafe {
        let estate = pg_sys::CreateExecutorState();
        let mut range_table = std::ptr::null_mut();
        for &rel in relations {
            let rte = pg_sys::palloc0(std::mem::size_of::<pg_sys::RangeTblEntry>())
                as *mut pg_sys::RangeTblEntry;
            (*rte).type_ = pg_sys::NodeTag::T_RangeTblEntry;
            (*rte).rtekind = pg_sys::RTEKind::RTE_RELATION;
            (*rte).relid = (*rel).rd_id;
            (*rte).relkind = (*(*rel).rd_rel).relkind;
            (*rte).rellockmode = lock;
            range_table = pg_sys::lappend(range_table, rte.cast());
        }
        pg_sys::ExecInitRangeTable(estate, range_table);
        (*estate).es_output_cid = pg_sys::GetCurrentCommandId(true);
        (*estate).es_snapshot = pg_sys::GetActiveSnapshot();
        estate
    }
}

/// The result relation of the command's `index`-th relation, with its indexes open;
/// `adjust` may edit it (its trigger list is its own copy) before the indexes are opened.
///
/// # Safety
/// `estate` from [`begin_command`], `index` within its relations.
pub unsafe fn result_relation(
    estate: *mut pg_sys::EState,
    index: usize,
    adjust: impl FnOnce(*mut pg_sys::ResultRelInfo),
) -> *mut pg_sys::ResultRelInfo {
    unsafe {
        let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            as *mut pg_sys::ResultRelInfo;
        (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
        pg_sys::ExecInitResultRelation(estate, rri, (index + 1) as pg_sys::Index);
        adjust(rri);
        pg_sys::ExecOpenIndices(rri, false);
        rri
    }
}

/// Releases what [`begin_command`] and [`result_relation`] set up (slots, indexes, the
/// executor state); the relations themselves stay open.
///
/// # Safety
/// `estate` from [`begin_command`].
pub unsafe fn end_command(estate: *mut pg_sys::EState) {
    unsafe {
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        pg_sys::ExecCloseResultRelations(estate);
        pg_sys::ExecCloseRangeTableRelations(estate);
        pg_sys::FreeExecutorState(estate);
    }
}
