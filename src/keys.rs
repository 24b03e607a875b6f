//! The key lifecycle as SQL functions: create, verify, revoke, rotate, update claims.
//!
//! All of them are SECURITY DEFINER (they read or write `api_key_secrets`, which no client role
//! can see) with `search_path` pinned to `pg_catalog, pg_temp`, and every statement below names
//! its objects with their schema.

use pgrx::datum::DatumWithOid;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::prelude::*;
use pgrx::{JsonB, Uuid};

use crate::audit::function_scope;
use crate::context::{self, scoped_permissions_of};
use crate::error::{or_raise, KeyhippoError, Result};
use crate::plans::{types, Plan};
use keyhippo_core::{hash, token};

/// Longest description accepted (KeyHippo 1.2.5's limit).
const MAX_DESCRIPTION_LEN: usize = 255;
/// Largest claims document accepted, serialized.
const MAX_CLAIMS_BYTES: usize = 64 * 1024;

// ---------------------------------------------------------------------------------------------
// Statements

// Two statements, not one with `(SELECT ... WHERE name = $2)`: with a NULL scope the planner
// folds that to false, finds the custom plan cheaper and re-plans at every call.
const USER_EXISTS: Plan = Plan {
    sql: "SELECT keyhippo_internal.user_exists($1)",
    args: &[types::UUID],
    mutating: false,
};

const SCOPE_ID: Plan = Plan {
    sql: "SELECT s.id FROM keyhippo.scopes s WHERE s.name = $1",
    args: &[types::TEXT],
    mutating: false,
};

/// A key row, its hash and the key row's audit row, in one statement. The audit row is what the audit trigger would write
/// (it skips this row: see `audit::self_audited`), built in Rust from the values inserted
/// (`audit_jsonb`), so the statement needs no `RETURNING` row and no `to_jsonb`. The foreign
/// key of the hash to the key row is checked at the end of the statement, when both are in.
const INSERT_KEY: Plan = Plan {
    sql: "WITH m AS ( \
            INSERT INTO keyhippo.api_key_metadata \
                (id, user_id, scope_id, description, prefix, claims, created_at, expires_at) \
            VALUES ($1, $2, $3, $4, $5, $6, $7, $8)), \
          a AS ( \
            INSERT INTO keyhippo.audit_log (id, action, table_name, data, user_id, function_name) \
            VALUES ($9, 'INSERT', 'api_key_metadata', $10, $11, $12)) \
          INSERT INTO keyhippo.api_key_secrets (key_metadata_id, key_hash) VALUES ($1, $13)",
    args: &[
        types::UUID,
        types::UUID,
        types::UUID,
        types::TEXT,
        types::TEXT,
        types::JSONB,
        types::TIMESTAMPTZ,
        types::TIMESTAMPTZ,
        types::UUID,
        types::JSONB,
        types::UUID,
        types::TEXT,
        types::TEXT,
    ],
    mutating: true,
};

const SCOPED_PERMISSIONS: Plan = Plan {
    sql: concat!("SELECT ", scoped_permissions_of!("$1", "$2")),
    args: &[types::UUID, types::UUID],
    mutating: false,
};

// The management statements below take the caller ($2: the calling user, NULL for an admin
// acting without one) and whether the caller is an admin ($3), both worked out before they run:
// a key that exists but is another user's and a key that does not exist go through the very
// same statements, so neither the result nor the time taken tells them apart.

/// Revokes a key the caller owns (or any key, for an admin), and says whether the caller may see
/// the key at all, in one statement: (revoked now, visible). The secret hash is deleted by the
/// AFTER UPDATE trigger, so revoking by a direct UPDATE of is_revoked/revoked_at works the same.
/// (The visibility test reads the snapshot the UPDATE started from: the row as it was.)
const REVOKE: Plan = Plan {
    sql: "WITH r AS ( \
            UPDATE keyhippo.api_key_metadata m \
               SET is_revoked = true, revoked_at = pg_catalog.now() \
             WHERE m.id = $1 AND NOT m.is_revoked AND (m.user_id = $2 OR $3) \
            RETURNING m.id) \
          SELECT EXISTS (SELECT 1 FROM r), \
                 EXISTS (SELECT 1 FROM keyhippo.api_key_metadata m \
                          WHERE m.id = $1 AND (m.user_id = $2 OR $3))",
    args: &[types::UUID, types::UUID, types::BOOL],
    mutating: true,
};

