//! Values built for PostgreSQL in Rust-owned memory.

use pgrx::prelude::*;

/// A `text[]` of `names` as a flat array varlena copied into 8-byte words (aligned as
/// PostgreSQL expects), so that it can be kept and handed out as a datum pointing into them.
pub fn text_array_words(names: &[String]) -> Vec<u64> {
    let datum = names.to_vec().into_datum().expect("an array");
    // SAFETY: into_datum returned a flat (non-expanded) array varlena we own; it is copied and
    // freed.
    unsafe {
        let ptr = datum.cast_mut_ptr::<pg_sys::varlena>();
        let len = pgrx::varlena::varsize_any(ptr);
        let mut words = vec![0u64; len.div_ceil(8)];
        std::ptr::copy_nonoverlapping(ptr as *const u8, words.as_mut_ptr().cast(), len);
        pg_sys::pfree(ptr.cast());
        words
    }
}
