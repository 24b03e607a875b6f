//! PostgreSQL glue: every call into PostgreSQL that Rust cannot check (`unsafe`) lives in this
//! folder, behind functions the rest of keyhippo calls safely. The modules here import nothing
//! of keyhippo but [`crate::error`] and [`crate::model`]; the differences between PostgreSQL
//! major versions are confined to [`compat`].

pub mod backend;
pub mod compat;
pub mod datum;
pub mod elevate;
pub mod jsonb;
pub mod lookup;
pub mod plans;
pub mod shmem;
pub mod srf;
pub mod subxact;
pub mod trigger;
pub mod utility;
