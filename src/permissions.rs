//! The permissions a key or a user holds, from RBAC: a scoped key has its scope's permissions
//! that its owner also holds (a scope narrows, never widens); an unscoped key and a user have the
//! user's RBAC permissions. Cached per backend (src/cache.rs).

use pgrx::prelude::*;
use pgrx::Uuid;
use std::rc::Rc;

use crate::cache;
use crate::error::Result;
use crate::model::{Permissions, PermissionsOf};
use crate::pg::plans::{types, Plan};

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

const USER_PERMISSIONS: Plan = Plan {
    sql: concat!("SELECT ", rbac_permissions_of!("$1")),
    args: &[types::UUID],
    mutating: false,
};

const SCOPED_PERMISSIONS: Plan = Plan {
    sql: concat!("SELECT ", scoped_permissions_of!("$1", "$2")),
    args: &[types::UUID, types::UUID],
    mutating: false,
};

/// The permissions a key carries at this moment: its scope's that its owner holds now (a scope
/// narrows, never widens), or for an unscoped key its owner's RBAC permissions; with no key
/// (`scope_id` None) the user's. From the per-backend cache when it holds them, else read (under
/// a snapshot of their own when the result may be cached: see [`crate::cache`]).
pub fn fresh(user_id: Uuid, scope_id: Option<Uuid>) -> Result<Rc<Permissions>> {
    let owner = PermissionsOf::key(user_id, scope_id);
    if let Some(permissions) = cache::permissions(&owner) {
        return Ok(permissions);
    }
    let before = cache::begin_lookup();
    let names = cache::with_fresh_snapshot(before, || {
        Spi::connect(|client| {
            let rows = match scope_id {
                Some(scope) => SCOPED_PERMISSIONS.run(client, &[scope.into(), user_id.into()])?,
                None => USER_PERMISSIONS.run(client, &[user_id.into()])?,
            };
            Ok(rows.first().get::<Vec<String>>(1)?.unwrap_or_default())
        })
    })?;
    let permissions = Permissions::new(names);
    cache::store_permissions(before, owner, &permissions);
    Ok(permissions)
}
