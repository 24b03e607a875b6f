//! jsonb values built and checked with PostgreSQL's own jsonb functions.

use pgrx::pg_sys;
use pgrx::Uuid;

use pgrx::datum::DatumWithOid;

/// A jsonb datum (made by [`from_text`] or [`new_key_audit_row`]).
#[derive(Clone, Copy)]
pub struct Jsonb(pg_sys::Datum);

impl Jsonb {
    /// As an argument of a prepared statement.
    pub fn argument(self) -> DatumWithOid<'static> {
        // SAFETY: the datum is a jsonb.
        unsafe { DatumWithOid::new(self.0, pg_sys::JSONBOID) }
    }
}

/// The values of a new key row (timestamps as TimestampTz microseconds), as its audit row
/// renders them.
pub struct NewKeyRow<'a> {
    pub id: Uuid,
    pub user_id: Uuid,
    pub scope_id: Option<Uuid>,
    pub description: Option<&'a str>,
    pub prefix: &'a str,
    pub claims: Jsonb,
    pub created_at: i64,
    pub expires_at: i64,
}

/// Deepest level at which claims may hold a value: the top-level object's values are at level 1.
const MAX_CLAIMS_LEVEL: i32 = 31;

/// Whether a jsonb is a JSON object holding no value deeper than [`MAX_CLAIMS_LEVEL`], walked with
/// PostgreSQL's jsonb iterator (no recursion, whatever the depth).
///
/// # Safety
/// `jsonb` points to a detoasted jsonb.
pub unsafe fn claims_shape_is_valid(jsonb: *mut pg_sys::Jsonb) -> bool {
    use pg_sys::JsonbIteratorToken::{
        WJB_BEGIN_ARRAY, WJB_BEGIN_OBJECT, WJB_DONE, WJB_ELEM, WJB_END_ARRAY, WJB_END_OBJECT,
        WJB_VALUE,
    };
    unsafe {
        let header = (*jsonb).root.header;
        if header & pg_sys::JB_FOBJECT == 0 || header & pg_sys::JB_FSCALAR != 0 {
            return false;
        }
        let mut it = pg_sys::JsonbIteratorInit(&raw mut (*jsonb).root);
        let mut value: pg_sys::JsonbValue = std::mem::zeroed();
        // How many containers the iterator is inside: the level of the values it returns.
        let mut depth = 0;
        loop {
            match pg_sys::JsonbIteratorNext(&mut it, &mut value, false) {
                WJB_DONE => return true,
                WJB_BEGIN_ARRAY | WJB_BEGIN_OBJECT => {
                    if depth > MAX_CLAIMS_LEVEL {
                        return false;
                    }
                    depth += 1;
                }
                WJB_END_ARRAY | WJB_END_OBJECT => depth -= 1,
                WJB_VALUE | WJB_ELEM if depth > MAX_CLAIMS_LEVEL => return false,
                _ => {}
            }
        }
    }
}

/// Whether a jsonb argument of a V1 call is a claims document: see [`claims_shape_is_valid`].
///
/// # Safety
/// `fcinfo` is a V1 call with a non-NULL jsonb first argument.
pub unsafe fn claims_argument_is_valid(fcinfo: pg_sys::FunctionCallInfo) -> bool {
    unsafe {
        let arg = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0);
        let jsonb = pg_sys::pg_detoast_datum(arg.cast_mut_ptr()) as *mut pg_sys::Jsonb;
        claims_shape_is_valid(jsonb)
    }
}

/// A jsonb datum from JSON text (raises 22P02 for malformed JSON, as a cast would).
pub fn from_text(text: &str) -> Jsonb {
    let text = std::ffi::CString::new(text).unwrap_or_default();
    // SAFETY: jsonb_in reads the NUL-terminated text and returns a palloc'd jsonb.
    let datum = unsafe {
        pgrx::fcinfo::direct_function_call_as_datum(
            pg_sys::jsonb_in,
            &[Some(pg_sys::Datum::from(text.as_ptr()))],
        )
    };
    Jsonb(datum.expect("jsonb_in returns a value for a non-NULL argument"))
}

/// A TimestampTz as `to_jsonb` renders it (ISO 8601 in the session's time zone).
fn json_timestamp(micros: i64) -> String {
    // SAFETY: JsonEncodeDateTime with a NULL buffer pallocs the text it returns.
    unsafe {
        let text = pg_sys::JsonEncodeDateTime(
            std::ptr::null_mut(),
            pg_sys::Datum::from(micros),
            pg_sys::TIMESTAMPTZOID,
            std::ptr::null(),
        );
        let rendered = std::ffi::CStr::from_ptr(text)
            .to_string_lossy()
            .into_owned();
        pg_sys::pfree(text.cast());
        rendered
    }
}

