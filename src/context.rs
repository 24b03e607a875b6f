//! Who is calling: the JWT subject PostgREST (or app code) put in `request.jwt.claims`, and the
//! role the request runs as.

use pgrx::prelude::*;
use std::ffi::{CStr, CString};

/// The value of a setting, or None when it is unset or empty. PostgREST fills the `request.*`
/// settings per transaction; a pooled connection leaves them as '' afterwards, which means
/// "absent", never an error.
pub fn setting(name: &str) -> Option<String> {
    let name = CString::new(name).ok()?;
    // SAFETY: GetConfigOption returns NULL or a pointer into GUC storage that stays valid until
    // the setting changes; we copy it out at once.
    let value = unsafe { pg_sys::GetConfigOption(name.as_ptr(), true, false) };
    if value.is_null() {
        return None;
    }
    let value = unsafe { CStr::from_ptr(value) }.to_string_lossy();
    if value.is_empty() {
        None
    } else {
        Some(value.into_owned())
    }
}

/// The claims of the request's JWT as JSON, if any are set and parse as a JSON object.
pub fn jwt_claims() -> Option<serde_json::Map<String, serde_json::Value>> {
    match serde_json::from_str(&setting("request.jwt.claims")?) {
        Ok(serde_json::Value::Object(map)) => Some(map),
        _ => None,
    }
}

/// Parses a JWT subject into a UUID; anything that is not a canonical UUID is None.
pub fn parse_uuid(s: &str) -> Option<pgrx::Uuid> {
    keyhippo_core::uuid::parse(s).map(pgrx::Uuid::from_bytes)
}

/// The user the request acts for: the JWT `sub` (Supabase's legacy `request.jwt.claim.sub` is
/// honoured too, as `auth.uid()` does). A subject that is not a UUID means "nobody".
pub fn jwt_subject() -> Option<pgrx::Uuid> {
    if let Some(sub) = setting("request.jwt.claim.sub") {
        return parse_uuid(&sub);
    }
    match jwt_claims()?.get("sub")? {
        serde_json::Value::String(sub) => parse_uuid(sub),
        _ => None,
    }
}

/// The role the request runs as (`SET ROLE anon` in PostgREST's transaction). Unlike
/// `current_user`, this is not changed by entering a SECURITY DEFINER function, so our definer
/// functions see the real caller. (KeyHippo 1.2.5's pre-request hook reads `current_role` inside
/// a definer function and so always sees the owner.)
pub fn caller_role() -> String {
    // SAFETY: plain reads of backend-local state; GetUserNameFromId with noerr returns NULL for
    // a dropped role instead of raising.
    unsafe {
        let name = pg_sys::GetUserNameFromId(pg_sys::GetOuterUserId(), true);
        if name.is_null() {
            String::new()
        } else {
            CStr::from_ptr(name).to_string_lossy().into_owned()
        }
    }
}

/// SQL helpers that RLS policies call; not a public API.
#[pg_schema]
pub mod keyhippo_internal {
    use pgrx::prelude::*;

    /// The user id of the current request, or NULL: what RLS policies compare `user_id` with.
    #[pg_extern(stable, parallel_safe)]
    fn current_user_id() -> Option<pgrx::Uuid> {
        super::jwt_subject()
    }

    /// The role the request runs as, seen through SECURITY DEFINER functions.
    #[pg_extern(stable, parallel_safe)]
    fn caller_role_name() -> String {
        super::caller_role()
    }
}
