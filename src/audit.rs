//! Which keyhippo function caused a change, for the audit log.
//!
//! The Rust functions mark themselves with [`function_scope`] while they run; the audit trigger
//! (sql/audit.sql) asks `keyhippo_internal.calling_function()`. SQL functions say the same with
//! a `SET keyhippo_audit.function_name = '...'` clause, which the trigger reads as a fallback.

use std::cell::Cell;

thread_local! {
    static CURRENT: Cell<Option<&'static str>> = const { Cell::new(None) };
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

#[pgrx::pg_schema]
pub mod keyhippo_internal {
    use pgrx::prelude::*;

    /// The keyhippo function (in Rust) currently changing data, if any.
    #[pg_extern(volatile, parallel_unsafe)]
    fn calling_function() -> Option<&'static str> {
        super::CURRENT.with(|c| c.get())
    }
}
