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

/// Inserts `rows`, in order, as one command; returns false (and writes nothing) when a table's
/// columns are not exactly the ones named.
///
/// # Safety
/// Only for keyhippo's own tables, from its SECURITY DEFINER functions (no privilege or RLS
/// check is made), inside a transaction with an active snapshot.
pub unsafe fn insert_rows(rows: &[Row<'_>]) -> bool {
    unsafe {
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

        let estate = pg_sys::CreateExecutorState();
        let mut range_table = std::ptr::null_mut();
        for &rel in &relations {
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

        // AFTER row triggers (RI checks, audit, expiry) are queued and fired at the end, as at
        // the end of a statement.
        pg_sys::AfterTriggerBeginQuery();
        for (i, (row, order)) in rows.iter().zip(&orders).enumerate() {
            let rri = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
                as *mut pg_sys::ResultRelInfo;
            (*rri).type_ = pg_sys::NodeTag::T_ResultRelInfo;
            pg_sys::ExecInitResultRelation(estate, rri, (i + 1) as pg_sys::Index);
            pg_sys::ExecOpenIndices(rri, false);
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

        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        pg_sys::ExecCloseResultRelations(estate);
        pg_sys::ExecCloseRangeTableRelations(estate);
        pg_sys::FreeExecutorState(estate);
        for rel in relations {
            pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        }
        // What was written is visible to the statements that follow in this transaction.
        pg_sys::CommandCounterIncrement();
        true
    }
}
