//! SPI statements prepared once per backend and kept for its lifetime.
//!
//! Backends are single-threaded, so a `thread_local!` is a per-backend cache. Plans are keyed by
//! their SQL text. Every statement names its objects fully, so a plan stays correct whatever the
//! caller's search_path; Postgres re-plans it by name if the tables are dropped and recreated
//! (DROP EXTENSION / CREATE EXTENSION in the same session).

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::PgOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiTupleTable};
use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use crate::error::Result;
use crate::model::KeyRow;

thread_local! {
    static PLANS: RefCell<HashMap<&'static str, Rc<OwnedPreparedStatement>>> =
        RefCell::new(HashMap::new());
}

/// A statement and the types of its parameters.
pub struct Plan {
    pub sql: &'static str,
    pub args: &'static [PgOid],
    /// Whether the statement writes (prepared with `prepare_mut`).
    pub mutating: bool,
}

impl Plan {
    /// Runs a statement that selects a key row and its hash (id, user_id, scope_id,
    /// last_used_at, expires_at, is_revoked, key_hash, disabled_at IS NOT NULL) and reads its
    /// first row; None when there is none.
    pub fn key_row(
        &self,
        client: &SpiClient<'_>,
        args: &[DatumWithOid<'_>],
    ) -> Result<Option<KeyRow>> {
        use pgrx::datum::TimestampWithTimeZone;
        use pgrx::Uuid;
        let rows = self.run(client, args)?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        let (Some(id), Some(user_id), Some(expires_at), Some(is_revoked)) = (
            row.get::<Uuid>(1)?,
            row.get::<Uuid>(2)?,
            row.get::<TimestampWithTimeZone>(5)?,
            row.get::<bool>(6)?,
        ) else {
            return Ok(None);
        };
        Ok(Some(KeyRow {
            id,
            user_id,
            scope_id: row.get::<Uuid>(3)?,
            key_hash: row.get::<String>(7)?.unwrap_or_default(),
            expires_at: expires_at.into(),
            last_used_at: row.get::<TimestampWithTimeZone>(4)?.map(i64::from),
            is_revoked,
            is_disabled: row.get::<bool>(8)?.unwrap_or(false),
        }))
    }

    /// Runs the statement with `args`, preparing and keeping it on first use.
    pub fn run<'conn>(
        &self,
        client: &SpiClient<'conn>,
        args: &[DatumWithOid<'_>],
    ) -> Result<SpiTupleTable<'conn>> {
        // The map is borrowed only to find or insert the plan, never while it runs: running a
        // statement can fire triggers that call back into keyhippo and run other plans.
        let cached = PLANS.with(|plans| plans.borrow().get(self.sql).cloned());
        let stmt = match cached {
            Some(stmt) => stmt,
            None => {
                let prepared = if self.mutating {
                    client.prepare_mut(self.sql, self.args)?
                } else {
                    client.prepare(self.sql, self.args)?
                };
                let stmt = Rc::new(prepared.keep());
                PLANS.with(|plans| plans.borrow_mut().insert(self.sql, Rc::clone(&stmt)));
                stmt
            }
        };
        Ok(client.select(&*stmt, None, args)?)
    }
}

const RELATION_EXISTS: Plan = Plan {
    sql: "SELECT pg_catalog.to_regclass($1) IS NOT NULL",
    args: &[types::TEXT],
    mutating: false,
};

/// Whether the relation `name` (schema-qualified) exists: how code that runs on the SQL of
/// several keyhippo versions (the library is newer until ALTER EXTENSION UPDATE) tells
/// whether a table of a later version is there.
pub fn relation_exists(client: &SpiClient<'_>, name: &str) -> Result<bool> {
    Ok(RELATION_EXISTS
        .run(client, &[name.into()])?
        .next()
        .and_then(|row| row.get::<bool>(1).ok().flatten())
        .unwrap_or(false))
}

pub mod types {
    use pgrx::pg_sys::{BuiltinOid, PgOid};
    pub const UUID: PgOid = PgOid::BuiltIn(BuiltinOid::UUIDOID);
    pub const BOOL: PgOid = PgOid::BuiltIn(BuiltinOid::BOOLOID);
    pub const TEXT: PgOid = PgOid::BuiltIn(BuiltinOid::TEXTOID);
    pub const JSONB: PgOid = PgOid::BuiltIn(BuiltinOid::JSONBOID);
    pub const TIMESTAMPTZ: PgOid = PgOid::BuiltIn(BuiltinOid::TIMESTAMPTZOID);
    pub const INTERVAL: PgOid = PgOid::BuiltIn(BuiltinOid::INTERVALOID);
    pub const UUID_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::UUIDARRAYOID);
    pub const TIMESTAMPTZ_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::TIMESTAMPTZARRAYOID);
    pub const TEXT_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::TEXTARRAYOID);
    pub const INT8_ARRAY: PgOid = PgOid::BuiltIn(BuiltinOid::INT8ARRAYOID);
}
