//! The library's version, and the check every upgrade script runs first: `ALTER EXTENSION
//! keyhippo UPDATE` on a server still running an older library (installed the new files, did
//! not restart) is refused with an error that says so, before the script creates anything.

use keyhippo_core::version::{self, Version};
use pgrx::prelude::*;

use crate::error::{echo, or_raise, KeyhippoError, Result};

/// The version of this library, as in Cargo.toml.
const LIBRARY_VERSION: &str = env!("CARGO_PKG_VERSION");

/// `keyhippo_internal.library_version()`: the version of the keyhippo library this backend
/// runs (which can differ from the extension's version in this database until
/// `ALTER EXTENSION keyhippo UPDATE`).
#[pg_extern(stable, parallel_safe, schema = "keyhippo_internal")]
fn library_version() -> &'static str {
    LIBRARY_VERSION
}

/// `keyhippo_internal.require_library(version)`: raises 55000 unless the library this backend
/// runs is `version` or newer. The first statement of every upgrade script.
#[pg_extern(stable, parallel_safe, schema = "keyhippo_internal")]
fn require_library(version: Option<&str>) {
    or_raise(check_library(LIBRARY_VERSION, version))
}

fn check_library(loaded: &str, required: Option<&str>) -> Result<()> {
    let required_text = required.unwrap_or_default();
    let Some(required) = Version::parse(required_text) else {
        return Err(KeyhippoError::InvalidArgument(format!(
            "keyhippo: \"{}\" is not a version (MAJOR.MINOR.PATCH)",
            echo(required_text)
        )));
    };
    let Some(loaded) = Version::parse(loaded) else {
        return Err(KeyhippoError::Internal(format!(
            "keyhippo: the library's own version \"{}\" does not parse",
            echo(loaded)
        )));
    };
    if version::satisfies(loaded, required) {
        Ok(())
    } else {
        Err(KeyhippoError::LibraryOutdated(format!(
            "keyhippo: this server runs keyhippo's library {loaded}, and the SQL being installed needs {required} or later"
        )))
    }
}
