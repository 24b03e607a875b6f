//! Impersonation for the database owner: `login_as_user`, `login_as_anon` and `logout`
//! (procedures in sql/finalize.sql) call the functions here.
//!
//! An impersonation is recorded in `keyhippo_impersonation.impersonation_state` (for audit and
//! for the one-hour expiry) and in this backend's memory, so that only the backend that logged
//! in acts as the impersonated user: another session of the same owner is never affected.

use pgrx::prelude::*;
use std::cell::Cell;

use crate::error::{KeyhippoError, Result};
use crate::plans::{types, Plan};

/// The user id recorded for `login_as_anon` (KeyHippo's convention): an anonymous session.
pub const ANON_USER_ID: [u8; 16] = [0; 16];

thread_local! {
    static STARTED_HERE: Cell<bool> = const { Cell::new(false) };
}

const ACTIVE: Plan = Plan {
    sql: "SELECT s.impersonated_user_id FROM keyhippo_impersonation.impersonation_state s \
           WHERE s.original_role = session_user \
             AND s.impersonation_time > pg_catalog.now() - interval '1 hour' \
           ORDER BY s.impersonation_time DESC LIMIT 1",
    args: &[],
    mutating: false,
};

/// The user this backend is impersonating, if an impersonation started here is still active
/// (less than one hour old, not logged out, and not a `login_as_anon`).
pub fn impersonated_user() -> Result<Option<pgrx::Uuid>> {
    if !STARTED_HERE.with(Cell::get) {
        return Ok(None);
    }
    Spi::connect(|client| {
        let rows = ACTIVE.run(client, &[])?;
        if rows.is_empty() {
            return Ok(None);
        }
        Ok(rows
            .first()
            .get::<pgrx::Uuid>(1)?
            .filter(|u| *u.as_bytes() != ANON_USER_ID))
    })
}

const SESSION_IS_OWNER: Plan = Plan {
    sql: "SELECT r.rolsuper OR d.datdba = r.oid \
            FROM pg_catalog.pg_roles r, pg_catalog.pg_database d \
           WHERE r.rolname = session_user AND d.datname = pg_catalog.current_database()",
    args: &[],
    mutating: false,
};

const USER_EXISTS: Plan = Plan {
    sql: "SELECT keyhippo_internal.user_exists($1)",
    args: &[types::UUID],
    mutating: false,
};

const BEGIN: Plan = Plan {
    sql: "WITH s AS ( \
            INSERT INTO keyhippo_impersonation.impersonation_state \
                (impersonated_user_id, original_role, impersonation_time) \
            VALUES ($1, session_user, pg_catalog.now()) \
            ON CONFLICT (impersonated_user_id) DO UPDATE \
               SET original_role = EXCLUDED.original_role, \
                   impersonation_time = EXCLUDED.impersonation_time \
            RETURNING impersonated_user_id, original_role) \
          INSERT INTO keyhippo.audit_log (action, table_name, data, user_id, function_name) \
          SELECT 'impersonation_start', 'impersonation_state', \
                 pg_catalog.jsonb_build_object('impersonated_user_id', s.impersonated_user_id, \
                                               'original_role', s.original_role), \
                 NULL, $2 \
            FROM s",
    args: &[types::UUID, types::TEXT],
    mutating: true,
};

const END: Plan = Plan {
    sql: "WITH s AS ( \
            DELETE FROM keyhippo_impersonation.impersonation_state \
             WHERE original_role = session_user \
            RETURNING impersonated_user_id, original_role) \
          INSERT INTO keyhippo.audit_log (action, table_name, data, user_id, function_name) \
          SELECT 'impersonation_end', 'impersonation_state', \
                 pg_catalog.jsonb_build_object('impersonated_user_id', s.impersonated_user_id, \
                                               'original_role', s.original_role), \
                 NULL, 'logout' \
            FROM s \
          RETURNING id",
    args: &[],
    mutating: true,
};

fn begin(user_id: Option<pgrx::Uuid>) -> Result<()> {
    Spi::connect_mut(|client| {
        let owner = SESSION_IS_OWNER
            .run(client, &[])?
            .first()
            .get::<bool>(1)?
            .unwrap_or(false);
        if !owner {
            return Err(KeyhippoError::PermissionDenied(
                "keyhippo: only the database owner may impersonate users".into(),
            ));
        }
        let (target, function) = match user_id {
            Some(user) => {
                let exists = USER_EXISTS
                    .run(client, &[user.into()])?
                    .first()
                    .get::<bool>(1)?
                    .unwrap_or(false);
                if !exists {
                    return Err(KeyhippoError::NotFound(format!(
                        "keyhippo: user {user} does not exist"
                    )));
                }
                (user, "login_as_user")
            }
            None => (pgrx::Uuid::from_bytes(ANON_USER_ID), "login_as_anon"),
        };
        BEGIN.run(client, &[target.into(), function.into()])?;
        STARTED_HERE.with(|s| s.set(true));
        Ok(())
    })
}

fn end() -> Result<()> {
    let ended = Spi::connect_mut(|client| Ok::<_, KeyhippoError>(END.run(client, &[])?.len()))?;
    STARTED_HERE.with(|s| s.set(false));
    if ended == 0 {
        return Err(KeyhippoError::WrongState(
            "keyhippo: this session is not impersonating anyone".into(),
        ));
    }
    Ok(())
}

#[pg_schema]
pub mod keyhippo_impersonation {
    use pgrx::prelude::*;

    /// Records an impersonation of `user_id` (NULL: an anonymous session) by the session user,
    /// who must be a superuser or the database owner. Called by the login procedures.
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn begin_impersonation(user_id: Option<pgrx::Uuid>) {
        crate::error::or_raise(super::begin(user_id))
    }

    /// Ends this session's impersonation. Called by `logout()`.
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn end_impersonation() {
        crate::error::or_raise(super::end())
    }
}
