//! Who is calling.
//!
//! The identity of a request is resolved in this order (KeyHippo's order):
//! 1. a valid API key in the `x-api-key` header (`request.headers`, set by PostgREST);
//! 2. the JWT `sub` of `request.jwt.claims`;
//! 3. an active impersonation started by the database owner in this backend.
//!
//! Empty or malformed settings count as absent, never as an error.

use pgrx::prelude::*;
use pgrx::JsonB;
use std::cell::RefCell;
use std::ffi::{CStr, CString};
use std::rc::Rc;

use crate::error::{or_raise, Result};
use crate::impersonation;
use crate::keys;
use crate::plans::{types, Plan};

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
    // SAFETY: GetConfigOption returns NULL or a pointer into GUC storage that stays valid until
    // the setting changes; it is only read here, before any other call.
    let raw = unsafe {
        let value = pg_sys::GetConfigOption(c"request.jwt.claims".as_ptr(), true, false);
        if value.is_null() {
            return None;
        }
        CStr::from_ptr(value).to_bytes()
    };
    if raw.is_empty() {
        return None;
    }
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

/// The API key in the request's `x-api-key` header, if any. PostgREST puts the headers,
/// lower-cased, as a JSON object in `request.headers`.
pub fn header_api_key() -> Option<String> {
    let headers: serde_json::Value = serde_json::from_str(&setting("request.headers")?).ok()?;
    match headers.get("x-api-key")? {
        serde_json::Value::String(key) => Some(key.clone()),
        _ => None,
    }
}

/// The resolved identity of a request.
pub struct Caller {
    pub user_id: pgrx::Uuid,
    /// Set when the identity came from a key (in the `x-api-key` header, or a JWT API key as the
    /// request's JWT): the key's row and scope.
    pub key: Option<keys::VerifiedKey>,
    /// Whether the identity is the `sub` of the request's own JWT (not a key, not an
    /// impersonation): only then does the JWT's `user_role` claim count.
    pub from_jwt: bool,
}

/// The user the request acts for, in KeyHippo's order: header key, JWT, impersonation.
pub fn current_caller() -> Result<Option<Caller>> {
    if let Some(key) = header_api_key() {
        if let Some(verified) = keys::verify(Some(&key))? {
            return Ok(Some(Caller {
                user_id: verified.user_id,
                key: Some(verified),
                from_jwt: false,
            }));
        }
    }
    // A JWT that is an API key counts only while its jti is live (revocation takes effect even
    // where the pre-request hook is not installed), and acts as that key: with its scope.
    if let Some(user_id) = jwt_subject() {
        return Ok(match crate::jwt_keys::claims_key()? {
            crate::jwt_keys::ClaimsKey::NotAKey => Some(Caller {
                user_id,
                key: None,
                from_jwt: true,
            }),
            crate::jwt_keys::ClaimsKey::Live(key) => Some(Caller {
                user_id,
                key: Some(key),
                from_jwt: false,
            }),
            crate::jwt_keys::ClaimsKey::Dead => None,
        });
    }
    if let Some(user_id) = impersonation::impersonated_user()? {
        return Ok(Some(Caller {
            user_id,
            key: None,
            from_jwt: false,
        }));
    }
    Ok(None)
}

/// The user id of the current request, if any.
pub fn current_user() -> Result<Option<pgrx::Uuid>> {
    Ok(current_caller()?.map(|c| c.user_id))
}

macro_rules! rbac_permissions_of {
    ($user:literal) => {
        concat!(
            "ARRAY(SELECT DISTINCT p.name::text \
                     FROM keyhippo_rbac.user_group_roles ugr \
                     JOIN keyhippo_rbac.role_permissions rp ON rp.role_id = ugr.role_id \
                     JOIN keyhippo_rbac.permissions p ON p.id = rp.permission_id \
                    WHERE ugr.user_id = ",
            $user,
            " ORDER BY 1)"
        )
    };
}

/// A scope's permissions that its key's owner also holds: a scope narrows, never widens.
macro_rules! scoped_permissions_of {
    ($scope:literal, $user:literal) => {
        concat!(
            "ARRAY(SELECT p.name::text \
                     FROM keyhippo.scope_permissions sp \
                     JOIN keyhippo_rbac.permissions p ON p.id = sp.permission_id \
                    WHERE sp.scope_id = ",
            $scope,
            " AND EXISTS (SELECT 1 \
                            FROM keyhippo_rbac.user_group_roles ugr \
                            JOIN keyhippo_rbac.role_permissions rp ON rp.role_id = ugr.role_id \
                           WHERE ugr.user_id = ",
            $user,
            " AND rp.permission_id = p.id) \
                    ORDER BY 1)"
        )
    };
}
pub(crate) use scoped_permissions_of;

