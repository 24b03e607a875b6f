//! The one place where keyhippo's errors become Postgres ERRORs.
//!
//! Every error a caller can cause has a specific SQLSTATE and a message that names the problem.
//! Messages never carry a key, a hash, or anything about another user's keys.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug)]
pub enum KeyhippoError {
    /// No authenticated user in the request (28000).
    Unauthenticated(String),
    /// The request's subject is not a user of auth.users (28000).
    UnknownUser(String),
    /// The caller may not do this (42501).
    PermissionDenied(String),
    /// A malformed argument (22023).
    InvalidArgument(String),
    /// An unknown scope, or a key that does not exist or is not the caller's (P0002).
    NotFound(String),
    /// The object exists but is in the wrong state, e.g. rotating a revoked key (55000).
    WrongState(String),
    /// Something keyhippo does not do, e.g. preparing a transaction that spent credits (0A000).
    Unsupported(String),
    /// The library this server loaded is older than the SQL being installed needs (55000).
    LibraryOutdated(String),
    /// A bug or an unexpected database condition (XX000).
    Internal(String),
}

impl KeyhippoError {
    fn parts(&self) -> (PgSqlErrorCode, &str, Option<&'static str>) {
        use PgSqlErrorCode::*;
        match self {
            KeyhippoError::Unauthenticated(m) => (
                ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
                m,
                Some("Call as a signed-in user: request.jwt.claims must carry a \"sub\" that is a user id."),
            ),
            KeyhippoError::UnknownUser(m) => (
                ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
                m,
                Some("The JWT's \"sub\" names no row of auth.users; was the user deleted?"),
            ),
            KeyhippoError::PermissionDenied(m) => (ERRCODE_INSUFFICIENT_PRIVILEGE, m, None),
            KeyhippoError::InvalidArgument(m) => (ERRCODE_INVALID_PARAMETER_VALUE, m, None),
            KeyhippoError::NotFound(m) => (ERRCODE_NO_DATA_FOUND, m, None),
            KeyhippoError::WrongState(m) => (ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, m, None),
            KeyhippoError::Unsupported(m) => (ERRCODE_FEATURE_NOT_SUPPORTED, m, None),
            KeyhippoError::LibraryOutdated(m) => (
                ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                m,
                Some("A server keeps the keyhippo library it loaded at start (shared_preload_libraries) until it restarts: install the new version's files, restart the server, then run ALTER EXTENSION keyhippo UPDATE again."),
            ),
            KeyhippoError::Internal(m) => (ERRCODE_INTERNAL_ERROR, m, None),
        }
    }

    /// Raises the error as a Postgres ERROR; does not return.
    pub fn raise(self) -> ! {
        let (code, message, hint) = self.parts();
        let mut report = ErrorReport::new(code, message.to_string(), "keyhippo");
        if let Some(hint) = hint {
            report = report.set_hint(hint);
        }
        report.report(PgLogLevel::ERROR);
        unreachable!("an ERROR report does not return")
    }
}

impl From<pgrx::spi::SpiError> for KeyhippoError {
    fn from(e: pgrx::spi::SpiError) -> Self {
        KeyhippoError::Internal(format!("keyhippo: SPI failure: {e}"))
    }
}

pub type Result<T> = std::result::Result<T, KeyhippoError>;

/// Longest part of a caller-supplied name an error message repeats.
const ECHO_CHARS: usize = 64;

/// A caller-supplied name as an error message repeats it: escaped, and cut to its first
/// [`ECHO_CHARS`] characters (with "..." when cut), so that no message grows with the input.
pub fn echo(name: &str) -> String {
    let mut shown: String = name
        .chars()
        .take(ECHO_CHARS)
        .collect::<String>()
        .escape_default()
        .to_string();
    if name.chars().nth(ECHO_CHARS).is_some() {
        shown.push_str("...");
    }
    shown
}

/// Unwraps a result, raising the error as a Postgres ERROR.
pub fn or_raise<T>(r: Result<T>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => e.raise(),
    }
}
