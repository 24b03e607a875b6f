//! The SQL entry points: every function keyhippo adds to the database, as thin wrappers that
//! turn SQL arguments into calls of the logic modules and errors into PostgreSQL ERRORs.

pub mod context;
pub mod impersonation;
pub mod jwt;
pub mod keys;
pub mod triggers;
pub mod usage;
pub mod version;
