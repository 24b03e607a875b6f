//! Row triggers written against the V1 calling convention, seen through a safe view: the event,
//! the table, and the old and new rows with typed column access.

use pgrx::pg_sys;
use serde_json::Value;
use std::ffi::CStr;
use std::marker::PhantomData;

use crate::error::{or_raise, KeyhippoError, Result};

/// What fired a row trigger.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Event {
    Insert,
    Update,
    Delete,
    /// TRUNCATE (never fired FOR EACH ROW).
    Other,
}

impl Event {
    pub fn name(self) -> &'static str {
        match self {
            Event::Insert => "INSERT",
            Event::Update => "UPDATE",
            Event::Delete => "DELETE",
            Event::Other => "TRUNCATE",
        }
    }
}

/// The call of a FOR EACH ROW trigger function, for the length of the call.
pub struct RowTrigger<'call> {
    td: *mut pg_sys::TriggerData,
    call: PhantomData<&'call pg_sys::FunctionCallInfoBaseData>,
}

/// One row a trigger sees (OLD or NEW).
pub struct Row<'call> {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    relid: pg_sys::Oid,
    call: PhantomData<&'call pg_sys::FunctionCallInfoBaseData>,
}

impl<'call> RowTrigger<'call> {
    /// The trigger data of a call of trigger function `name`; raises 22023 unless it is called
    /// by the trigger manager as a FOR EACH ROW trigger.
    ///
    /// # Safety
    /// `fcinfo` must be the V1 call information of the running trigger function.
    pub unsafe fn from_call(fcinfo: pg_sys::FunctionCallInfo, name: &str) -> RowTrigger<'call> {
        unsafe {
            let td = (*fcinfo).context as *mut pg_sys::TriggerData;
            if td.is_null()
                || (*td).type_ != pg_sys::NodeTag::T_TriggerData
                || (*td).tg_event & pg_sys::TRIGGER_EVENT_ROW == 0
            {
                or_raise::<()>(Err(KeyhippoError::InvalidArgument(format!(
                    "keyhippo: {name} must be called as a FOR EACH ROW trigger"
                ))));
            }
            RowTrigger {
                td,
                call: PhantomData,
            }
        }
    }

    pub fn event(&self) -> Event {
        // SAFETY: trigger data of the running call (see `from_call`).
        match unsafe { (*self.td).tg_event } & pg_sys::TRIGGER_EVENT_OPMASK {
            pg_sys::TRIGGER_EVENT_INSERT => Event::Insert,
            pg_sys::TRIGGER_EVENT_UPDATE => Event::Update,
            pg_sys::TRIGGER_EVENT_DELETE => Event::Delete,
            _ => Event::Other,
        }
    }

    /// The name of the table the trigger fired on.
    pub fn table(&self) -> String {
        // SAFETY: the relation of the running call, open for its length.
        unsafe {
            let rel = (*self.td).tg_relation;
            CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr())
                .to_string_lossy()
                .into_owned()
        }
    }

    fn row(&self, tuple: pg_sys::HeapTuple) -> Row<'call> {
        // SAFETY: the relation of the running call, open for its length.
        let (desc, relid) = unsafe {
            let rel = (*self.td).tg_relation;
            ((*rel).rd_att, (*rel).rd_id)
        };
        Row {
            tuple,
            desc,
            relid,
            call: PhantomData,
        }
    }

    /// The row before the change (UPDATE, DELETE).
    pub fn old_row(&self) -> Option<Row<'call>> {
        // SAFETY: trigger data of the running call.
        let tuple = unsafe { (*self.td).tg_trigtuple };
        matches!(self.event(), Event::Update | Event::Delete).then(|| self.row(tuple))
    }

    /// The row after the change (INSERT, UPDATE).
    pub fn new_row(&self) -> Option<Row<'call>> {
        // SAFETY: trigger data of the running call.
        let tuple = unsafe {
            match self.event() {
                Event::Insert => (*self.td).tg_trigtuple,
                _ => (*self.td).tg_newtuple,
            }
        };
        matches!(self.event(), Event::Insert | Event::Update).then(|| self.row(tuple))
    }
}