/// `{"new_data": <the new key row>}` as jsonb, exactly as the audit trigger writes it for a row
/// inserted some other way (`to_jsonb` of the row; tested in
/// tests/pg_regress/sql/create_write_path.sql). Built with Postgres' jsonb builder rather than
/// its JSON parser, which costs more than the rest of the row's making; the timestamps are
/// rendered by the function `to_jsonb` uses.
pub fn new_key_audit_row(row: &NewKeyRow<'_>) -> Jsonb {
    use pg_sys::jbvType::{jbvBinary, jbvBool, jbvNull, jbvString};
    use pg_sys::JsonbIteratorToken::{WJB_BEGIN_OBJECT, WJB_END_OBJECT, WJB_KEY, WJB_VALUE};
    // SAFETY: builds a jsonb with PostgreSQL's builder from values that outlive the build;
    // `row.claims` is a jsonb (its type says so).
    unsafe {
        let null = || {
            let mut v: pg_sys::JsonbValue = std::mem::zeroed();
            v.type_ = jbvNull;
            v
        };
        // Strings are copied into palloc'd memory that lives as long as the jsonb being built.
        let string = |text: &str| {
            let mut v: pg_sys::JsonbValue = std::mem::zeroed();
            v.type_ = jbvString;
            let copy = pg_sys::palloc(text.len().max(1)) as *mut u8;
            std::ptr::copy_nonoverlapping(text.as_ptr(), copy, text.len());
            v.val.string = pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_1 {
                len: text.len() as i32,
                val: copy.cast(),
            };
            v
        };
        let uuid = |u: &Uuid| string(&keyhippo_core::uuid::hyphenated(u.as_bytes()));
        let mut state: *mut pg_sys::JsonbParseState = std::ptr::null_mut();
        let state = &mut state;
        fn push(
            state: &mut *mut pg_sys::JsonbParseState,
            token: pg_sys::JsonbIteratorToken::Type,
            value: Option<pg_sys::JsonbValue>,
        ) -> *mut pg_sys::JsonbValue {
            let mut value = value;
            let ptr = value
                .as_mut()
                .map_or(std::ptr::null_mut(), |v| v as *mut pg_sys::JsonbValue);
            // SAFETY: the value is copied into the parse state; strings it points to are
            // palloc'd and outlive the build.
            unsafe { pg_sys::pushJsonbValue(state, token, ptr) }
        }
        let pair = |state: &mut *mut pg_sys::JsonbParseState, key: &str, value| {
            push(state, WJB_KEY, Some(string(key)));
            push(state, WJB_VALUE, Some(value));
        };
        let detoasted = pg_sys::pg_detoast_datum(row.claims.0.cast_mut_ptr()) as *mut pg_sys::Jsonb;
        let mut claims_value: pg_sys::JsonbValue = std::mem::zeroed();
        claims_value.type_ = jbvBinary;
        claims_value.val.binary = pg_sys::JsonbValue__bindgen_ty_1__bindgen_ty_4 {
            len: pgrx::varlena::varsize_any(detoasted.cast()) as i32,
            data: std::ptr::addr_of_mut!((*detoasted).root),
        };
        let mut is_revoked: pg_sys::JsonbValue = std::mem::zeroed();
        is_revoked.type_ = jbvBool;
        is_revoked.val.boolean = false;

        push(state, WJB_BEGIN_OBJECT, None);
        push(state, WJB_KEY, Some(string("new_data")));
        push(state, WJB_BEGIN_OBJECT, None);
        pair(state, "id", uuid(&row.id));
        pair(state, "user_id", uuid(&row.user_id));
        pair(
            state,
            "scope_id",
            row.scope_id.as_ref().map_or_else(null, uuid),
        );
        pair(
            state,
            "description",
            row.description.map_or_else(null, string),
        );
        pair(state, "prefix", string(row.prefix));
        pair(state, "created_at", string(&json_timestamp(row.created_at)));
        pair(state, "last_used_at", null());
        pair(state, "expires_at", string(&json_timestamp(row.expires_at)));
        pair(state, "is_revoked", is_revoked);
        pair(state, "claims", claims_value);
        pair(state, "revoked_at", null());
        pair(state, "disabled_at", null());
        pair(state, "revoked_reason", null());
        push(state, WJB_END_OBJECT, None);
        let done = push(state, WJB_END_OBJECT, None);
        Jsonb(pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(done)))
    }
}
