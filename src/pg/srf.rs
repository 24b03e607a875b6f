//! Set-returning functions written against the V1 calling convention: one row returned in
//! materialize mode, in a tuplestore built with the descriptor the executor already has.
//!
//! keyhippo's hot functions (`verify_api_key`, `create_api_key`) return a named row type this
//! way rather than through `#[pg_extern]` and a `TableIterator`: that would look the result type
//! up in the catalog, create a memory context and be called twice for every row, and a function
//! declared with OUT parameters has its result descriptor rebuilt from `pg_proc` at every
//! execution of the calling statement, where a named row type's comes from the type cache.

use pgrx::pg_sys;

use std::rc::Rc;

use crate::error::{or_raise, KeyhippoError};
use crate::model::Permissions;

/// A column value of a row returned by [`one_row`].
pub enum Column {
    Uuid([u8; 16]),
    Text(String),
    /// A `text[]` of permission names.
    Permissions(Rc<Permissions>),
    /// A timestamptz (microseconds since 2000-01-01).
    Timestamp(i64),
    Null,
}

/// Runs a set-returning V1 function `name` that returns at most one row: `f` gets the call's
/// arguments and returns the row's columns, or None for no row.
///
/// # Safety
/// `fcinfo` is the V1 call information of a function declared `RETURNS SETOF` a row type with
/// as many columns as `f` returns, of the types it returns.
pub unsafe fn one_row(
    fcinfo: pg_sys::FunctionCallInfo,
    name: &str,
    f: impl FnOnce(&Arguments) -> Option<Vec<Column>>,
) -> pg_sys::Datum {
    unsafe {
        let rsinfo = set_returning_info(fcinfo, name);
        let args = Arguments { fcinfo };
        let Some(columns) = f(&args) else {
            // No tuplestore: the executor reads that as an empty set.
            return pg_sys::Datum::from(0);
        };
        let mut texts = Vec::new();
        let mut values = Vec::with_capacity(columns.len());
        let mut nulls = Vec::with_capacity(columns.len());
        for column in &columns {
            let (value, null) = match column {
                Column::Uuid(bytes) => (pg_sys::Datum::from(bytes.as_ptr()), false),
                Column::Text(text) => {
                    let datum =
                        pg_sys::cstring_to_text_with_len(text.as_ptr().cast(), text.len() as i32);
                    texts.push(datum);
                    (pg_sys::Datum::from(datum), false)
                }
                Column::Permissions(permissions) => (permissions.array_datum(), false),
                Column::Timestamp(micros) => (pg_sys::Datum::from(*micros), false),
                Column::Null => (pg_sys::Datum::from(0), true),
            };
            values.push(value);
            nulls.push(null);
        }
        return_row(fcinfo, rsinfo, &mut values, &mut nulls);
        for text in texts {
            pg_sys::pfree(text.cast());
        }
        pg_sys::Datum::from(0)
    }
}

/// The arguments of a V1 call, for [`one_row`]'s function.
pub struct Arguments {
    fcinfo: pg_sys::FunctionCallInfo,
}

impl Arguments {
    /// Argument `n` (from 0) as an interval; None for NULL.
    pub fn interval(&self, n: usize) -> Option<pgrx::datum::Interval> {
        // SAFETY: as in `text`.
        unsafe { pgrx::fcinfo::pg_getarg::<pgrx::datum::Interval>(self.fcinfo, n) }
    }

    /// Argument `n` (from 0) as text; None for NULL.
    pub fn text(&self, n: usize) -> Option<&str> {
        // SAFETY: `fcinfo` is the current V1 call's (see `one_row`); pgrx checks NULL and
        // converts the text datum.
        unsafe { pgrx::fcinfo::pg_getarg::<&str>(self.fcinfo, n) }
    }
}

/// The ReturnSetInfo of a set-returning V1 call, switched to materialize mode; a clean ERROR
/// when the caller cannot take a set (e.g. `function` called where a scalar is expected).
///
/// # Safety
/// A V1 call's `fcinfo`.
pub unsafe fn set_returning_info(
    fcinfo: pg_sys::FunctionCallInfo,
    function: &str,
) -> *mut pg_sys::ReturnSetInfo {
    unsafe {
        let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
        let materialize = pg_sys::SetFunctionReturnMode::SFRM_Materialize as i32;
        if rsinfo.is_null()
            || (*rsinfo).type_ != pg_sys::NodeTag::T_ReturnSetInfo
            || (*rsinfo).allowedModes & materialize == 0
        {
            or_raise::<()>(Err(KeyhippoError::InvalidArgument(format!(
                "keyhippo: {function} must be called where a set of rows is accepted"
            ))));
        }
        (*rsinfo).returnMode = pg_sys::SetFunctionReturnMode::SFRM_Materialize;
        // The function's own result is unused in materialize mode.
        (*fcinfo).isnull = true;
        rsinfo
    }
}

/// Returns one row from a materialize-mode call: a tuplestore holding a copy of `values`, made
/// with the descriptor the executor expects (from the function's declared row type otherwise).
/// Returning nothing instead (no tuplestore) is an empty set.
///
/// # Safety
/// `rsinfo` from [`set_returning_info`] for this `fcinfo`; `values` and `nulls` as many as the
/// row type has columns, of its types.
pub unsafe fn return_row(
    fcinfo: pg_sys::FunctionCallInfo,
    rsinfo: *mut pg_sys::ReturnSetInfo,
    values: &mut [pg_sys::Datum],
    nulls: &mut [bool],
) {
    unsafe {
        let mut tupdesc = (*rsinfo).expectedDesc;
        if tupdesc.is_null() {
            let mut desc = std::ptr::null_mut();
            pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut desc);
            tupdesc = desc;
        }
        let per_query = (*(*rsinfo).econtext).ecxt_per_query_memory;
        let old = pg_sys::MemoryContextSwitchTo(per_query);
        let store = pg_sys::tuplestore_begin_heap(true, false, pg_sys::work_mem);
        pg_sys::tuplestore_putvalues(store, tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pg_sys::MemoryContextSwitchTo(old);
        (*rsinfo).setResult = store;
        // setDesc stays NULL: the executor would free a descriptor it does not own.
    }
}
