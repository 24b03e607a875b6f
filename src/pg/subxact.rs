//! Running work in a subtransaction whose failure is discarded, the way PL/pgSQL's exception
//! blocks do.

use pgrx::prelude::*;
use pgrx::PgTryBuilder;

/// Runs `f` in an internal subtransaction: kept when `f` returns true, rolled back when it
/// returns false or raises an ERROR (which is then swallowed: nothing `f` leaves half-done
/// outlives the subtransaction). Returns whether it was kept.
pub fn discard_on_failure(f: impl FnOnce() -> bool) -> bool {
    // SAFETY: the pattern of PL/pgSQL's exception blocks: a subtransaction around the work, the
    // memory context and resource owner restored after it whichever way it ends.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);
        let kept = PgTryBuilder::new(std::panic::AssertUnwindSafe(f))
            .catch_others(|_| false)
            .execute();
        if kept {
            pg_sys::ReleaseCurrentSubTransaction();
        } else {
            pg_sys::RollbackAndReleaseCurrentSubTransaction();
        }
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
        kept
    }
}