const ROTATE_SOURCE: Plan = Plan {
    sql: "SELECT m.user_id, m.scope_id, m.description, m.claims, m.is_revoked, \
                 pg_catalog.now() + (m.expires_at - m.created_at), m.prefix \
            FROM keyhippo.api_key_metadata m \
           WHERE m.id = $1 AND (m.user_id = $2 OR $3) \
             FOR UPDATE",
    args: &[types::UUID, types::UUID, types::BOOL],
    mutating: true,
};

const UPDATE_CLAIMS: Plan = Plan {
    sql: "UPDATE keyhippo.api_key_metadata m SET claims = $4 \
           WHERE m.id = $1 AND (m.user_id = $2 OR $3) \
          RETURNING m.id",
    args: &[types::UUID, types::UUID, types::BOOL, types::JSONB],
    mutating: true,
};

// ---------------------------------------------------------------------------------------------
// Helpers

fn unauthenticated() -> KeyhippoError {
    KeyhippoError::Unauthenticated("keyhippo: this function requires an authenticated user".into())
}

/// The calling user (header key, JWT or impersonation), or an error for requests that carry
/// none.
pub(crate) fn require_user() -> Result<Uuid> {
    context::current_user()?.ok_or_else(unauthenticated)
}

/// Who calls a management function: the calling user (None for an admin such as service_role
/// acting without one), and whether the caller is an admin. Both are always worked out, whatever
/// the key asked for, so every call runs the same statements.
struct Manager {
    user: Option<Uuid>,
    is_admin: bool,
}

impl Manager {
    fn current() -> Result<Manager> {
        let caller = context::current_caller()?;
        let is_admin = context::is_admin(caller.as_ref())?;
        let user = caller.map(|c| c.user_id);
        if user.is_none() && !is_admin {
            return Err(unauthenticated());
        }
        Ok(Manager { user, is_admin })
    }

    /// The arguments $1 (the key), $2 and $3 of the management statements.
    fn args(&self, key: Uuid) -> [DatumWithOid<'static>; 3] {
        [key.into(), self.user.into(), self.is_admin.into()]
    }
}

/// The description rules: at most [`MAX_DESCRIPTION_LEN`] characters of `[a-zA-Z0-9_ -]`.
pub(crate) fn description_is_valid(d: &str) -> bool {
    d.len() <= MAX_DESCRIPTION_LEN
        && d.bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b' ' || c == b'-')
}

/// Deepest level at which claims may hold a value: the top-level object's values are at level 1.
const MAX_CLAIMS_LEVEL: i32 = 31;

/// Whether a jsonb is a JSON object holding no value deeper than [`MAX_CLAIMS_LEVEL`], walked with
/// PostgreSQL's jsonb iterator (no recursion, whatever the depth).
///
/// # Safety
/// `jsonb` points to a detoasted jsonb.
unsafe fn claims_shape_is_valid(jsonb: *mut pg_sys::Jsonb) -> bool {
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

/// `keyhippo_internal.claims_ok(jsonb)`: the claims rule of the table's CHECK constraint
/// (sql/finalize.sql). A hand-written V1 function: pgrx's conversion of a jsonb argument goes
/// through JSON text and a parser with a recursion limit, the very documents this refuses.
#[pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn keyhippo_claims_ok(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called through the V1 convention with one non-NULL jsonb argument (STRICT).
    unsafe {
        let arg = pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, 0);
        let jsonb = pg_sys::pg_detoast_datum(arg.cast_mut_ptr()) as *mut pg_sys::Jsonb;
        pg_sys::Datum::from(claims_shape_is_valid(jsonb))
    }
}

v1_function_info!(pg_finfo_keyhippo_claims_ok);

extension_sql!(
    r#"
CREATE FUNCTION keyhippo_internal.claims_ok(claims jsonb) RETURNS boolean
    LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE
    AS 'MODULE_PATHNAME', 'keyhippo_claims_ok';
COMMENT ON FUNCTION keyhippo_internal.claims_ok(jsonb) IS
    'Whether claims are a JSON object holding no value more than 31 levels below it.';
"#,
    name = "claims_ok",
    requires = ["bootstrap"]
);

/// `keyhippo_internal.description_ok(text)`: the description rule of the table's CHECK
/// constraint (sql/finalize.sql), the same create_api_key applies.
#[pg_extern(immutable, strict, parallel_safe, schema = "keyhippo_internal")]
fn description_ok(description: &str) -> bool {
    description_is_valid(description)
}