impl Row<'_> {
    /// Column `name`'s value; None when it is NULL or there is no such column.
    pub fn get<T: pgrx::FromDatum>(&self, name: &CStr) -> Option<T> {
        // SAFETY: a row of the relation `desc` describes, alive for the trigger call.
        unsafe {
            let att = pg_sys::get_attnum(self.relid, name.as_ptr());
            if att <= 0 {
                return None;
            }
            let mut isnull = false;
            let datum = pg_sys::heap_getattr(self.tuple, att as i32, self.desc, &mut isnull);
            T::from_datum(datum, isnull)
        }
    }

    /// The row as JSON, column names as keys, values as `to_jsonb` renders them.
    pub fn json(&self) -> Result<Value> {
        // SAFETY: as in `get`.
        unsafe { row_json(self.tuple, self.desc) }
    }

    /// Whether `other` (another version of this row) has the same stored value in every column
    /// but `column`.
    pub fn same_except(&self, other: &Row<'_>, column: &CStr) -> bool {
        // SAFETY: both rows of the same relation, alive for the trigger call.
        unsafe { same_except(self.tuple, other.tuple, self.desc, column) }
    }
}

/// A row as JSON, column names as keys, values as `to_jsonb` renders them.
unsafe fn row_json(tuple: pg_sys::HeapTuple, desc: pg_sys::TupleDesc) -> Result<Value> {
    unsafe {
        let record = pg_sys::heap_copy_tuple_as_datum(tuple, desc);
        let json =
            pgrx::fcinfo::direct_function_call_as_datum(pg_sys::row_to_json, &[Some(record)]);
        let text = json
            .and_then(|json| <&str as pgrx::FromDatum>::from_datum(json, false))
            .unwrap_or("null");
        serde_json::from_str(text)
            .map_err(|e| KeyhippoError::Internal(format!("keyhippo: audit row: {e}")))
    }
}

/// Whether two versions of a row have the same stored value in every column but `column`. Binary comparison: a value rewritten to an equal one with another
/// representation counts as different (the caller then compares the rows' JSON).
///
/// # Safety
/// Both tuples must be rows of a relation described by `desc`.
unsafe fn same_except(
    old: pg_sys::HeapTuple,
    new: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    column: &CStr,
) -> bool {
    unsafe {
        let natts = (*desc).natts as usize;
        (0..natts)
            .map(|i| (i, super::compat::attr(desc, i)))
            .all(|(i, a)| {
                if a.attisdropped || CStr::from_ptr(a.attname.data.as_ptr()) == column {
                    return true;
                }
                let (mut old_null, mut new_null) = (false, false);
                let attnum = (i + 1) as i32;
                let o = pg_sys::heap_getattr(old, attnum, desc, &mut old_null);
                let n = pg_sys::heap_getattr(new, attnum, desc, &mut new_null);
                old_null == new_null && (old_null || same_bytes(o, n, a.attbyval, a.attlen))
            })
    }
}

/// Whether two values of one type have the same stored bytes (what `datumIsEqual` compares):
/// by-value types compare their datums, others their bytes as stored (a varlena with its header,
/// a cstring with its terminator).
///
/// # Safety
/// Both datums of the type described by `by_val` and `len`.
unsafe fn same_bytes(a: pg_sys::Datum, b: pg_sys::Datum, by_val: bool, len: i16) -> bool {
    unsafe {
        if by_val {
            return a == b;
        }
        let size = |d: pg_sys::Datum| -> usize {
            match len {
                n if n > 0 => n as usize,
                -1 => pgrx::varlena::varsize_any(d.cast_mut_ptr()),
                _ => std::ffi::CStr::from_ptr(d.cast_mut_ptr()).count_bytes() + 1,
            }
        };
        let (size_a, size_b) = (size(a), size(b));
        size_a == size_b
            && std::slice::from_raw_parts(a.cast_mut_ptr::<u8>(), size_a)
                == std::slice::from_raw_parts(b.cast_mut_ptr::<u8>(), size_b)
    }
}
