//! Impersonation for the database owner: `login_as_user`, `login_as_anon` and `logout`
//! (procedures in sql/finalize.sql) call these, through src/api/impersonation.rs.
//!
//! An impersonation belongs to the backend that logged in: it is held in this backend's memory
//! (who, and since when: it lasts one hour), so another session, even of the same role, neither
//! sees it nor ends it. `keyhippo_impersonation.impersonation_state` and the audit log only record
//! it.

use pgrx::prelude::*;
use pgrx::{register_xact_callback, PgXactCallbackEvent};
use std::cell::Cell;

use crate::error::{KeyhippoError, Result};
use crate::pg::backend;
use crate::pg::elevate::as_owner;
use crate::pg::plans::{types, Plan};
use crate::users;

/// The user id recorded for `login_as_anon` (KeyHippo's convention): an anonymous session.
pub const ANON_USER_ID: [u8; 16] = [0; 16];

/// How long an impersonation lasts (TimestampTz microseconds).
const LIFETIME_MICROS: i64 = 3600 * 1_000_000;

/// An impersonation of this backend.
#[derive(Clone, Copy)]
struct Impersonation {
    user: [u8; 16],
    /// When it started (TimestampTz).
    since: i64,
}

thread_local! {
    static ACTIVE: Cell<Option<Impersonation>> = const { Cell::new(None) };
}

/// Sets this backend's impersonation; if the transaction that set it aborts, the previous one
/// comes back.
fn set_active(new: Option<Impersonation>) {
    let previous = ACTIVE.with(|a| a.replace(new));
    register_xact_callback(PgXactCallbackEvent::Abort, move || {
        ACTIVE.with(|a| a.set(previous))
    });
}

/// Whether the record of this session's impersonation of $1 says it is over (older than an
/// hour): an operator ends impersonations early by back-dating their records.
const RECORD_EXPIRED: Plan = Plan {
    sql: "SELECT EXISTS (SELECT 1 FROM keyhippo_impersonation.impersonation_state s \
                          WHERE s.impersonated_user_id = $1 AND s.original_role = session_user \
                            AND s.impersonation_time <= pg_catalog.now() - interval '1 hour')",
    args: &[types::UUID],
    mutating: false,
};

/// The user this backend is impersonating, if an impersonation started here is still active
/// (less than one hour old, not logged out, and not a `login_as_anon`).
pub fn impersonated_user() -> Result<Option<pgrx::Uuid>> {
    let Some(active) = ACTIVE.with(Cell::get) else {
        return Ok(None);
    };
    let now = backend::clock();
    if now - active.since >= LIFETIME_MICROS || active.user == ANON_USER_ID {
        return Ok(None);
    }
    let user = pgrx::Uuid::from_bytes(active.user);
    let expired = as_owner(|| {
        Spi::connect(|client| {
            Ok(RECORD_EXPIRED
                .run(client, &[user.into()])?
                .first()
                .get::<bool>(1)?
                .unwrap_or(false))
        })
    })?;
    Ok((!expired).then_some(user))
}

const SESSION_IS_OWNER: Plan = Plan {
    sql: "SELECT r.rolsuper OR d.datdba = r.oid \
            FROM pg_catalog.pg_roles r, pg_catalog.pg_database d \
           WHERE r.rolname = session_user AND d.datname = pg_catalog.current_database()",
    args: &[],
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
             WHERE impersonated_user_id = $1 AND original_role = session_user) \
          INSERT INTO keyhippo.audit_log (action, table_name, data, user_id, function_name) \
          VALUES ('impersonation_end', 'impersonation_state', \
                  pg_catalog.jsonb_build_object('impersonated_user_id', $1, \
                                                'original_role', session_user), \
                  NULL, 'logout')",
    args: &[types::UUID],
    mutating: true,
};

pub fn begin(user_id: Option<pgrx::Uuid>) -> Result<()> {
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
                if !users::exists(client, user)? {
                    return Err(KeyhippoError::NotFound(format!(
                        "keyhippo: user {user} does not exist"
                    )));
                }
                (user, "login_as_user")
            }
            None => (pgrx::Uuid::from_bytes(ANON_USER_ID), "login_as_anon"),
        };
        BEGIN.run(client, &[target.into(), function.into()])?;
        set_active(Some(Impersonation {
            user: *target.as_bytes(),
            since: backend::clock(),
        }));
        Ok(())
    })
}

pub fn end() -> Result<()> {
    let Some(active) = ACTIVE.with(Cell::get) else {
        return Err(KeyhippoError::WrongState(
            "keyhippo: this session is not impersonating anyone".into(),
        ));
    };
    let user = pgrx::Uuid::from_bytes(active.user);
    Spi::connect_mut(|client| Ok::<_, KeyhippoError>(END.run(client, &[user.into()])?.len()))?;
    set_active(None);
    Ok(())
}
