//! Safe wrappers around the backend state and services keyhippo reads or calls: clocks,
//! settings, the current database and role, transaction state, latches, sleeping, exit
//! callbacks. Each is a plain read or a call that PostgreSQL makes safe to do at any point of a
//! SQL function or background worker.

use pgrx::datum::Interval;
use pgrx::pg_sys;
use pgrx::PgTryBuilder;
use std::ffi::{CStr, CString};

/// The transaction's start time (what `now()` returns), as TimestampTz microseconds.
pub fn transaction_start() -> i64 {
    // SAFETY: plain read of transaction state.
    unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }
}

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
pub const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// The current time in microseconds since the Unix epoch (windows of rate limits, refills and
/// usage hours are aligned to it).
pub fn unix_micros() -> i64 {
    clock() + POSTGRES_EPOCH_MICROS
}

/// The current time (what `clock_timestamp()` returns), as TimestampTz microseconds.
pub fn clock() -> i64 {
    // SAFETY: reads the clock.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// The current (sub)transaction's id within its top transaction (1 for the top level).
pub fn subtransaction_id() -> u32 {
    // SAFETY: plain read of transaction state.
    unsafe { pg_sys::GetCurrentSubTransactionId() }
}

/// The OID of the database this backend is connected to (0 for none).
pub fn database_id() -> u32 {
    // SAFETY: plain read of backend state.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

/// This process's id.
pub fn process_id() -> i32 {
    // SAFETY: plain read of backend state.
    unsafe { pg_sys::MyProcPid }
}

/// Whether this server is a hot standby (or still replaying WAL).
pub fn in_recovery() -> bool {
    // SAFETY: reads shared recovery state.
    unsafe { pg_sys::RecoveryInProgress() }
}

/// Whether this server runs under `pg_upgrade` (binary-upgrade mode).
pub fn binary_upgrade() -> bool {
    // SAFETY: a postmaster global set from its command line.
    unsafe { pg_sys::IsBinaryUpgrade }
}

/// Whether the library is being loaded through `shared_preload_libraries` right now.
pub fn preloading() -> bool {
    // SAFETY: a postmaster global, read during library load.
    unsafe { pg_sys::process_shared_preload_libraries_in_progress }
}

/// Whether the transaction reads with one snapshot throughout (REPEATABLE READ, SERIALIZABLE).
pub fn snapshot_is_transaction_wide() -> bool {
    // SAFETY: reads backend-local transaction state.
    unsafe { pg_sys::XactIsoLevel >= pg_sys::XACT_REPEATABLE_READ as i32 }
}

/// Whether the transaction may write and commit a write without a serialization failure of
/// its own making: not READ ONLY, not a hot standby, not SERIALIZABLE.
pub fn may_write_freely() -> bool {
    // SAFETY: reads of backend-local state.
    unsafe {
        !pg_sys::XactReadOnly
            && !pg_sys::RecoveryInProgress()
            && pg_sys::XactIsoLevel < pg_sys::XACT_SERIALIZABLE as i32
    }
}

/// Raises the error an INSERT gets (25006) in a READ ONLY transaction or on a hot standby,
/// naming `function`.
pub fn prevent_write(function: &str) {
    let function = CString::new(function).unwrap_or_default();
    // SAFETY: plain checks of transaction state; they raise an ERROR naming the function.
    unsafe {
        pg_sys::PreventCommandIfReadOnly(function.as_ptr());
        pg_sys::PreventCommandDuringRecovery(function.as_ptr());
    }
}

/// Runs `f` under a snapshot taken now (a registered copy of the latest one), pushed and popped
/// around it; an ERROR inside leaves it to the transaction's abort, which unwinds the stack.
pub fn with_latest_snapshot<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: as above.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetLatestSnapshot()) };
    let result = f();
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    result
}

/// Runs `f` under the transaction's snapshot (after commit has released the statement's).
pub fn with_transaction_snapshot<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: as in `with_latest_snapshot`.
    unsafe { pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot()) };
    let result = f();
    // SAFETY: pops the snapshot pushed above.
    unsafe { pg_sys::PopActiveSnapshot() };
    result
}