pub(crate) fn validate_description(description: Option<&str>) -> Result<&str> {
    let d = description.ok_or_else(|| {
        KeyhippoError::InvalidArgument("keyhippo: key_description must not be NULL".into())
    })?;
    if d.chars().count() > MAX_DESCRIPTION_LEN {
        return Err(KeyhippoError::InvalidArgument(format!(
            "keyhippo: key_description is longer than {MAX_DESCRIPTION_LEN} characters"
        )));
    }
    if !d
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ' ' || c == '-')
    {
        return Err(KeyhippoError::InvalidArgument(
            "keyhippo: key_description may contain only letters, digits, spaces, '_' and '-'"
                .into(),
        ));
    }
    Ok(d)
}

fn key_not_found() -> KeyhippoError {
    // The same message whether the key does not exist or belongs to someone else: the caller
    // learns nothing about other users' keys.
    KeyhippoError::NotFound("keyhippo: API key not found among the caller's keys".into())
}

/// What a new key row holds.
struct NewKey<'a> {
    user_id: Uuid,
    scope_id: Option<Uuid>,
    description: Option<&'a str>,
    claims: Option<JsonB>,
    expires_at: Option<TimestampWithTimeZone>,
}

/// Inserts a key row, its hash and its audit row; returns (plaintext key, id). `actor` is the
/// calling user, for the audit row (None for an admin acting without one).
fn insert_key(
    client: &pgrx::spi::SpiClient<'_>,
    key: NewKey<'_>,
    actor: Option<Uuid>,
) -> Result<(String, Uuid)> {
    let new_key = token::generate();
    let key_hash = hash::hash_key(&new_key.key);
    // Time-ordered ids: appended at the right edge of the primary keys.
    let id = Uuid::from_bytes(keyhippo_core::uuid::new_v7());
    let created_at = crate::lookup::now();
    let expires_at = match key.expires_at {
        Some(at) => at.into(),
        None => default_expiry(created_at),
    };
    let claims = match &key.claims {
        Some(claims) => claims.0.to_string(),
        None => "{}".to_string(),
    };
    let row = KeyRowValues {
        id,
        user_id: key.user_id,
        scope_id: key.scope_id,
        description: key.description,
        prefix: &new_key.prefix,
        claims: jsonb(&claims),
        created_at,
        expires_at,
    };
    // SAFETY: `row.claims` is a jsonb datum.
    let audit = unsafe { audit_jsonb(&row) };
    let audit_id = Uuid::from_bytes(keyhippo_core::uuid::new_v7());
    let _audited = crate::audit::self_audited(*id.as_bytes());
    let timestamp = |micros: i64| TimestampWithTimeZone::try_from(micros).ok();
    // SAFETY: both are jsonb datums.
    let as_jsonb = |datum: pg_sys::Datum| unsafe { DatumWithOid::new(datum, pg_sys::JSONBOID) };
    INSERT_KEY.run(
        client,
        &[
            id.into(),
            key.user_id.into(),
            key.scope_id.into(),
            key.description.into(),
            new_key.prefix.as_str().into(),
            as_jsonb(row.claims),
            timestamp(created_at).into(),
            timestamp(expires_at).into(),
            audit_id.into(),
            as_jsonb(audit),
            actor.into(),
            crate::audit::current_function().into(),
            key_hash.as_str().into(),
        ],
    )?;
    Ok((new_key.key, id))
}

/// A jsonb datum from JSON text (raises 22P02 for malformed JSON, as a cast would).
fn jsonb(text: &str) -> pg_sys::Datum {
    let text = std::ffi::CString::new(text).unwrap_or_default();
    // SAFETY: jsonb_in reads the NUL-terminated text and returns a palloc'd jsonb.
    unsafe {
        pgrx::fcinfo::direct_function_call_as_datum(
            pg_sys::jsonb_in,
            &[Some(pg_sys::Datum::from(text.as_ptr()))],
        )
        .unwrap_or(pg_sys::Datum::from(0))
    }
}

/// The values of a new key row (timestamps as TimestampTz microseconds).
struct KeyRowValues<'a> {
    id: Uuid,
    user_id: Uuid,
    scope_id: Option<Uuid>,
    description: Option<&'a str>,
    prefix: &'a str,
    /// A jsonb datum.
    claims: pg_sys::Datum,
    created_at: i64,
    expires_at: i64,
}

