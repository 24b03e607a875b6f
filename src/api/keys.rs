//! The key lifecycle as SQL functions: create, verify, revoke, rotate, update claims, and the
//! checks behind the key table's CHECK constraints.
//!
//! `create_api_key` and `verify_api_key` are hand-written V1 functions returning a named row type
//! (src/pg/srf.rs says why); the others are `#[pg_extern]`. All but verify are SECURITY DEFINER
//! with `search_path` pinned to `pg_catalog, pg_temp`.

use pgrx::prelude::*;
use pgrx::{JsonB, Uuid};

use crate::audit::function_scope;
use crate::error::or_raise;
use crate::pg::jsonb;
use crate::pg::srf::{self, Column};
use crate::{issue, manage, validate, verify};

/// Creates an API key for the current user: one row (the plaintext key, shown once, and its
/// id). Only the key's hash is stored.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn keyhippo_create_api_key(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor through the V1 convention, as declared below.
    unsafe {
        srf::one_row(fcinfo, "create_api_key", |args| {
            let _audit = function_scope("create_api_key");
            let (api_key, id) =
                or_raise(issue::create(args.text(0), args.text(1), args.interval(2)));
            Some(vec![Column::Text(api_key), Column::Uuid(*id.as_bytes())])
        })
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
CREATE FUNCTION keyhippo."create_api_key"(
    "key_description" text, "scope_name" text DEFAULT NULL, "expires_in" interval DEFAULT NULL)
    RETURNS SETOF keyhippo.create_api_key_result
    LANGUAGE c VOLATILE SECURITY DEFINER PARALLEL UNSAFE ROWS 1
    SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'keyhippo_create_api_key';
COMMENT ON FUNCTION keyhippo.create_api_key(text, text, interval) IS
    'Creates an API key for the current user, living expires_in (keyhippo.default_key_lifetime when NULL); returns the plaintext key (once) and its id.';
"#,
    name = "create_api_key",
    requires = ["bootstrap"]
);

/// Verifies a key. One row (owner, scope, permissions) for a valid, unrevoked, unexpired key;
/// zero rows for anything else, including NULL, junk and keys of the wrong shape. Never raises
/// for bad input. Not SECURITY DEFINER, on purpose (src/verify.rs says why).
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn keyhippo_verify_api_key(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor through the V1 convention, as declared below.
    unsafe {
        srf::one_row(fcinfo, "verify_api_key", |args| {
            let v = or_raise(verify::verify(args.text(0)))?;
            Some(vec![
                Column::Uuid(*v.user_id.as_bytes()),
                v.scope_id
                    .map_or(Column::Null, |s| Column::Uuid(*s.as_bytes())),
                Column::Permissions(v.permissions),
            ])
        })
    }
}

v1_function_info!(pg_finfo_keyhippo_verify_api_key);

extension_sql!(
    r#"
-- The row type of verify_api_key: the columns KeyHippo 1.2.5's RETURNS TABLE declared. A named
-- composite type instead of OUT parameters because PostgreSQL rebuilds the result descriptor
-- of a function with OUT parameters from pg_proc at every execution of the calling statement,
-- while a composite type's comes from the type cache. Callers see the same columns:
-- SELECT * / user_id / (verify_api_key(k)).* alike.
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

/// Revokes a key: true when this call revoked it, false when it was already revoked. Raises
/// P0002 for a key that does not exist or is not the caller's (admins may revoke any key).
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn revoke_api_key(api_key_id: Option<Uuid>) -> bool {
    let _audit = function_scope("revoke_api_key");
    or_raise(manage::revoke(api_key_id))
}

/// Replaces a key with a new one of the same owner, description, scope, claims and lifetime,
/// and revokes the old one, atomically.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_api_key(
    old_api_key_id: Option<Uuid>,
) -> TableIterator<'static, (name!(new_api_key, String), name!(new_api_key_id, Uuid))> {
    let _audit = function_scope("rotate_api_key");
    TableIterator::once(or_raise(manage::rotate(old_api_key_id)))
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
    or_raise(manage::update_claims(key_id, new_claims))
}

/// `keyhippo_internal.claims_ok(jsonb)`: the claims rule of the table's CHECK constraint
/// (sql/finalize.sql). A hand-written V1 function: pgrx's conversion of a jsonb argument goes
/// through JSON text and a parser with a recursion limit, the very documents this refuses.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn keyhippo_claims_ok(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: called through the V1 convention with one non-NULL jsonb argument (STRICT).
    pg_sys::Datum::from(unsafe { jsonb::claims_argument_is_valid(fcinfo) })
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
    validate::description_is_valid(description)
}
