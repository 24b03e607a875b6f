//! Which keyhippo function caused a change, for the audit log.
//!
//! The Rust functions mark themselves with [`function_scope`] while they run; the audit trigger
//! (sql/audit.sql) asks `keyhippo_internal.calling_function()`. SQL functions say the same with
//! a `SET keyhippo_audit.function_name = '...'` clause, which the trigger reads as a fallback.

use std::cell::Cell;

thread_local! {
    static CURRENT: Cell<Option<&'static str>> = const { Cell::new(None) };
    /// The id of a key row whose INSERT audit row its creator writes itself (see [`self_audited`]).
    static SELF_AUDITED: Cell<Option<[u8; 16]>> = const { Cell::new(None) };
}

/// `keyhippo_audit.function_name`: which keyhippo function written in SQL is running, set by the
/// `SET` clause of each (SECURITY DEFINER, owned by the superuser who created the extension).
/// Superuser-only, so that no caller can make an audit row name a function that did not run.
static FUNCTION_NAME: pgrx::GucSetting<Option<std::ffi::CString>> =
    pgrx::GucSetting::<Option<std::ffi::CString>>::new(None);

/// Defines the setting above (from `_PG_init`).
pub fn init() {
    pgrx::GucRegistry::define_string_guc(
        c"keyhippo_audit.function_name",
        c"The keyhippo function making the current change, for its audit rows.",
        c"Set by keyhippo's own functions; only superusers may set it.",
        &FUNCTION_NAME,
        pgrx::GucContext::Suset,
        pgrx::GucFlags::NO_SHOW_ALL,
    );
}

/// The keyhippo function running now, if any.
pub fn current_function() -> Option<&'static str> {
    CURRENT.with(|c| c.get())
}

/// Tells the audit trigger that the INSERT of key row `id` is audited by the statement that
/// inserts it (create writes the key, its hash and its audit row in one statement, which saves
/// the trigger a second statement). Only that row, only for its INSERT, only while the guard
/// lives.
pub fn self_audited(id: [u8; 16]) -> SelfAudited {
    SELF_AUDITED.with(|c| c.set(Some(id)));
    SelfAudited
}

pub struct SelfAudited;

impl Drop for SelfAudited {
    fn drop(&mut self) {
        SELF_AUDITED.with(|c| c.set(None));
    }
}

/// Marks `name` as the function running until the guard is dropped (also on error: a Postgres
/// ERROR unwinds through Rust frames in pgrx).
pub fn function_scope(name: &'static str) -> FunctionScope {
    let previous = CURRENT.with(|c| c.replace(Some(name)));
    FunctionScope { previous }
}

pub struct FunctionScope {
    previous: Option<&'static str>,
}

impl Drop for FunctionScope {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

#[pgrx::pg_schema]
pub mod keyhippo_internal {
    use pgrx::prelude::*;

    /// The keyhippo function (in Rust) currently changing data, if any.
    #[pg_extern(volatile, parallel_unsafe)]
    fn calling_function() -> Option<&'static str> {
        super::CURRENT.with(|c| c.get())
    }
}

// ---------------------------------------------------------------------------------------------
// The audit trigger

use pgrx::pg_sys;
use pgrx::JsonB;
use serde_json::{Map, Value};

use crate::error::{or_raise, KeyhippoError, Result};
use crate::plans::{types, Plan};

const INSERT_AUDIT: Plan = Plan {
    sql: "INSERT INTO keyhippo.audit_log (id, action, table_name, data, user_id, function_name) \
          VALUES ($1, $2, $3, $4, $5, $6)",
    args: &[
        types::UUID,
        types::TEXT,
        types::TEXT,
        types::JSONB,
        types::UUID,
        types::TEXT,
    ],
    mutating: true,
};

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

/// Whether a config key names a secret: its value is masked in the audit log.
fn names_secret(key: Option<&Value>) -> bool {
    let key = key
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    ["secret", "token", "password", "credential"]
        .iter()
        .any(|w| key.contains(w))
}

fn mask_secret_value(row: &mut Value) {
    if names_secret(row.get("key")) {
        if let Some(obj) = row.as_object_mut() {
            obj.insert("value".into(), Value::String("***".into()));
        }
    }
}

/// The function named by a `SET keyhippo_audit.function_name` clause, if any.
fn function_name_setting() -> Option<String> {
    // SAFETY: reads a GUC's value (NULL when it was never set).
    unsafe {
        let value = pg_sys::GetConfigOption(c"keyhippo_audit.function_name".as_ptr(), true, false);
        if value.is_null() {
            return None;
        }
        let value = std::ffi::CStr::from_ptr(value).to_string_lossy();
        (!value.is_empty()).then(|| value.into_owned())
    }
}

