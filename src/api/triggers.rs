//! The trigger functions on keyhippo's tables, and what the audit trigger asks.
//!
//! `audit_change` and `notify_expiring_key` are hand-written V1 trigger functions (declared in
//! sql/audit.sql); they hand a safe view of the trigger call (src/pg/trigger.rs) to the logic.

use pgrx::prelude::*;

use crate::error::or_raise;
use crate::pg::trigger::RowTrigger;
use crate::{audit, expiry};

/// One audit row per INSERT, UPDATE and DELETE on keyhippo's tables (see
/// [`audit::record_change`]).
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn keyhippo_audit_change(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: called by the trigger manager through the V1 convention.
    let trigger = unsafe { RowTrigger::from_call(fcinfo, "audit_change()") };
    or_raise(audit::record_change(&trigger));
    pg_sys::Datum::from(0)
}

v1_function_info!(pg_finfo_keyhippo_audit_change);

/// `AFTER INSERT OR UPDATE OF expires_at ON keyhippo.api_key_metadata FOR EACH ROW` (see
/// [`expiry::check`]).
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn keyhippo_notify_expiring_key(
    fcinfo: pg_sys::FunctionCallInfo,
) -> pg_sys::Datum {
    // SAFETY: called by the trigger manager through the V1 convention.
    let trigger = unsafe { RowTrigger::from_call(fcinfo, "notify_expiring_key()") };
    or_raise(expiry::check(&trigger));
    pg_sys::Datum::from(0)
}

v1_function_info!(pg_finfo_keyhippo_notify_expiring_key);

#[pg_schema]
pub mod keyhippo_internal {
    use pgrx::prelude::*;

    /// The keyhippo function (in Rust) currently changing data, if any.
    #[pg_extern(volatile, parallel_unsafe)]
    fn calling_function() -> Option<&'static str> {
        crate::audit::current_function()
    }

    /// Whether this statement is loading a dump (`COPY ... FROM` with `row_security = off`):
    /// keyhippo's triggers written in SQL then merge or skip rather than add rows.
    #[pg_extern(volatile, parallel_unsafe)]
    fn restoring() -> bool {
        crate::pg::backend::restoring()
    }

    /// Trigger function on every table verify reads: makes verified-key caches stale now and
    /// again once the transaction ends.
    #[pg_trigger]
    fn note_key_change<'a>(
        _trigger: &'a PgTrigger<'a>,
    ) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, PgTriggerError> {
        crate::cache::begin_change();
        Ok(None)
    }
}
