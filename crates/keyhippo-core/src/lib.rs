//! The parts of keyhippo that need no database: the key format and checksum, the hashing of
//! keys for storage, rate limits, credit balances and usage counts, and the order of release
//! versions. The extension crate binds these to SQL; here they are tested with plain
//! `cargo test` in milliseconds.

pub mod credits;
pub mod hash;
pub mod jwt;
pub mod ratelimit;
pub mod slot;
pub mod token;
pub mod usagecount;
pub mod uuid;
pub mod version;
