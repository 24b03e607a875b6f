//! Which keyhippo function caused a change, for the audit log.
//!
//! The Rust functions mark themselves with [`function_scope`] while they run; the audit trigger
//! (sql/audit.sql) asks `keyhippo_internal.calling_function()`. SQL functions say the same with
//! a `SET keyhippo_audit.function_name = '...'` clause, which the trigger reads as a fallback.

use std::cell::Cell;

thread_local! {
    static CURRENT: Cell<Option<&'static str>> = const { Cell::new(None) };
    /// The id of a key row whose INSERT audit row its creator writes itself (see [`self_audited`]).
    static SELF_AUDITED: Cell<Option<[u8; 16]>> = const { Cell::new(None) };
}

/// The keyhippo function running now, if any.
pub fn current_function() -> Option<&'static str> {
    CURRENT.with(|c| c.get())
}

/// Tells the audit trigger that the INSERT of key row `id` is audited by the statement that
/// inserts it (create writes the key, its hash and its audit row in one statement, which saves
/// the trigger a second statement). Only that row, only for its INSERT, only while the guard
/// lives.
pub fn self_audited(id: [u8; 16]) -> SelfAudited {
    SELF_AUDITED.with(|c| c.set(Some(id)));
    SelfAudited
}

pub struct SelfAudited;

impl Drop for SelfAudited {
    fn drop(&mut self) {
        SELF_AUDITED.with(|c| c.set(None));
    }
}

/// Marks `name` as the function running until the guard is dropped (also on error: a Postgres
/// ERROR unwinds through Rust frames in pgrx).
pub fn function_scope(name: &'static str) -> FunctionScope {
    let previous = CURRENT.with(|c| c.replace(Some(name)));
    FunctionScope { previous }
}

pub struct FunctionScope {
    previous: Option<&'static str>,
}

impl Drop for FunctionScope {
    fn drop(&mut self) {
        CURRENT.with(|c| c.set(self.previous));
    }
}

// ---------------------------------------------------------------------------------------------
// The audit trigger

use pgrx::JsonB;
use serde_json::{Map, Value};

use crate::caller;
use crate::error::Result;
use crate::pg::backend;
use crate::pg::elevate::as_owner;
use crate::pg::plans::{types, Plan};
use crate::pg::trigger::{Event, RowTrigger};

const INSERT_AUDIT: Plan = Plan {
    sql: "INSERT INTO keyhippo.audit_log (id, action, table_name, data, user_id, function_name) \
          VALUES ($1, $2, $3, $4, $5, $6)",
    args: &[
        types::UUID,
        types::TEXT,
        types::TEXT,
        types::JSONB,
        types::UUID,
        types::TEXT,
    ],
    mutating: true,
};

/// Whether a config key names a secret: its value is masked in the audit log.
fn names_secret(key: Option<&Value>) -> bool {
    let key = key
        .and_then(Value::as_str)
        .unwrap_or("")
        .to_ascii_lowercase();
    ["secret", "token", "password", "credential"]
        .iter()
        .any(|w| key.contains(w))
}

fn mask_secret_value(row: &mut Value) {
    if names_secret(row.get("key")) {
        if let Some(obj) = row.as_object_mut() {
            obj.insert("value".into(), Value::String("***".into()));
        }
    }
}

/// The function named by a `SET keyhippo_audit.function_name` clause, if any.
fn function_name_setting() -> Option<String> {
    backend::setting("keyhippo_audit.function_name")
}

/// One audit row per INSERT, UPDATE and DELETE on keyhippo's tables (AFTER ... FOR EACH ROW):
/// action, table, old and new row as JSON, the acting user (request context; NULL for the
/// database owner) and the keyhippo function that caused it. An UPDATE of api_key_metadata that
/// changes only last_used_at (recording a use) writes nothing; config values whose key names a
/// secret are masked. The row is written with the extension owner's rights (src/pg/elevate.rs).
///
/// In Rust rather than PL/pgSQL: it runs for every key created, where PL/pgSQL's interpreter
/// set-up would be a large share of `create_api_key`.
pub fn record_change(trigger: &RowTrigger<'_>) -> Result<()> {
    let event = trigger.event();
    if event == Event::Other {
        return Ok(());
    }
    // A dump being loaded already holds the audit rows of what it loads, and the defaults that
    // CREATE EXTENSION writes are the extension's set-up, not a change anyone made: a restored
    // database's audit log is exactly the original's.
    if backend::restoring() || backend::creating_extension() {
        return Ok(());
    }
    let table = trigger.table();
    let (old, new) = (trigger.old_row(), trigger.new_row());
    if event == Event::Insert && table == "api_key_metadata" {
        if let (Some(skip), Some(new)) = (SELF_AUDITED.with(|c| c.get()), &new) {
            let id = new.get::<pgrx::Uuid>(c"id");
            if id.is_some_and(|id| *id.as_bytes() == skip) {
                return Ok(());
            }
        }
    }
    // Recording a use (verify's synchronous fallback, flush_key_usage) changes only
    // last_used_at: known from the stored values, without building the rows' JSON.
    if table == "api_key_metadata" {
        if let (Some(o), Some(n)) = (&old, &new) {
            if o.same_except(n, c"last_used_at") {
                return Ok(());
            }
        }
    }
    let mut old = old.map(|row| row.json()).transpose()?;
    let mut new = new.map(|row| row.json()).transpose()?;
    if table == "api_key_metadata" {
        if let (Some(Value::Object(o)), Some(Value::Object(n))) = (&old, &new) {
            let differs = o
                .iter()
                .any(|(k, v)| k != "last_used_at" && n.get(k) != Some(v));
            if !differs {
                return Ok(());
            }
        }
    }
    if table == "config" {
        old.iter_mut()
            .chain(new.iter_mut())
            .for_each(mask_secret_value);
    }
    let mut data = Map::new();
    if let Some(old) = old {
        data.insert("old_data".into(), old);
    }
    if let Some(new) = new {
        data.insert("new_data".into(), new);
    }
    let user = caller::current_user()?;
    let function = current_function()
        .map(str::to_string)
        .or_else(function_name_setting);
    let id = pgrx::Uuid::from_bytes(keyhippo_core::uuid::new_v7());
    as_owner(|| {
        pgrx::spi::Spi::connect_mut(|client| {
            INSERT_AUDIT
                .run(
                    client,
                    &[
                        id.into(),
                        event.name().into(),
                        table.as_str().into(),
                        JsonB(Value::Object(data)).into(),
                        user.into(),
                        function.into(),
                    ],
                )
                .map(|_| ())
        })
    })
}