pub(crate) const USER_PERMISSIONS: Plan = Plan {
    sql: concat!("SELECT ", rbac_permissions_of!("$1")),
    args: &[types::UUID],
    mutating: false,
};

/// Whether a role type named by the JWT's `user_role` claim grants a permission.
const ROLE_TYPE_GRANTS: Plan = Plan {
    sql: "SELECT EXISTS (SELECT 1 \
                           FROM keyhippo_rbac.roles r \
                           JOIN keyhippo_rbac.role_permissions rp ON rp.role_id = r.id \
                           JOIN keyhippo_rbac.permissions p ON p.id = rp.permission_id \
                          WHERE r.role_type::text = $1 AND p.name::text = $2)",
    args: &[types::TEXT, types::TEXT],
    mutating: false,
};

const KEY_DATA: Plan = Plan {
    sql: "SELECT pg_catalog.jsonb_build_object('id', m.id, 'description', m.description, \
                                               'claims', m.claims) \
            FROM keyhippo.api_key_metadata m WHERE m.id = $1",
    args: &[types::UUID],
    mutating: false,
};

/// Whether a user holds an RBAC role of type admin.
const USER_IS_ADMIN: Plan = Plan {
    sql: "SELECT EXISTS (SELECT 1 \
                           FROM keyhippo_rbac.user_group_roles ugr \
                           JOIN keyhippo_rbac.roles r ON r.id = ugr.role_id \
                          WHERE ugr.user_id = $1 AND r.role_type = 'admin')",
    args: &[types::UUID],
    mutating: false,
};

/// The permissions of the current request: a key's (its scope's intersected with its owner's
/// RBAC permissions, or for an unscoped key the owner's), or the user's RBAC permissions.
fn permissions_of(caller: &Caller) -> Result<std::rc::Rc<crate::cache::Permissions>> {
    if let Some(key) = &caller.key {
        return Ok(std::rc::Rc::clone(&key.permissions));
    }
    crate::keys::fresh_permissions(caller.user_id, None)
}

/// The app_role named by the JWT's `user_role` claim (Supabase custom access token hook).
fn jwt_user_role() -> Option<String> {
    match jwt_claims()?.get("user_role")? {
        serde_json::Value::String(role) if role == "admin" || role == "user" => Some(role.clone()),
        _ => None,
    }
}

/// Whether the role the request runs as administers everything: `service_role` or a superuser.
pub fn role_is_admin() -> bool {
    // SAFETY: plain reads of backend-local state and the syscache.
    caller_role() == "service_role" || unsafe { pg_sys::superuser_arg(pg_sys::GetOuterUserId()) }
}

/// Whether the current request is an administrator's: `service_role` or a superuser; or a user
/// holding an RBAC role of type admin, acting through their JWT, an impersonation or an
/// unscoped key of theirs; or a JWT whose own `sub` is the identity and whose `user_role` claim
/// is `admin`. A scoped key never is (it acts with its scope's permissions only), and a JWT's
/// `user_role` claim never lends its rights to a key presented beside it.
pub fn caller_is_admin() -> Result<bool> {
    if role_is_admin() {
        return Ok(true);
    }
    is_admin(current_caller()?.as_ref())
}

/// [`caller_is_admin`] for a caller already resolved (the role check aside).
pub fn is_admin(caller: Option<&Caller>) -> Result<bool> {
    if role_is_admin() {
        return Ok(true);
    }
    let Some(caller) = caller else {
        return Ok(false);
    };
    if caller.key.as_ref().is_some_and(|k| k.scope_id.is_some()) {
        return Ok(false);
    }
    if caller.from_jwt && jwt_user_role().as_deref() == Some("admin") {
        return Ok(true);
    }
    Spi::connect(|client| {
        Ok(USER_IS_ADMIN
            .run(client, &[caller.user_id.into()])?
            .first()
            .get::<bool>(1)?
            .unwrap_or(false))
    })
}

