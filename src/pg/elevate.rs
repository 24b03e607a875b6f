//! Running a few internal statements with the extension owner's rights, from a function that is
//! not SECURITY DEFINER.
//!
//! `verify_api_key` runs on every request, and the `SET search_path` clause of a SECURITY DEFINER
//! function adds a GUC nesting level, a re-parse of the path and its undoing at exit to every
//! call. Verify's common path needs no privileges: the key row and hash are read through
//! the access methods (src/pg/lookup.rs), which do no ACL checks, and permissions come from the
//! per-backend cache. Only the rare paths that run SQL (permissions not cached yet, the
//! fallback `last_used_at` update) switch to the owner of the extension's tables with
//! `search_path` pinned, exactly as `fmgr_security_definer` does for a SECURITY DEFINER call.
//! If the statement raises, transaction (or subtransaction) abort restores the user id and the
//! GUC level, as it does for SECURITY DEFINER functions.

use pgrx::pg_sys;

use crate::error::{KeyhippoError, Result};

/// Runs `f` as the owner of keyhippo's tables, with `search_path = pg_catalog, pg_temp`.
pub fn as_owner<R>(f: impl FnOnce() -> Result<R>) -> Result<R> {
    let owner = super::lookup::owner().ok_or_else(|| {
        KeyhippoError::Internal(
            "keyhippo: keyhippo.api_key_secrets is missing; reinstall the extension".into(),
        )
    })?;
    // SAFETY: backend-local state changes, undone below on success and by the abort on error.
    unsafe {
        let mut saved_user = pg_sys::InvalidOid;
        let mut saved_context = 0;
        pg_sys::GetUserIdAndSecContext(&mut saved_user, &mut saved_context);
        // Inside keyhippo's own SECURITY DEFINER functions (create, revoke, ...) both are already
        // so: nothing to switch.
        if saved_user == owner && search_path_is_pinned() {
            return f();
        }
        let nest_level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            PINNED.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            0,
            false,
        );
        pg_sys::SetUserIdAndSecContext(
            owner,
            saved_context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        let result = f();
        pg_sys::SetUserIdAndSecContext(saved_user, saved_context);
        pg_sys::AtEOXact_GUC(true, nest_level);
        result
    }
}

/// The search_path every keyhippo statement runs under (also the `SET` clause of its SECURITY
/// DEFINER functions).
const PINNED: &std::ffi::CStr = c"pg_catalog, pg_temp";

fn search_path_is_pinned() -> bool {
    // SAFETY: the GUC's current string value, owned by guc.c.
    unsafe {
        let current = pg_sys::namespace_search_path;
        !current.is_null() && std::ffi::CStr::from_ptr(current) == PINNED
    }
}
