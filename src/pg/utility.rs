//! A `ProcessUtility` hook that lets the statements needing a database to themselves (no other
//! session connected: `DROP DATABASE`, `ALTER DATABASE ... RENAME` / `SET TABLESPACE`,
//! `CREATE DATABASE ... TEMPLATE`) tell keyhippo's background workers to leave that database
//! first.

use pgrx::prelude::*;

/// What runs around such a statement: `before(database)` before it runs; `after(database,
/// dropped)` once it has run or failed (`dropped`: the database is gone).
struct Handlers {
    before: fn(u32),
    after: fn(u32, bool),
}

static mut HANDLERS: Option<Handlers> = None;
static mut PREV_UTILITY: pg_sys::ProcessUtility_hook_type = None;

/// Installs the hook (from `_PG_init` while preloading).
pub fn install(before: fn(u32), after: fn(u32, bool)) {
    // SAFETY: library load in the postmaster, single-threaded: the hook chains the one
    // installed before.
    unsafe {
        HANDLERS = Some(Handlers { before, after });
        PREV_UTILITY = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(step_aside);
    }
}

/// Calls `after` when the statement has run, or when its ERROR unwinds through the hook.
struct After {
    database: u32,
    dropped: bool,
    after: fn(u32, bool),
}

impl Drop for After {
    fn drop(&mut self) {
        (self.after)(self.database, self.dropped);
    }
}

/// The database a utility statement needs to itself (no other session connected): DROP
/// DATABASE, ALTER DATABASE ... RENAME and SET TABLESPACE, CREATE DATABASE ... TEMPLATE.
unsafe fn needs_database_alone(stmt: *mut pg_sys::Node) -> Option<pg_sys::Oid> {
    unsafe {
        let name: *const std::ffi::c_char = if pgrx::is_a(stmt, pg_sys::NodeTag::T_DropdbStmt) {
            (*(stmt as *mut pg_sys::DropdbStmt)).dbname
        } else if pgrx::is_a(stmt, pg_sys::NodeTag::T_RenameStmt) {
            let rename = stmt as *mut pg_sys::RenameStmt;
            if (*rename).renameType != pg_sys::ObjectType::OBJECT_DATABASE {
                return None;
            }
            (*rename).subname
        } else if pgrx::is_a(stmt, pg_sys::NodeTag::T_AlterDatabaseStmt) {
            let alter = stmt as *mut pg_sys::AlterDatabaseStmt;
            option((*alter).options, c"tablespace")?;
            (*alter).dbname
        } else if pgrx::is_a(stmt, pg_sys::NodeTag::T_CreatedbStmt) {
            let create = stmt as *mut pg_sys::CreatedbStmt;
            option((*create).options, c"template")?
        } else {
            return None;
        };
        if name.is_null() {
            return None;
        }
        let oid = pg_sys::get_database_oid(name, true);
        (oid != pg_sys::InvalidOid).then_some(oid)
    }
}

/// The string value of option `name` in a list of DefElem, if present.
unsafe fn option(
    options: *mut pg_sys::List,
    name: &std::ffi::CStr,
) -> Option<*const std::ffi::c_char> {
    unsafe {
        let options = pgrx::PgList::<pg_sys::DefElem>::from_pg(options);
        let found = options.iter_ptr().find_map(|def| {
            let matches = !(*def).defname.is_null()
                && std::ffi::CStr::from_ptr((*def).defname) == name
                && !(*def).arg.is_null();
            matches.then(|| pg_sys::defGetString(def) as *const std::ffi::c_char)
        });
        found
    }
}

#[pg_guard]
#[allow(clippy::too_many_arguments)] // ProcessUtility_hook's signature
unsafe extern "C-unwind" fn step_aside(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    unsafe {
        let stmt = (*pstmt).utilityStmt;
        let dropping = pgrx::is_a(stmt, pg_sys::NodeTag::T_DropdbStmt);
        let mut after = match (needs_database_alone(stmt), &*std::ptr::addr_of!(HANDLERS)) {
            (Some(oid), Some(handlers)) => {
                (handlers.before)(oid.to_u32());
                Some(After {
                    database: oid.to_u32(),
                    dropped: false,
                    after: handlers.after,
                })
            }
            _ => None,
        };
        match PREV_UTILITY {
            Some(prev) => prev(pstmt, query, read_only_tree, context, params, env, dest, qc),
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query,
                read_only_tree,
                context,
                params,
                env,
                dest,
                qc,
            ),
        }
        if let Some(after) = after.as_mut() {
            after.dropped = dropping;
        }
        drop(after);
    }
}
