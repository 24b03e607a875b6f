//! JWT-format API keys as SQL: `create_jwt_api_key`, and the pre-request hook's test of a JWT
//! API key.

use pgrx::datum::Interval;
use pgrx::prelude::*;
use pgrx::Uuid;

use crate::audit::function_scope;
use crate::error::or_raise;
use crate::issue;

/// Creates a JWT-format API key for the current user: an HS256 token with claims `sub`,
/// `role`, `iat`, `exp`, `jti` and `type = 'api_key'`, returned once. With no `expires_in`
/// it lives a year, or `keyhippo.jwt_max_lifetime` when that is shorter.
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn create_jwt_api_key(
    description: Option<&str>,
    expires_in: default!(Option<Interval>, "NULL"),
    scope_name: default!(Option<&str>, "NULL"),
) -> TableIterator<'static, (name!(api_key, String), name!(api_key_id, Uuid))> {
    let _audit = function_scope("create_jwt_api_key");
    TableIterator::once(or_raise(issue::create_jwt(
        description,
        expires_in,
        scope_name,
    )))
}

#[pg_schema]
pub mod keyhippo_internal {
    use pgrx::prelude::*;

    use crate::jwt_keys::{claims_key, ClaimsKey};

    /// For the pre-request hook: false when request.jwt.claims is a JWT API key whose jti is
    /// unknown, revoked or expired.
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn jwt_api_key_active() -> bool {
        !matches!(crate::error::or_raise(claims_key()), ClaimsKey::Dead)
    }

    /// For the pre-request hook: NULL when request.jwt.claims is not a JWT API key; otherwise
    /// `NOT_FOUND` when its jti is unknown, revoked or expired, else `VALID`, `RATE_LIMITED` or
    /// `USAGE_EXCEEDED`, the request counted against the key's rate limits and credits (as
    /// `verify_api_key_status` does).
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn jwt_api_key_status() -> Option<&'static str> {
        use crate::error::or_raise;
        match or_raise(claims_key()) {
            ClaimsKey::NotAKey => None,
            ClaimsKey::Dead => Some("NOT_FOUND"),
            ClaimsKey::Live(key) => {
                let status = match or_raise(crate::limits::admit(key.id, key.user_id)) {
                    crate::limits::Admission::Admitted => "VALID",
                    crate::limits::Admission::RateLimited => "RATE_LIMITED",
                    crate::limits::Admission::UsageExceeded => "USAGE_EXCEEDED",
                };
                crate::usage_counts::count(key.id, status);
                Some(status)
            }
        }
    }
}
