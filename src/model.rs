//! The values that pass between keyhippo's modules: a key row as verify reads it, a verified
//! key, its permissions, and who is calling. Plain data, importing nothing of keyhippo but the
//! datum helpers, so that every module can use them without importing another's logic.

use pgrx::pg_sys;
use pgrx::Uuid;
use std::rc::Rc;

/// What verify needs of one key row and its hash.
pub struct KeyRow {
    pub id: Uuid,
    pub user_id: Uuid,
    pub scope_id: Option<Uuid>,
    pub key_hash: String,
    /// Microseconds since 2000-01-01 (TimestampTz).
    pub expires_at: i64,
    pub last_used_at: Option<i64>,
    pub is_revoked: bool,
    /// Whether `disabled_at` is set (the key is disabled).
    pub is_disabled: bool,
}

/// A key that verified.
#[derive(Clone)]
pub struct VerifiedKey {
    pub id: Uuid,
    pub user_id: Uuid,
    pub scope_id: Option<Uuid>,
    pub permissions: Rc<Permissions>,
}

/// A key's permissions: the names, and the `text[]` value verify returns, built once per cached
/// set rather than at every verify.
pub struct Permissions {
    pub names: Vec<String>,
    /// The flat array varlena, in 8-byte words so that it is aligned as PostgreSQL expects.
    array: std::cell::OnceCell<Vec<u64>>,
}

impl Permissions {
    pub fn new(names: Vec<String>) -> Rc<Permissions> {
        Rc::new(Permissions {
            names,
            array: std::cell::OnceCell::new(),
        })
    }

    /// The names as a `text[]` datum pointing into this value: valid while it lives, for a
    /// caller that copies it (as a tuplestore does).
    pub fn array_datum(&self) -> pg_sys::Datum {
        let words = self
            .array
            .get_or_init(|| crate::pg::datum::text_array_words(&self.names));
        pg_sys::Datum::from(words.as_ptr())
    }
}

/// Whose permissions: a scoped key's (its scope's that its owner holds) or a user's RBAC
/// permissions.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub enum PermissionsOf {
    ScopedKey { scope: [u8; 16], user: [u8; 16] },
    User([u8; 16]),
}

impl PermissionsOf {
    /// Whose permissions a key of `user_id` with scope `scope_id` carries (or, with no scope,
    /// the user's own).
    pub fn key(user_id: Uuid, scope_id: Option<Uuid>) -> PermissionsOf {
        match scope_id {
            Some(scope) => PermissionsOf::ScopedKey {
                scope: *scope.as_bytes(),
                user: *user_id.as_bytes(),
            },
            None => PermissionsOf::User(*user_id.as_bytes()),
        }
    }
}

/// The resolved identity of a request.
pub struct Caller {
    pub user_id: Uuid,
    /// Set when the identity came from a key (in the `x-api-key` header, or a JWT API key as the
    /// request's JWT): the key's row and scope.
    pub key: Option<VerifiedKey>,
    /// Whether the identity is the JWT's own `sub` (a session, not a key and not an
    /// impersonation): only then may the JWT's `user_role` claim speak for it.
    pub from_jwt: bool,
}