/// The column default of `expires_at`: `now() + interval '100 years'`, computed as Postgres
/// computes it (months are added in the session's time zone).
fn default_expiry(now: i64) -> i64 {
    let mut hundred_years = pg_sys::Interval {
        time: 0,
        day: 0,
        month: 1200,
    };
    // SAFETY: a built-in function called with a TimestampTz and a pointer to an Interval that
    // outlives the call; the result is a by-value TimestampTz.
    unsafe {
        pgrx::fcinfo::direct_function_call_as_datum(
            pg_sys::timestamptz_pl_interval,
            &[
                Some(pg_sys::Datum::from(now)),
                Some(pg_sys::Datum::from(std::ptr::addr_of_mut!(hundred_years))),
            ],
        )
        .map_or(i64::MAX, |sum| sum.value() as i64)
    }
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
/// its JSON parser (which cost a tenth of a create); the timestamps are rendered by the function
/// `to_jsonb` uses.
///
/// # Safety
/// `row.claims` must be a jsonb datum.
unsafe fn audit_jsonb(row: &KeyRowValues<'_>) -> pg_sys::Datum {
    use pg_sys::jbvType::{jbvBinary, jbvBool, jbvNull, jbvString};
    use pg_sys::JsonbIteratorToken::{WJB_BEGIN_OBJECT, WJB_END_OBJECT, WJB_KEY, WJB_VALUE};
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
        let detoasted = pg_sys::pg_detoast_datum(row.claims.cast_mut_ptr()) as *mut pg_sys::Jsonb;
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
        push(state, WJB_END_OBJECT, None);
        let done = push(state, WJB_END_OBJECT, None);
        pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(done))
    }
}

// ---------------------------------------------------------------------------------------------
// SQL functions

/// Creates an API key for the current user. The plaintext key is in the result and nowhere
/// else: only its hash is stored.
///
/// A hand-written V1 function for the reason verify is (see [`keyhippo_verify_api_key`]): its
/// one row goes to a tuplestore built with the descriptor of the named row type
/// `keyhippo.create_api_key_result` the executor already has, instead of a descriptor rebuilt
/// from OUT parameters at every call and pgrx's value-per-call iterator around it. SECURITY
/// DEFINER with `search_path` pinned, declared in SQL below.
#[pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn keyhippo_create_api_key(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor through the V1 convention with two text arguments.
    unsafe {
        let rsinfo = set_returning_info(fcinfo, "create_api_key");
        let description = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 0);
        let scope_name = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 1);
        let (api_key, id) = {
            let _audit = function_scope("create_api_key");
            or_raise(create_api_key_impl(description, scope_name))
        };
        let id = *id.as_bytes();
        let text = pg_sys::cstring_to_text_with_len(api_key.as_ptr().cast(), api_key.len() as i32);
        let mut values = [pg_sys::Datum::from(text), pg_sys::Datum::from(id.as_ptr())];
        return_row(fcinfo, rsinfo, &mut values, &mut [false, false]);
        pg_sys::pfree(text.cast());
        pg_sys::Datum::from(0)
    }
}

v1_function_info!(pg_finfo_keyhippo_create_api_key);

extension_sql!(
    r#"
-- create_api_key's row: the columns KeyHippo 1.2.5's RETURNS TABLE declared, as a named row type
-- for the reason verify_api_key_result is one.
CREATE TYPE keyhippo.create_api_key_result AS (api_key text, api_key_id uuid);
COMMENT ON TYPE keyhippo.create_api_key_result IS
    'The row create_api_key returns: the plaintext key (shown once) and its id.';
CREATE FUNCTION keyhippo."create_api_key"("key_description" text, "scope_name" text DEFAULT NULL)
    RETURNS SETOF keyhippo.create_api_key_result
    LANGUAGE c VOLATILE SECURITY DEFINER PARALLEL UNSAFE ROWS 1
    SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'keyhippo_create_api_key';
COMMENT ON FUNCTION keyhippo.create_api_key(text, text) IS
    'Creates an API key for the current user; returns the plaintext key (once) and its id.';
"#,
    name = "create_api_key",
    requires = ["bootstrap"]
);

