//! keyhippo: API keys issued, verified, rotated and revoked inside PostgreSQL.
//!
//! This file only wires modules together and orders the hand-written SQL around the functions
//! pgrx generates: `sql/bootstrap.sql` (schemas, types, tables) first, the Rust functions,
//! `sql/audit.sql` (audit trail, expiry notifications, webhook), then `sql/finalize.sql` (SQL
//! helpers, triggers, RLS, grants, defaults).

use pgrx::prelude::*;

::pgrx::pg_module_magic!(name, version);

/// Declares `pg_finfo_<function>`, the marker PostgreSQL looks up to call a hand-written
/// C-language function with the V1 convention (what `#[pg_extern]` generates for the others).
macro_rules! v1_function_info {
    ($marker:ident) => {
        #[no_mangle]
        pub extern "C" fn $marker() -> &'static ::pgrx::pg_sys::Pg_finfo_record {
            static V1: ::pgrx::pg_sys::Pg_finfo_record =
                ::pgrx::pg_sys::Pg_finfo_record { api_version: 1 };
            &V1
        }
    };
}

// SQL entry points (the functions CREATE EXTENSION declares).
mod api;

// The logic, one job per file; they import each other one way only (bin/check-layout checks it,
// docs/internals.md draws the graph).
mod audit;
mod cache;
mod caller;
mod credits;
mod expiry;
mod fallback_use;
mod impersonation;
mod import;
mod imported_keys;
mod issue;
mod jwt_keys;
mod leaks;
mod limits;
mod manage;
mod permissions;
mod request;
mod usage;
mod usage_counts;
mod users;
mod validate;
mod verify;
mod worker;

// Shared types, settings, errors, and the PostgreSQL glue (every `unsafe` call).
mod error;
mod model;
mod pg;
mod settings;

/// Runs when the library is loaded: defines the settings and, when loaded through
/// shared_preload_libraries, sets up shared memory and registers the background launcher.
#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    no_backtraces();
    settings::define();
    if pg::backend::preloading() {
        settings::define_for_preload();
        pg::shmem::setup();
        worker::register_launcher();
    }
}

/// pgrx's panic hook captures a Rust backtrace for every error that crosses a guarded function,
/// and reports it in the error's DETAIL whenever the server's environment enables backtraces
/// (`RUST_BACKTRACE=1`, common in a developer's shell). A caller must never see one: backtraces
/// are switched off for this library's whole process before any can be captured.
fn no_backtraces() {
    // RUST_LIB_BACKTRACE takes precedence over RUST_BACKTRACE for std::backtrace::Backtrace
    // (what the hook captures) and leaves panic messages alone. Postgres backends are
    // single-threaded, so changing the environment here races with nothing.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
}

extension_sql_file!("../sql/bootstrap.sql", name = "bootstrap", bootstrap);
extension_sql_file!(
    "../sql/audit.sql",
    name = "audit",
    requires = [
        "bootstrap",
        api::context::keyhippo_internal::current_user_id,
        api::triggers::keyhippo_internal::calling_function,
    ]
);
extension_sql_file!("../sql/finalize.sql", name = "finalize", finalize);

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
