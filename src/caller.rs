//! Who is calling.
//!
//! The identity of a request is resolved in this order (KeyHippo's order):
//! 1. a valid API key in the `x-api-key` header (`request.headers`, set by PostgREST);
//! 2. the JWT `sub` of `request.jwt.claims` (a JWT API key acts as that key, while it is live);
//! 3. an active impersonation started by the database owner in this backend.

use pgrx::datum::DatumWithOid;
use pgrx::prelude::*;
use pgrx::{JsonB, Uuid};
use std::rc::Rc;

use crate::error::{KeyhippoError, Result};
use crate::jwt_keys::{self, ClaimsKey};
use crate::model::{Caller, Permissions};
use crate::pg::plans::{types, Plan};
use crate::request::{header_api_key, jwt_subject, jwt_user_role, role_is_admin};
use crate::{impersonation, permissions, verify};

/// The user the request acts for, in KeyHippo's order: header key, JWT, impersonation.
pub fn current_caller() -> Result<Option<Caller>> {
    if let Some(key) = header_api_key() {
        if let Some(verified) = verify::verify(Some(&key))? {
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
        return Ok(match jwt_keys::claims_key()? {
            ClaimsKey::NotAKey => Some(Caller {
                user_id,
                key: None,
                from_jwt: true,
            }),
            ClaimsKey::Live(key) => Some(Caller {
                user_id,
                key: Some(key),
                from_jwt: false,
            }),
            ClaimsKey::Dead => None,
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
pub fn permissions_of(caller: &Caller) -> Result<Rc<Permissions>> {
    if let Some(key) = &caller.key {
        return Ok(Rc::clone(&key.permissions));
    }
    permissions::fresh(caller.user_id, None)
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
pub fn key_data() -> Result<Option<JsonB>> {
    let Some(key) = header_api_key() else {
        return Ok(None);
    };
    let Some(verified) = verify::verify(Some(&key))? else {
        return Ok(None);
    };
    Spi::connect(|client| {
        Ok(KEY_DATA
            .run(client, &[verified.id.into()])?
            .first()
            .get::<JsonB>(1)?)
    })
}

fn unauthenticated() -> KeyhippoError {
    KeyhippoError::Unauthenticated("keyhippo: this function requires an authenticated user".into())
}

/// The calling user (header key, JWT or impersonation), or an error for requests that carry
/// none.
pub fn require_user() -> Result<Uuid> {
    current_user()?.ok_or_else(unauthenticated)
}

/// Who calls a management function: the calling user (None for an admin such as service_role
/// acting without one), and whether the caller is an admin. Both are always worked out, whatever
/// the key asked for, so every call runs the same statements.
pub struct Manager {
    pub user: Option<Uuid>,
    pub is_admin: bool,
}

impl Manager {
    pub fn current() -> Result<Manager> {
        let caller = current_caller()?;
        let is_admin = is_admin(caller.as_ref())?;
        let user = caller.map(|c| c.user_id);
        if user.is_none() && !is_admin {
            return Err(unauthenticated());
        }
        Ok(Manager { user, is_admin })
    }

    /// The arguments $1 (the key), $2 (the calling user) and $3 (is an admin) of the management
    /// statements.
    pub fn args(&self, key: Uuid) -> [DatumWithOid<'static>; 3] {
        [key.into(), self.user.into(), self.is_admin.into()]
    }
}
