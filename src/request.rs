//! What the request says about itself: the settings PostgREST fills in per transaction
//! (`request.jwt.claims`, `request.headers`) and the role it runs as.
//!
//! Empty or malformed settings count as absent, never as an error: a pooled connection leaves
//! the `request.*` settings as '' after a request.

use std::cell::RefCell;
use std::rc::Rc;

use crate::pg::backend;

pub use crate::pg::backend::setting;

type Claims = serde_json::Map<String, serde_json::Value>;
/// A `request.jwt.claims` text and what it parsed to (None: not a JSON object).
type ParsedClaims = (Vec<u8>, Option<Rc<Claims>>);

thread_local! {
    /// The last `request.jwt.claims` text this backend parsed, and what it parsed to. A pooled
    /// PostgREST connection sets the same claims for every statement of a request, and
    /// create, authorize and the RLS helpers each ask for them: the text is compared, not
    /// parsed again.
    static CLAIMS: RefCell<Option<ParsedClaims>> = const { RefCell::new(None) };
}

/// The claims of the request's JWT as JSON, if any are set and parse as a JSON object.
pub fn jwt_claims() -> Option<Rc<Claims>> {
    backend::with_setting(c"request.jwt.claims", |raw| {
        let raw = raw.filter(|raw| !raw.is_empty())?;
        CLAIMS.with(|cache| {
            if let Some((text, parsed)) = &*cache.borrow() {
                if text.as_slice() == raw {
                    return parsed.clone();
                }
            }
            let parsed = match serde_json::from_slice(raw) {
                Ok(serde_json::Value::Object(map)) => Some(Rc::new(map)),
                _ => None,
            };
            *cache.borrow_mut() = Some((raw.to_vec(), parsed.clone()));
            parsed
        })
    })
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
    backend::outer_role_name()
}

/// The API key in the request's `x-api-key` header, if any. PostgREST puts the headers,
/// lower-cased, as a JSON object in `request.headers`.
pub fn header_api_key() -> Option<String> {
    let headers: serde_json::Value = serde_json::from_str(&setting("request.headers")?).ok()?;
    match headers.get("x-api-key")? {
        serde_json::Value::String(key) => Some(key.clone()),
        _ => None,
    }
}

/// The app_role named by the JWT's `user_role` claim (Supabase custom access token hook).
pub fn jwt_user_role() -> Option<String> {
    match jwt_claims()?.get("user_role")? {
        serde_json::Value::String(role) if role == "admin" || role == "user" => Some(role.clone()),
        _ => None,
    }
}

/// Whether the role the request runs as administers everything: `service_role` or a superuser.
pub fn role_is_admin() -> bool {
    caller_role() == "service_role" || backend::outer_role_is_superuser()
}