/// The value of a setting as bytes (None when unset), handed to `f` without a copy: the
/// pointer into GUC storage stays valid until the setting changes, which `f` must not do.
pub fn with_setting<R>(name: &CStr, f: impl FnOnce(Option<&[u8]>) -> R) -> R {
    // SAFETY: GetConfigOption with missing_ok returns NULL or a NUL-terminated string owned by
    // guc.c, only read here.
    unsafe {
        let value = pg_sys::GetConfigOption(name.as_ptr(), true, false);
        if value.is_null() {
            f(None)
        } else {
            f(Some(CStr::from_ptr(value).to_bytes()))
        }
    }
}

/// Whether this statement is loading a dump: a `COPY ... FROM` run with `row_security = off`,
/// which is how `pg_restore` and a plain-format `pg_dump` script load every table. keyhippo's
/// triggers then neither audit, notify, nor assign roles (the dump already holds what they
/// wrote), and rows that `CREATE EXTENSION` made are merged instead of duplicated. Only roles
/// that bypass row level security can load rows this way.
pub fn restoring() -> bool {
    let row_security_off = with_setting(c"row_security", |v| v == Some(b"off".as_slice()));
    if !row_security_off {
        return false;
    }
    // SAFETY: debug_query_string is NULL or the NUL-terminated text of the statement the
    // backend is running, set by the protocol loop for the whole statement; only read here.
    let query = unsafe {
        let text = pg_sys::debug_query_string;
        if text.is_null() {
            return false;
        }
        CStr::from_ptr(text).to_bytes()
    };
    let start = query
        .iter()
        .position(|b| !b.is_ascii_whitespace())
        .unwrap_or(query.len());
    let query = &query[start..];
    query.len() >= 5
        && query[..5].eq_ignore_ascii_case(b"COPY ")
        && query.windows(6).any(|w| w.eq_ignore_ascii_case(b" FROM "))
}

/// Whether `CREATE EXTENSION` (or `ALTER EXTENSION ... UPDATE`) is running its script.
pub fn creating_extension() -> bool {
    // SAFETY: a backend-local flag set by the extension machinery; only read here.
    unsafe { pg_sys::creating_extension }
}

/// The value of a setting, or None when it is unset or empty.
pub fn setting(name: &str) -> Option<String> {
    let name = CString::new(name).ok()?;
    with_setting(&name, |value| {
        value
            .filter(|v| !v.is_empty())
            .map(|v| String::from_utf8_lossy(v).into_owned())
    })
}