/// One audit row per INSERT, UPDATE and DELETE on keyhippo's tables (AFTER ... FOR EACH ROW):
/// action, table, old and new row as JSON, the acting user (request context; NULL for the
/// database owner) and the keyhippo function that caused it. An UPDATE of api_key_metadata that
/// changes only last_used_at (recording a use) writes nothing; config values whose key names a
/// secret are masked. The row is written with the extension owner's rights (src/elevate.rs).
///
/// In Rust rather than PL/pgSQL: it runs once for every key created, and the PL/pgSQL version
/// cost about a third of `create_api_key`.
#[pgrx::pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn keyhippo_audit_change(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the trigger manager through the V1 convention.
    unsafe {
        let td = row_trigger_data(fcinfo, "audit_change()");
        let event = (*td).tg_event;
        or_raise(audit(td, event & pg_sys::TRIGGER_EVENT_OPMASK));
        pg_sys::Datum::from(0)
    }
}

/// The trigger data of a call of a keyhippo C trigger function `name`; raises 22023 unless it is
/// called by the trigger manager as a FOR EACH ROW trigger.
///
/// # Safety
/// `fcinfo` must be the V1 call information of that function.
pub(crate) unsafe fn row_trigger_data(
    fcinfo: pg_sys::FunctionCallInfo,
    name: &str,
) -> *mut pg_sys::TriggerData {
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
        td
    }
}

/// Whether two versions of a key row have the same stored value in every column but
/// last_used_at. Binary comparison: a value rewritten to an equal one with another
/// representation counts as different (the caller then compares the rows' JSON).
///
/// # Safety
/// Both tuples must be rows of a relation described by `desc`.
unsafe fn only_last_used_at_differs(
    old: pg_sys::HeapTuple,
    new: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
) -> bool {
    unsafe {
        let natts = (*desc).natts as usize;
        (0..natts)
            .map(|i| (i, crate::compat::attr(desc, i)))
            .all(|(i, a)| {
                if a.attisdropped
                    || std::ffi::CStr::from_ptr(a.attname.data.as_ptr()) == c"last_used_at"
                {
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

/// Column `att` of a trigger's row.
///
/// # Safety
/// `tuple` must be a row of a relation described by `desc`.
pub(crate) unsafe fn column<T: pgrx::FromDatum>(
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
    att: i16,
) -> Option<T> {
    unsafe {
        let mut isnull = false;
        let datum = pg_sys::heap_getattr(tuple, att as i32, desc, &mut isnull);
        T::from_datum(datum, isnull)
    }
}

unsafe fn audit(td: *mut pg_sys::TriggerData, op: u32) -> Result<()> {
    unsafe {
        let rel = (*td).tg_relation;
        let desc = (*rel).rd_att;
        let table = std::ffi::CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr())
            .to_string_lossy()
            .into_owned();
        let (action, old, new) = match op {
            pg_sys::TRIGGER_EVENT_INSERT => ("INSERT", None, Some((*td).tg_trigtuple)),
            pg_sys::TRIGGER_EVENT_DELETE => ("DELETE", Some((*td).tg_trigtuple), None),
            pg_sys::TRIGGER_EVENT_UPDATE => {
                ("UPDATE", Some((*td).tg_trigtuple), Some((*td).tg_newtuple))
            }
            _ => return Ok(()),
        };
        if action == "INSERT" && table == "api_key_metadata" {
            if let Some(skip) = SELF_AUDITED.with(|c| c.get()) {
                let id_att = pg_sys::get_attnum((*rel).rd_id, c"id".as_ptr());
                let id = column::<pgrx::Uuid>((*td).tg_trigtuple, desc, id_att);
                if id.is_some_and(|id| *id.as_bytes() == skip) {
                    return Ok(());
                }
            }
        }
        // Recording a use (verify's synchronous fallback, flush_key_usage) changes only
        // last_used_at: known from the stored values, without building the rows' JSON.
        if table == "api_key_metadata" {
            if let (Some(o), Some(n)) = (old, new) {
                if only_last_used_at_differs(o, n, desc) {
                    return Ok(());
                }
            }
        }
        let mut old = old.map(|t| row_json(t, desc)).transpose()?;
        let mut new = new.map(|t| row_json(t, desc)).transpose()?;
        if table == "api_key_metadata" {
            if let (Some(Value::Object(o)), Some(Value::Object(n))) = (&old, &new) {
                let differs = o
                    .iter()
                    .any(|(k, v)| k != "last_used_at" && n.get(k) != Some(v));
                if !differs {
                    return Ok(());
                }
            }
        }
        if table == "config" {
            old.iter_mut()
                .chain(new.iter_mut())
                .for_each(mask_secret_value);
        }
        let mut data = Map::new();
        if let Some(old) = old {
            data.insert("old_data".into(), old);
        }
        if let Some(new) = new {
            data.insert("new_data".into(), new);
        }
        let user = crate::context::current_user()?;
        let function = current_function()
            .map(str::to_string)
            .or_else(function_name_setting);
        let id = pgrx::Uuid::from_bytes(keyhippo_core::uuid::new_v7());
        crate::elevate::as_owner(|| {
            pgrx::spi::Spi::connect_mut(|client| {
                INSERT_AUDIT
                    .run(
                        client,
                        &[
                            id.into(),
                            action.into(),
                            table.as_str().into(),
                            JsonB(Value::Object(data)).into(),
                            user.into(),
                            function.into(),
                        ],
                    )
                    .map(|_| ())
            })
        })
    }
}

v1_function_info!(pg_finfo_keyhippo_audit_change);