/// Whether the current request holds `permission`: through its API key (the scope's
/// permissions its owner holds), the user's RBAC roles, or the `user_role` claim of the JWT
/// whose `sub` is the identity.
pub fn has_permission(permission: &str) -> Result<bool> {
    let Some(caller) = current_caller()? else {
        return Ok(false);
    };
    if permissions_of(&caller)?
        .names
        .iter()
        .any(|p| p == permission)
    {
        return Ok(true);
    }
    if !caller.from_jwt {
        return Ok(false);
    }
    if let Some(role_type) = jwt_user_role() {
        return Spi::connect(|client| {
            Ok(ROLE_TYPE_GRANTS
                .run(client, &[role_type.as_str().into(), permission.into()])?
                .first()
                .get::<bool>(1)?
                .unwrap_or(false))
        });
    }
    Ok(false)
}

/// `{id, description, claims}` of the key in the `x-api-key` header, verified in full.
fn key_data() -> Result<Option<JsonB>> {
    let Some(key) = header_api_key() else {
        return Ok(None);
    };
    let Some(verified) = keys::verify(Some(&key))? else {
        return Ok(None);
    };
    Spi::connect(|client| {
        Ok(KEY_DATA
            .run(client, &[verified.id.into()])?
            .first()
            .get::<JsonB>(1)?)
    })
}

/// The identity of the current request: from a valid key in the `x-api-key` header, else the
/// JWT `sub`, else an active impersonation. Zero rows for an anonymous request.
// The row type must be spelled out with `name!` in the signature: pgrx reads the column names
// from it to write the SQL declaration, so it cannot be a type alias.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn current_user_context() -> TableIterator<
    'static,
    (
        name!(user_id, Option<pgrx::Uuid>),
        name!(scope_id, Option<pgrx::Uuid>),
        name!(permissions, Option<Vec<String>>),
    ),
> {
    let row = or_raise((|| -> Result<_> {
        let Some(caller) = current_caller()? else {
            return Ok(None);
        };
        let permissions = permissions_of(&caller)?.names.clone();
        let scope_id = caller.key.as_ref().and_then(|k| k.scope_id);
        Ok(Some((Some(caller.user_id), scope_id, Some(permissions))))
    })());
    match row {
        Some(row) => TableIterator::once(row),
        None => TableIterator::empty(),
    }
}

/// `{id, description, claims}` of the key in the request's `x-api-key` header after verifying
/// the whole key; NULL otherwise. (KeyHippo 1.2.5 matched the prefix alone.)
#[pg_extern(name = "key_data", volatile, security_definer, parallel_unsafe)]
#[search_path(pg_catalog, pg_temp)]
fn key_data_sql() -> Option<JsonB> {
    or_raise(key_data())
}

/// SQL helpers that RLS policies call; not a public API.
#[pg_schema]
pub mod keyhippo_internal {
    use pgrx::prelude::*;

    /// The user id of the current request (header key, JWT, impersonation), or NULL: what RLS
    /// policies compare `user_id` with.
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn current_user_id() -> Option<pgrx::Uuid> {
        crate::error::or_raise(super::current_user())
    }

    /// Whether the current request is an administrator's (see [`super::caller_is_admin`]): what
    /// RLS policies and the management functions ask.
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn caller_is_admin() -> bool {
        crate::error::or_raise(super::caller_is_admin())
    }

    /// Whether the current request holds a permission (`keyhippo.authorize` in SQL takes the
    /// enum and calls this).
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn has_permission(permission: &str) -> bool {
        crate::error::or_raise(super::has_permission(permission))
    }

    /// Whether the `x-api-key` header holds a valid, unrevoked, unexpired key (the pre-request
    /// hook's test for anonymous requests).
    #[pg_extern(volatile, security_definer, parallel_unsafe)]
    #[search_path(pg_catalog, pg_temp)]
    fn header_key_valid() -> bool {
        let key = super::header_api_key();
        key.is_some() && crate::error::or_raise(crate::keys::verify(key.as_deref())).is_some()
    }

    /// The app_role named by the JWT's `user_role` claim, if it names one.
    #[pg_extern(stable, parallel_safe)]
    fn jwt_user_role() -> Option<String> {
        super::jwt_user_role()
    }

    /// The role the request runs as, seen through SECURITY DEFINER functions.
    #[pg_extern(stable, parallel_safe)]
    fn caller_role_name() -> String {
        super::caller_role()
    }
}
