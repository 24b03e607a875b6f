//! The users keyhippo knows: the rows of `auth.users` where the database has Supabase's `auth`
//! schema, any user id otherwise (`keyhippo_internal.user_exists`, sql/bootstrap.sql).

use pgrx::spi::SpiClient;
use pgrx::Uuid;

use crate::error::Result;
use crate::pg::plans::{types, Plan};

const USER_EXISTS: Plan = Plan {
    sql: "SELECT keyhippo_internal.user_exists($1)",
    args: &[types::UUID],
    mutating: false,
};

/// Whether `user` is a user of this database.
pub fn exists(client: &SpiClient<'_>, user: Uuid) -> Result<bool> {
    Ok(USER_EXISTS
        .run(client, &[user.into()])?
        .first()
        .get::<bool>(1)?
        .unwrap_or(false))
}
