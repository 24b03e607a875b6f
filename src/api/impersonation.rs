//! The SQL functions behind the impersonation procedures (`login_as_user`, `login_as_anon`,
//! `logout` in sql/finalize.sql).

use pgrx::prelude::*;

#[pg_schema]
pub mod keyhippo_impersonation {
    use pgrx::prelude::*;

    /// Records an impersonation of `user_id` (NULL: an anonymous session) by the session user,
    /// who must be a superuser or the database owner. Called by the login procedures.
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn begin_impersonation(user_id: Option<pgrx::Uuid>) {
        crate::error::or_raise(crate::impersonation::begin(user_id))
    }

    /// Ends this session's impersonation. Called by `logout()`.
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn end_impersonation() {
        crate::error::or_raise(crate::impersonation::end())
    }
}
