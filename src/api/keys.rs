//! The key lifecycle as SQL functions: create, verify, revoke, rotate, update claims, and the
//! checks behind the key table's CHECK constraints.
//!
//! `create_api_key` and `verify_api_key` are hand-written V1 functions returning a named row type
//! (src/pg/srf.rs says why); the others are `#[pg_extern]`. All but verify are SECURITY DEFINER
//! with `search_path` pinned to `pg_catalog, pg_temp`.

use pgrx::datum::{Interval, TimestampWithTimeZone};
use pgrx::prelude::*;
use pgrx::{Array, JsonB, Uuid};

use crate::audit::function_scope;
use crate::error::or_raise;
use crate::pg::jsonb;
use crate::pg::srf::{self, Column};
use crate::{import, issue, leaks, manage, validate, verify};

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

/// Why a key is or is not accepted: always one row, never an error for bad input. The key's
/// columns are filled only when its secret matched (VALID, EXPIRED, DISABLED, RATE_LIMITED);
/// permissions only for a VALID key. Costs what verify_api_key costs, records a use of a valid
/// key as it does, and counts the request against the key's rate limits.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn keyhippo_verify_api_key_status(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the executor through the V1 convention, as declared below.
    unsafe {
        srf::one_row(fcinfo, "verify_api_key_status", |args| {
            let status = or_raise(verify::admit(args.text(0)));
            let name = Column::Text(status.name().to_string());
            let uuid = |u: &Uuid| Column::Uuid(*u.as_bytes());
            let scope = |s: &Option<Uuid>| s.as_ref().map_or(Column::Null, uuid);
            Some(match &status {
                verify::Status::Valid { key, expires_at } => vec![
                    name,
                    uuid(&key.id),
                    uuid(&key.user_id),
                    scope(&key.scope_id),
                    Column::Permissions(key.permissions.clone()),
                    Column::Timestamp(*expires_at),
                ],
                verify::Status::Expired(key)
                | verify::Status::Disabled(key)
                | verify::Status::RateLimited(key)
                | verify::Status::UsageExceeded(key) => vec![
                    name,
                    uuid(&key.id),
                    uuid(&key.user_id),
                    scope(&key.scope_id),
                    Column::Null,
                    Column::Timestamp(key.expires_at),
                ],
                verify::Status::NotFound => vec![
                    name,
                    Column::Null,
                    Column::Null,
                    Column::Null,
                    Column::Null,
                    Column::Null,
                ],
            })
        })
    }
}

v1_function_info!(pg_finfo_keyhippo_verify_api_key_status);

extension_sql!(
    r#"
CREATE TYPE keyhippo.verify_api_key_status_result AS (
    status text, api_key_id uuid, user_id uuid, scope_id uuid, permissions text[],
    expires_at timestamptz);
COMMENT ON TYPE keyhippo.verify_api_key_status_result IS
    'The row verify_api_key_status returns: VALID, NOT_FOUND, EXPIRED, DISABLED or RATE_LIMITED, and the key when its secret matched.';
CREATE FUNCTION keyhippo."verify_api_key_status"("api_key" text)
    RETURNS SETOF keyhippo.verify_api_key_status_result
    LANGUAGE c VOLATILE PARALLEL UNSAFE ROWS 1
    AS 'MODULE_PATHNAME', 'keyhippo_verify_api_key_status';
COMMENT ON FUNCTION keyhippo.verify_api_key_status(text) IS
    'Exactly one row: status VALID, NOT_FOUND, EXPIRED, DISABLED or RATE_LIMITED (the request is counted against the key''s rate limits); the key''s id, owner, scope and expiry only when its secret matched, its permissions only when VALID.';
"#,
    name = "verify_api_key_status",
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

/// Disables a key: it stops verifying, keeps its hash, and [`enable_api_key`] brings it back.
/// True when this call disabled it, false when it was already disabled (or is revoked); P0002
/// for a key that does not exist or is not the caller's (admins may disable any key).
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn disable_api_key(api_key_id: Option<Uuid>) -> bool {
    let _audit = function_scope("disable_api_key");
    or_raise(manage::set_disabled(api_key_id, true))
}

/// Enables a disabled key again: true when this call enabled it, false when it was not
/// disabled; P0002 as for [`disable_api_key`]; 55000 for a revoked key.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn enable_api_key(api_key_id: Option<Uuid>) -> bool {
    let _audit = function_scope("enable_api_key");
    or_raise(manage::set_disabled(api_key_id, false))
}

/// Replaces a key with a new one of the same owner, description, scope, claims and lifetime.
/// The old key is revoked at once, or, with a `grace_period`, keeps working until it ends.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_api_key(
    old_api_key_id: Option<Uuid>,
    grace_period: default!(Option<Interval>, "'0'"),
) -> TableIterator<'static, (name!(new_api_key, String), name!(new_api_key_id, Uuid))> {
    let _audit = function_scope("rotate_api_key");
    TableIterator::once(or_raise(manage::rotate(old_api_key_id, grace_period)))
}

/// Imports a key issued by another system as its hash, so that the plaintext its holder has
/// verifies from then on; returns the new key's id. For service_role and admins.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn import_api_key(
    p_user_id: Option<Uuid>,
    p_key_hash: Option<&str>,
    p_prefix: Option<&str>,
    p_description: Option<&str>,
    p_expires_at: default!(Option<TimestampWithTimeZone>, "NULL"),
    p_scope_name: default!(Option<&str>, "NULL"),
    p_claims: default!(Option<JsonB>, "'{}'"),
) -> Uuid {
    let _audit = function_scope("import_api_key");
    or_raise(import::import(import::Imported {
        user_id: p_user_id,
        key_hash: p_key_hash,
        prefix: p_prefix,
        description: p_description,
        expires_at: p_expires_at,
        scope_name: p_scope_name,
        claims: p_claims,
    }))
}

/// Revokes, with the reason `leaked`, every key of `api_keys` whose secret matches a key this
/// database holds, and tells its owner (an audit row, a NOTIFY on `keyhippo_key_leaked`, the
/// audit webhook when configured). Returns nothing either way: it cannot be used to test keys.
/// For anyone who found keys where they should not be, so anon may call it.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn report_leaked_keys(api_keys: Option<Array<&str>>) {
    let _audit = function_scope("report_leaked_keys");
    if let Some(keys) = api_keys {
        or_raise(leaks::report(keys.len(), keys.iter()));
    }
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
