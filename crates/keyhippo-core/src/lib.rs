//! The parts of keyhippo that need no database: the key format and checksum, and the hashing of
//! keys for storage. The extension crate binds these to SQL; here they are tested with plain
//! `cargo test` in milliseconds.

pub mod hash;
pub mod jwt;
pub mod token;
pub mod uuid;