/// The role the session acts as outside SECURITY DEFINER functions (`SET ROLE anon` in
/// PostgREST's transaction): its name, empty for a role dropped meanwhile.
pub fn outer_role_name() -> String {
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

/// Whether the role the session acts as outside SECURITY DEFINER functions is a superuser.
pub fn outer_role_is_superuser() -> bool {
    // SAFETY: plain reads of backend-local state and the syscache.
    unsafe { pg_sys::superuser_arg(pg_sys::GetOuterUserId()) }
}

/// The first TimestampTz PostgreSQL cannot hold (its `END_TIMESTAMP`), in microseconds since
/// 2000-01-01.
const END_TIMESTAMP: i128 =
    (pg_sys::TIMESTAMP_END_JULIAN as i128 - pg_sys::POSTGRES_EPOCH_JDATE as i128) * 86_400_000_000;

/// `timestamp + interval`, computed as PostgreSQL adds an interval (months and days in the
/// session's time zone). None when the sum might not be a timestamp PostgreSQL can hold (with
/// a margin for months of 31 days and a daylight-saving hour), instead of an ERROR.
pub fn plus_interval(timestamp: i64, interval: Interval) -> Option<i64> {
    let room = END_TIMESTAMP - timestamp as i128 - 86_400_000_000;
    if interval.as_micros().saturating_mul(31) / 30 >= room {
        return None;
    }
    let mut interval = interval.into_inner();
    // SAFETY: a built-in function called with a TimestampTz and a pointer to an Interval that
    // outlives the call; the result is a by-value TimestampTz.
    unsafe {
        pgrx::fcinfo::direct_function_call_as_datum(
            pg_sys::timestamptz_pl_interval,
            &[
                Some(pg_sys::Datum::from(timestamp)),
                Some(pg_sys::Datum::from(std::ptr::addr_of_mut!(interval))),
            ],
        )
        .map(|sum| sum.value() as i64)
    }
}

/// An interval written as PostgreSQL reads one (`'100 years'`, `'P30D'`, ...); None when the
/// text is not an interval.
pub fn parse_interval(text: &str) -> Option<Interval> {
    let text = CString::new(text).ok()?;
    PgTryBuilder::new(|| {
        // SAFETY: interval_in reads the NUL-terminated text (typmod -1: no field restriction)
        // and returns a palloc'd Interval, copied out before the memory goes.
        unsafe {
            let datum = pgrx::fcinfo::direct_function_call_as_datum(
                pg_sys::interval_in,
                &[
                    Some(pg_sys::Datum::from(text.as_ptr())),
                    Some(pg_sys::Datum::from(pg_sys::InvalidOid)),
                    Some(pg_sys::Datum::from(-1i32)),
                ],
            )?;
            let value = *(datum.cast_mut_ptr::<pg_sys::Interval>());
            Interval::new(value.month, value.day, value.time).ok()
        }
    })
    .catch_others(|_| None)
    .execute()
}

/// This process's latch, as an address other processes can set (it is in shared memory).
pub fn my_latch() -> usize {
    // SAFETY: MyProc is this process's PGPROC, in shared memory for the life of the server.
    unsafe { std::ptr::addr_of_mut!((*pg_sys::MyProc).procLatch) as usize }
}

/// Sets the latch at `latch` (from [`my_latch`] of some process); 0 is no latch.
pub fn set_latch(latch: usize) {
    if latch != 0 {
        // SAFETY: the address of a latch in shared memory; setting a latch its owner has left
        // is harmless.
        unsafe { pg_sys::SetLatch(latch as *mut pg_sys::Latch) };
    }
}

/// Sleeps without reacting to latches.
pub fn sleep_micros(micros: i64) {
    // SAFETY: a plain sleep.
    unsafe { pg_sys::pg_usleep(micros as _) };
}

/// Reloads the configuration file, as every process does on SIGHUP.
pub fn reload_config() {
    // SAFETY: as the main loop of every backend does after SIGHUP.
    unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
}

/// Sends this process's table statistics (background workers report them only when asked).
pub fn report_stats() {
    // SAFETY: outside any transaction, as the main loop of every backend calls it.
    unsafe { pg_sys::pgstat_report_stat(true) };
}

/// Rolls back the failed transaction, as a backend's error recovery does.
pub fn abort_transaction() {
    // SAFETY: called after an ERROR was caught inside a transaction of a background worker.
    unsafe { pg_sys::AbortCurrentTransaction() };
}

static mut EXIT_CALLBACK: Option<fn(u32)> = None;

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn run_exit_callback(_code: i32, arg: pg_sys::Datum) {
    // SAFETY: set once by `before_exit` before this is registered; single-threaded process.
    if let Some(callback) = unsafe { EXIT_CALLBACK } {
        callback(arg.value() as u32);
    }
}

/// Runs `callback(arg)` when this process exits, however it exits (before shared memory is
/// detached). One callback per process.
pub fn before_exit(callback: fn(u32), arg: u32) {
    // SAFETY: a single-threaded process registering its own exit callback.
    unsafe {
        EXIT_CALLBACK = Some(callback);
        pg_sys::before_shmem_exit(Some(run_exit_callback), pg_sys::Datum::from(arg));
    }
}

/// What `pg_database` says of a database.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum DatabaseState {
    Connectable,
    /// A template, or connections are not allowed.
    Closed,
    Gone,
}

/// Reads database `oid`'s row of `pg_database` (a shared catalog: readable with no database
/// connection). Inside a transaction.
pub fn database_state(oid: u32) -> DatabaseState {
    // SAFETY: a syscache lookup, released before returning.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::DATABASEOID as i32,
            pg_sys::Datum::from(pg_sys::Oid::from(oid)),
        );
        if tuple.is_null() {
            return DatabaseState::Gone;
        }
        let form = pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
        let state = if (*form).datistemplate || !(*form).datallowconn {
            DatabaseState::Closed
        } else {
            DatabaseState::Connectable
        };
        pg_sys::ReleaseSysCache(tuple);
        state
    }
}

/// The name of database `oid`, None when it is gone. Inside a transaction.
pub fn database_name(oid: u32) -> Option<String> {
    // SAFETY: a catalog lookup; NULL when the database is gone.
    unsafe {
        let name = pg_sys::get_database_name(pg_sys::Oid::from(oid));
        (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
    }
}