/// The ReturnSetInfo of a set-returning V1 call, switched to materialize mode; a clean ERROR
/// when the caller cannot take a set (e.g. `function` called where a scalar is expected).
///
/// # Safety
/// A V1 call's `fcinfo`.
unsafe fn set_returning_info(
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
unsafe fn return_row(
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

fn create_api_key_impl(
    description: Option<&str>,
    scope_name: Option<&str>,
) -> Result<(String, Uuid)> {
    let user = require_user()?;
    let description = validate_description(description)?;
    Spi::connect_mut(|client| {
        let owner = check_owner_and_scope(client, user, scope_name)?;
        let new = NewKey {
            user_id: user,
            scope_id: owner.scope_id,
            description: Some(description),
            claims: None,
            expires_at: None,
        };
        insert_key(client, new, Some(user))
    })
}

/// Checks that a new key's owner exists (in auth.users, when there is one) and resolves the
/// scope name; an unknown scope is an error. (The key row's foreign key to auth.users, where
/// there is one, then locks the owner's row as for any INSERT.)
pub(crate) fn check_owner_and_scope(
    client: &pgrx::spi::SpiClient<'_>,
    user: Uuid,
    scope_name: Option<&str>,
) -> Result<OwnerCheck> {
    // Every caller writes a key: refuse READ ONLY transactions and hot standbys here with the
    // error an INSERT gets (25006), before anything is touched.
    let function = std::ffi::CString::new(crate::audit::current_function().unwrap_or("keyhippo"))
        .unwrap_or_default();
    // SAFETY: plain checks of transaction state; they raise an ERROR naming the function.
    unsafe {
        pg_sys::PreventCommandIfReadOnly(function.as_ptr());
        pg_sys::PreventCommandDuringRecovery(function.as_ptr());
    }
    let exists = USER_EXISTS
        .run(client, &[user.into()])?
        .first()
        .get::<bool>(1)?
        .unwrap_or(false);
    if !exists {
        return Err(KeyhippoError::UnknownUser(
            "keyhippo: the authenticated user does not exist in auth.users".into(),
        ));
    }
    Ok(OwnerCheck {
        scope_id: scope_id(client, scope_name)?,
    })
}

/// What [`check_owner_and_scope`] found.
pub(crate) struct OwnerCheck {
    pub scope_id: Option<Uuid>,
}

/// The id of scope `scope_name` (None for no scope); an unknown scope is an error.
fn scope_id(client: &pgrx::spi::SpiClient<'_>, scope_name: Option<&str>) -> Result<Option<Uuid>> {
    let Some(name) = scope_name else {
        return Ok(None);
    };
    let scope = SCOPE_ID.run(client, &[name.into()])?;
    let scope_id = if scope.is_empty() {
        None
    } else {
        scope.first().get::<Uuid>(1)?
    };
    if scope_id.is_none() {
        return Err(KeyhippoError::NotFound(format!(
            "keyhippo: scope \"{}\" does not exist",
            crate::error::echo(name)
        )));
    }
    Ok(scope_id)
}

/// Verifies a key. One row (owner, scope, permissions) for a valid, unrevoked, unexpired key;
/// zero rows for anything else, including NULL, junk and keys of the wrong shape. Never raises
/// for bad input.
///
/// Not SECURITY DEFINER, on purpose: it runs no SQL on its common path (the key is found through
/// the access methods, permissions come from the cache), and the rare statements it runs switch
/// to the extension owner with a pinned search_path (src/elevate.rs). This saves the cost of a
/// SECURITY DEFINER call's `SET search_path` on every request.
///
/// Written against the V1 calling convention directly rather than with `#[pg_extern]` and a
/// `TableIterator`: that would look the result type up in the catalog, create a memory context
/// and be called twice for every row. This returns its one row in a tuplestore (materialize
/// mode) built with the descriptor the executor already has.
#[pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn keyhippo_verify_api_key(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor through the V1 convention with one text argument.
    unsafe {
        let rsinfo = set_returning_info(fcinfo, "verify_api_key");
        let api_key = pgrx::fcinfo::pg_getarg::<&str>(fcinfo, 0);
        let Some(v) = or_raise(verify(api_key)) else {
            // No tuplestore: the executor reads that as an empty set.
            return pg_sys::Datum::from(0);
        };
        // The values point at memory of this frame and of `v`: the tuplestore copies them.
        let user_id = *v.user_id.as_bytes();
        let scope_id = v.scope_id.map(|s| *s.as_bytes()).unwrap_or([0; 16]);
        let mut values = [
            pg_sys::Datum::from(user_id.as_ptr()),
            pg_sys::Datum::from(scope_id.as_ptr()),
            v.permissions.array_datum(),
        ];
        return_row(
            fcinfo,
            rsinfo,
            &mut values,
            &mut [false, v.scope_id.is_none(), false],
        );
        pg_sys::Datum::from(0)
    }
}

v1_function_info!(pg_finfo_keyhippo_verify_api_key);

extension_sql!(
    r#"
-- The row type of verify_api_key: the columns KeyHippo 1.2.5's RETURNS TABLE declared. A named
-- composite type instead of OUT parameters because PostgreSQL rebuilds the result descriptor
-- of a function with OUT parameters from pg_proc at every execution of the calling statement
-- (about 7,000 instructions, a tenth of a verify), while a composite type's comes from the
-- type cache. Callers see the same columns: SELECT * / user_id / (verify_api_key(k)).* alike.
CREATE TYPE keyhippo.verify_api_key_result AS (user_id uuid, scope_id uuid, permissions text[]);
COMMENT ON TYPE keyhippo.verify_api_key_result IS
    'The row verify_api_key returns for a valid key: user_id, scope_id, permissions.';
CREATE FUNCTION keyhippo."verify_api_key"("api_key" text)
    RETURNS SETOF keyhippo.verify_api_key_result
    LANGUAGE c VOLATILE PARALLEL UNSAFE ROWS 1
    AS 'MODULE_PATHNAME', 'keyhippo_verify_api_key';
COMMENT ON FUNCTION keyhippo.verify_api_key(text) IS
    'One row (user_id, scope_id, permissions) for a valid, unrevoked, unexpired key; no rows otherwise.';
"#,
    name = "verify_api_key",
    requires = ["bootstrap"]
);

/// A key that verified.
#[derive(Clone)]
pub struct VerifiedKey {
    pub id: Uuid,
    pub user_id: Uuid,
    pub scope_id: Option<Uuid>,
    pub permissions: std::rc::Rc<crate::cache::Permissions>,
}

/// The verify path shared by every caller: format and checksum first (no table touched for
/// junk), then one indexed lookup, then a constant-time hash comparison.
pub fn verify(api_key: Option<&str>) -> Result<Option<VerifiedKey>> {
    let Some(api_key) = api_key else {
        return Ok(None);
    };
    // Opaque keys carry their lookup prefix; JWT keys are checked (signature, alg, type, exp)
    // and found by their jti. Anything else is rejected without touching a table.
    let prefix = match token::parse(api_key) {
        Ok(parsed) => parsed.prefix.to_string(),
        Err(_) => match crate::jwt_keys::lookup_prefix(api_key) {
            Some(prefix) => prefix,
            None => return Ok(None),
        },
    };
    let now = crate::lookup::now();
    if let Some(cached) = crate::cache::lookup(&prefix, api_key, now) {
        return Ok(cached.map(|(verified, due)| {
            if due && !crate::usage::record(verified.id, now) && crate::fallback_use::possible() {
                crate::fallback_use::record_at_commit(verified.id);
            }
            verified
        }));
    }
    let before = crate::cache::begin_lookup();
    // The index probes (src/lookup.rs); the same lookup as a prepared statement when they are
    // switched off or cannot find the extension's indexes.
    let find = || {
        if INDEX_PROBES.get() {
            if let Ok(found) = crate::lookup::find(&prefix) {
                return Ok(found);
            }
        }
        find_by_statement(&prefix)
    };
    // Only a lookup whose row may be cached needs a snapshot of its own.
    let found = if crate::cache::keys_enabled() {
        crate::cache::with_fresh_snapshot(before, find)?
    } else {
        find()?
    };
    verified_from_row(api_key, &prefix, now, before, found)
}

/// `keyhippo.verify_index_probes`: verify finds a key with two index probes (on, the default)
/// or with a prepared SQL statement (off: slower, for comparison; `make bench` measures both).
pub static INDEX_PROBES: pgrx::GucSetting<bool> = pgrx::GucSetting::<bool>::new(true);

const FIND_KEY: Plan = Plan {
    sql: "SELECT m.id, m.user_id, m.scope_id, m.last_used_at, m.expires_at, m.is_revoked, s.key_hash \
            FROM keyhippo.api_key_metadata m \
            JOIN keyhippo.api_key_secrets s ON s.key_metadata_id = m.id \
           WHERE m.prefix = $1",
    args: &[types::TEXT],
    mutating: false,
};

/// The key row with this prefix and its hash, through a prepared statement run as the
/// extension's owner (api_key_secrets is readable by no client role).
fn find_by_statement(prefix: &str) -> Result<Option<crate::lookup::KeyRow>> {
    crate::elevate::as_owner(|| {
        Spi::connect(|client| {
            let rows = FIND_KEY.run(client, &[prefix.into()])?;
            let Some(row) = rows.into_iter().next() else {
                return Ok(None);
            };
            let (Some(id), Some(user_id), Some(expires_at), Some(is_revoked)) = (
                row.get::<Uuid>(1)?,
                row.get::<Uuid>(2)?,
                row.get::<TimestampWithTimeZone>(5)?,
                row.get::<bool>(6)?,
            ) else {
                return Ok(None);
            };
            Ok(Some(crate::lookup::KeyRow {
                id,
                user_id,
                scope_id: row.get::<Uuid>(3)?,
                key_hash: row.get::<String>(7)?.unwrap_or_default(),
                expires_at: expires_at.into(),
                last_used_at: row.get::<TimestampWithTimeZone>(4)?.map(i64::from),
                is_revoked,
            }))
        })
    })
}

/// Microseconds between the Unix epoch and Postgres' (2000-01-01).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The checks of verify on a key row found by [`crate::lookup::find`]: not revoked, not expired,
/// the hash matches; then permissions, the cache, and recording the use at `now` (the
/// transaction's start, TimestampTz).
fn verified_from_row(
    api_key: &str,
    prefix: &str,
    now: i64,
    before: Option<u64>,
    found: Option<crate::lookup::KeyRow>,
) -> Result<Option<VerifiedKey>> {
    let Some(row) = found else { return Ok(None) };
    if row.is_revoked || row.expires_at <= now || !hash::verify_key(api_key, &row.key_hash) {
        return Ok(None);
    }
    let permissions = match crate::cache::permissions(&permissions_owner(row.user_id, row.scope_id))
    {
        Some(permissions) => permissions,
        None => crate::elevate::as_owner(|| fresh_permissions(row.user_id, row.scope_id))?,
    };
    let verified = VerifiedKey {
        id: row.id,
        user_id: row.user_id,
        scope_id: row.scope_id,
        permissions,
    };
    let due = crate::usage::due(row.last_used_at, now);
    if due && !crate::usage::record(row.id, now) && crate::fallback_use::possible() {
        crate::fallback_use::record_at_commit(row.id);
    }
    let used_at = match row.last_used_at {
        Some(used) if !due => used,
        _ => now,
    };
    crate::cache::store(
        before,
        prefix,
        &row.key_hash,
        &verified,
        row.expires_at + POSTGRES_EPOCH_MICROS,
        used_at,
    );
    Ok(Some(verified))
}

fn permissions_owner(user_id: Uuid, scope_id: Option<Uuid>) -> crate::cache::PermissionsOf {
    match scope_id {
        Some(scope) => crate::cache::PermissionsOf::ScopedKey {
            scope: *scope.as_bytes(),
            user: *user_id.as_bytes(),
        },
        None => crate::cache::PermissionsOf::User(*user_id.as_bytes()),
    }
}

/// The permissions a key carries at this moment: its scope's that its owner holds now (a scope
/// narrows, never widens), or for an unscoped key its owner's RBAC permissions; with no key
/// (`scope_id` None) the user's. From the per-backend cache when it holds them, else read (under
/// a snapshot of their own when the result may be cached: see [`crate::cache`]).
pub(crate) fn fresh_permissions(
    user_id: Uuid,
    scope_id: Option<Uuid>,
) -> Result<std::rc::Rc<crate::cache::Permissions>> {
    let owner = permissions_owner(user_id, scope_id);
    if let Some(permissions) = crate::cache::permissions(&owner) {
        return Ok(permissions);
    }
    let before = crate::cache::begin_lookup();
    let names = crate::cache::with_fresh_snapshot(before, || {
        Spi::connect(|client| {
            let rows = match scope_id {
                Some(scope) => SCOPED_PERMISSIONS.run(client, &[scope.into(), user_id.into()])?,
                None => context::USER_PERMISSIONS.run(client, &[user_id.into()])?,
            };
            Ok(rows.first().get::<Vec<String>>(1)?.unwrap_or_default())
        })
    })?;
    let permissions = crate::cache::Permissions::new(names);
    crate::cache::store_permissions(before, owner, &permissions);
    Ok(permissions)
}

/// Revokes a key: true when this call revoked it, false when it was already revoked. Raises
/// P0002 for a key that does not exist or is not the caller's (admins may revoke any key).
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn revoke_api_key(api_key_id: Option<Uuid>) -> bool {
    let _audit = function_scope("revoke_api_key");
    or_raise(revoke_impl(api_key_id))
}

fn revoke_impl(api_key_id: Option<Uuid>) -> Result<bool> {
    let id = api_key_id.ok_or_else(|| {
        KeyhippoError::InvalidArgument("keyhippo: api_key_id must not be NULL".into())
    })?;
    let manager = Manager::current()?;
    Spi::connect_mut(|client| {
        let row = REVOKE.run(client, &manager.args(id))?.first();
        let revoked = row.get::<bool>(1)?.unwrap_or(false);
        let visible = row.get::<bool>(2)?.unwrap_or(false);
        match (revoked, visible) {
            (true, _) => Ok(true),
            (false, true) => Ok(false),
            (false, false) => Err(key_not_found()),
        }
    })
}

/// Replaces a key with a new one of the same owner, description, scope, claims and lifetime,
/// and revokes the old one, atomically.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_api_key(
    old_api_key_id: Option<Uuid>,
) -> TableIterator<'static, (name!(new_api_key, String), name!(new_api_key_id, Uuid))> {
    let _audit = function_scope("rotate_api_key");
    TableIterator::once(or_raise(rotate_impl(old_api_key_id)))
}

