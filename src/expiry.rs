//! The trigger that reports a key whose expiry a write moves into the notification window.
//!
//! In Rust, without a `WHEN` clause: Postgres parses a trigger's `WHEN` expression from its
//! stored text and compiles it again for every statement that fires it, and `create_api_key`
//! is one statement per key, so a `WHEN` clause cost about 6% of every create. Here the
//! common case (a key expiring more than a year from now, or an update that leaves `expires_at`
//! alone) is two integer comparisons; only a key that may be in the window runs SQL
//! (`keyhippo_internal.expiring_key_written`, sql/audit.sql), which reads the configured window
//! and reports the key.

use pgrx::pg_sys;

use crate::error::{or_raise, Result};
use crate::plans::{types, Plan};

/// The widest notification window (`key_expiry_notification_hours` is capped at a year): keys
/// expiring later than this are never in it.
const MAX_WINDOW_MICROS: i64 = 8760 * 3600 * 1_000_000;

const EXPIRING_KEY_WRITTEN: Plan = Plan {
    sql: "SELECT keyhippo_internal.expiring_key_written($1, $2, $3, $4, $5)",
    args: &[
        types::UUID,
        types::UUID,
        types::TEXT,
        types::TIMESTAMPTZ,
        types::TIMESTAMPTZ,
    ],
    mutating: true,
};

/// `AFTER INSERT OR UPDATE OF expires_at ON keyhippo.api_key_metadata FOR EACH ROW`.
#[pgrx::pg_guard]
#[no_mangle]
pub unsafe extern "C-unwind" fn keyhippo_notify_expiring_key(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the trigger manager through the V1 convention.
    unsafe {
        let td = crate::audit::row_trigger_data(fcinfo, "notify_expiring_key()");
        or_raise(check(td));
        pg_sys::Datum::from(0)
    }
}

unsafe fn check(td: *mut pg_sys::TriggerData) -> Result<()> {
    unsafe {
        let rel = (*td).tg_relation;
        let desc = (*rel).rd_att;
        let relid = (*rel).rd_id;
        let att = |name: &std::ffi::CStr| pg_sys::get_attnum(relid, name.as_ptr());
        let op = (*td).tg_event & pg_sys::TRIGGER_EVENT_OPMASK;
        let (new, old) = match op {
            pg_sys::TRIGGER_EVENT_INSERT => ((*td).tg_trigtuple, None),
            pg_sys::TRIGGER_EVENT_UPDATE => ((*td).tg_newtuple, Some((*td).tg_trigtuple)),
            _ => return Ok(()),
        };
        let expires_att = att(c"expires_at");
        let Some(expires_at) = crate::audit::column::<i64>(new, desc, expires_att) else {
            return Ok(());
        };
        let now = crate::lookup::now();
        if expires_at > now.saturating_add(MAX_WINDOW_MICROS) {
            return Ok(());
        }
        let old_expires_at = match old {
            Some(old) => {
                let previous = crate::audit::column::<i64>(old, desc, expires_att);
                if previous == Some(expires_at) {
                    return Ok(());
                }
                previous
            }
            None => None,
        };
        if crate::audit::column::<bool>(new, desc, att(c"is_revoked")).unwrap_or(false) {
            return Ok(());
        }
        let id = crate::audit::column::<pgrx::Uuid>(new, desc, att(c"id"));
        let user_id = crate::audit::column::<pgrx::Uuid>(new, desc, att(c"user_id"));
        let description = crate::audit::column::<String>(new, desc, att(c"description"));
        let timestamp = |micros: i64| pgrx::datum::TimestampWithTimeZone::try_from(micros).ok();
        crate::elevate::as_owner(|| {
            pgrx::spi::Spi::connect_mut(|client| {
                EXPIRING_KEY_WRITTEN
                    .run(
                        client,
                        &[
                            id.into(),
                            user_id.into(),
                            description.into(),
                            timestamp(expires_at).into(),
                            old_expires_at.and_then(timestamp).into(),
                        ],
                    )
                    .map(|_| ())
            })
        })
    }
}

v1_function_info!(pg_finfo_keyhippo_notify_expiring_key);
