//! The request's identity as SQL: `current_user_context`, `key_data`, and the helpers RLS
//! policies and the pre-request hook call (`keyhippo_internal.*`).

use pgrx::prelude::*;
use pgrx::JsonB;

use crate::caller;
use crate::error::{or_raise, Result};

/// The identity of the current request: from a valid key in the `x-api-key` header, else the
/// JWT `sub`, else an active impersonation. Zero rows for an anonymous request.
// The row type must be spelled out with `name!` in the signature: pgrx reads the column names
// from it to write the SQL declaration, so it cannot be a type alias.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn current_user_context() -> TableIterator<
    'static,
    (
        name!(user_id, Option<pgrx::Uuid>),
        name!(scope_id, Option<pgrx::Uuid>),
        name!(permissions, Option<Vec<String>>),
    ),
> {
    let row = or_raise((|| -> Result<_> {
        let Some(caller) = caller::current_caller()? else {
            return Ok(None);
        };
        let permissions = caller::permissions_of(&caller)?.names.clone();
        let scope_id = caller.key.as_ref().and_then(|k| k.scope_id);
        Ok(Some((Some(caller.user_id), scope_id, Some(permissions))))
    })());
    match row {
        Some(row) => TableIterator::once(row),
        None => TableIterator::empty(),
    }
}

/// `{id, description, claims}` of the key in the request's `x-api-key` header after verifying
/// the whole key; NULL otherwise. (KeyHippo 1.2.5 matched the prefix alone.)
#[pg_extern(name = "key_data", volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn key_data_sql() -> Option<JsonB> {
    or_raise(caller::key_data())
}

/// SQL helpers that RLS policies call; not a public API.
#[pg_schema]
pub mod keyhippo_internal {
    use pgrx::prelude::*;

    /// The user id of the current request (header key, JWT, impersonation), or NULL: what RLS
    /// policies compare `user_id` with.
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn current_user_id() -> Option<pgrx::Uuid> {
        crate::error::or_raise(crate::caller::current_user())
    }

    /// Whether the current request is an administrator's (see [`crate::caller::caller_is_admin`]): what
    /// RLS policies and the management functions ask.
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn caller_is_admin() -> bool {
        crate::error::or_raise(crate::caller::caller_is_admin())
    }

    /// Whether the current request holds a permission (`keyhippo.authorize` in SQL takes the
    /// enum and calls this).
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn has_permission(permission: &str) -> bool {
        crate::error::or_raise(crate::caller::has_permission(permission))
    }

    /// The status of the key in the `x-api-key` header, as `verify_api_key_status` names it
    /// (`VALID`, `NOT_FOUND`, `EXPIRED`, `DISABLED`, `RATE_LIMITED`); NULL when the request
    /// carries none. The pre-request hook's test: it counts the request against the key's rate
    /// limits, as `verify_api_key_status` does.
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn header_key_status() -> Option<&'static str> {
        let key = crate::request::header_api_key()?;
        let status = crate::error::or_raise(crate::verify::admit(Some(&key)));
        Some(status.name())
    }

    /// The rate limit or shortage of credits that refused a request last in this transaction,
    /// for the 429 response of `check_request` and `spend_credits`: `{"limit": "key" | "owner" |
    /// "credits" | "server", "message", "details", "max_requests", "per" (seconds),
    /// "retry_after" (seconds; null when no refill will come), "left" (credits)}`; NULL when
    /// nothing refused.
    #[pg_extern(volatile, parallel_unsafe)]
    fn rate_limit_refusal() -> Option<pgrx::JsonB> {
        crate::limits::last_refusal().map(|r| pgrx::JsonB(refusal_json(&r)))
    }

    /// `keyhippo.spend_credits`'s work: `{"remaining": n}` (null: the key has no credits) or
    /// `{"refused": <refusal, as rate_limit_refusal>}`.
    #[pg_extern(volatile, parallel_unsafe)]
    fn spend_credits_now(p_cost: Option<i32>) -> pgrx::JsonB {
        pgrx::JsonB(match crate::error::or_raise(crate::limits::spend(p_cost)) {
            crate::limits::Spent::Left(left) => serde_json::json!({ "remaining": left }),
            crate::limits::Spent::Refused(r) => serde_json::json!({ "refused": refusal_json(&r) }),
        })
    }

    fn refusal_json(r: &crate::limits::Refusal) -> serde_json::Value {
        serde_json::json!({
            "limit": r.limit,
            "message": r.message(),
            "details": r.details(),
            "max_requests": r.rate.map(|r| r.max_requests),
            "per": r.rate.map(|r| r.per_us as f64 / 1_000_000.0),
            "retry_after": r.retry_after,
            "left": r.left,
        })
    }

    /// The app_role named by the JWT's `user_role` claim, if it names one.
    #[pg_extern(stable, parallel_safe)]
    fn jwt_user_role() -> Option<String> {
        crate::request::jwt_user_role()
    }

    /// The role the request runs as, seen through SECURITY DEFINER functions.
    #[pg_extern(stable, parallel_safe)]
    fn caller_role_name() -> String {
        crate::request::caller_role()
    }
}