fn rotate_impl(old_api_key_id: Option<Uuid>) -> Result<(String, Uuid)> {
    let id = old_api_key_id.ok_or_else(|| {
        KeyhippoError::InvalidArgument("keyhippo: old_api_key_id must not be NULL".into())
    })?;
    let manager = Manager::current()?;
    let user = manager.user;
    Spi::connect_mut(|client| {
        let old = ROTATE_SOURCE.run(client, &manager.args(id))?.first();
        if old.is_empty() {
            return Err(key_not_found());
        }
        if old.get::<bool>(5)?.unwrap_or(false) {
            return Err(KeyhippoError::WrongState(
                "keyhippo: the API key is revoked and cannot be rotated; create a new key instead"
                    .into(),
            ));
        }
        let owner = old.get::<Uuid>(1)?.expect("user_id is NOT NULL");
        let scope_id = old.get::<Uuid>(2)?;
        let description = old.get::<String>(3)?;
        let claims = old.get::<JsonB>(4)?;
        let expires_at = old.get::<TimestampWithTimeZone>(6)?;
        let is_jwt = old
            .get::<String>(7)?
            .is_some_and(|p| p.starts_with(crate::jwt_keys::PREFIX));
        let created = if is_jwt {
            crate::jwt_keys::insert_jwt_key(
                client,
                owner,
                scope_id,
                description.as_deref(),
                claims,
                expires_at,
            )?
        } else {
            let new = NewKey {
                user_id: owner,
                scope_id,
                description: description.as_deref(),
                claims,
                expires_at,
            };
            insert_key(client, new, user)?
        };
        REVOKE.run(client, &manager.args(id))?;
        Ok(created)
    })
}

/// Replaces a key's claims (a JSON object) for its owner or an admin. Called by
/// `keyhippo.update_key_claims` (sql/finalize.sql), which checks the document's shape first: the
/// conversion of the argument to JSON here cannot report a document nested too deep as the
/// caller's error.
#[pg_extern(
    volatile,
    security_definer,
    parallel_unsafe,
    schema = "keyhippo_internal"
)]
#[search_path(pg_catalog, pg_temp)]
fn update_key_claims(key_id: Option<Uuid>, new_claims: Option<JsonB>) {
    let _audit = function_scope("update_key_claims");
    or_raise(update_claims_impl(key_id, new_claims))
}

fn update_claims_impl(key_id: Option<Uuid>, new_claims: Option<JsonB>) -> Result<()> {
    let id = key_id.ok_or_else(|| {
        KeyhippoError::InvalidArgument("keyhippo: key_id must not be NULL".into())
    })?;
    let claims = new_claims.ok_or_else(|| {
        KeyhippoError::InvalidArgument("keyhippo: new_claims must not be NULL".into())
    })?;
    if !claims.0.is_object() {
        return Err(KeyhippoError::InvalidArgument(
            "keyhippo: new_claims must be a JSON object".into(),
        ));
    }
    if claims.0.to_string().len() > MAX_CLAIMS_BYTES {
        return Err(KeyhippoError::InvalidArgument(format!(
            "keyhippo: new_claims is larger than {MAX_CLAIMS_BYTES} bytes"
        )));
    }
    let manager = Manager::current()?;
    Spi::connect_mut(|client| {
        let [key, user, is_admin] = manager.args(id);
        if UPDATE_CLAIMS
            .run(client, &[key, user, is_admin, claims.into()])?
            .is_empty()
        {
            Err(key_not_found())
        } else {
            Ok(())
        }
    })
}
