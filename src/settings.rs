//! Every setting keyhippo defines (`keyhippo.*`, `keyhippo_audit.*`), in one place: their
//! values, limits and the text `SHOW` and `pg_settings` give.

use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;

/// `keyhippo.last_used_interval`: seconds between two recorded uses of one key (both paths of
/// src/usage.rs): how fresh `last_used_at` is kept.
pub static LAST_USED_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);

/// `keyhippo.last_used_flush_interval`: seconds between two writes of the shared buffer of uses
/// by the background workers.
pub static FLUSH_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(10);

/// `keyhippo.verify_index_probes`: verify finds a key with two index probes (on, the default)
/// or with a prepared SQL statement (off: slower, for comparison; `make bench` measures both).
pub static INDEX_PROBES: GucSetting<bool> = GucSetting::<bool>::new(true);

/// `keyhippo.verified_key_cache`: off by default. On, each backend also caches the keys it has
/// verified; permissions are cached either way. Off by default because the two-probe lookup
/// leaves little to save on uniformly random keys, while each backend's cache holds up to
/// `cache::MAX_ENTRIES` keys of memory (docs/benchmarks.md has both measured).
pub static VERIFIED_KEY_CACHE: GucSetting<bool> = GucSetting::<bool>::new(false);

/// `keyhippo.default_key_lifetime`: how long a key made by `create_api_key` (or `rotate_api_key`
/// of a key that had no end) lives when the caller names no `expires_in`. KeyHippo 1.2.5's keys
/// lived 100 years.
pub static DEFAULT_KEY_LIFETIME: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"100 years"));

/// `keyhippo.jwt_max_lifetime`: the longest lifetime a JWT key may be minted with. A JWT key is
/// accepted, until it expires, by every service that shares the signing secret, without asking
/// keyhippo: its lifetime is bounded.
pub static JWT_MAX_LIFETIME: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"1 year"));

/// `keyhippo.require_api_key`: whether PostgREST's pre-request hook refuses anonymous requests
/// that carry no key (off: they pass as `anon`, as with KeyHippo 1.2.5).
pub static REQUIRE_API_KEY: GucSetting<bool> = GucSetting::<bool>::new(false);

/// `keyhippo.disable_unused_after`: `update_expiring_keys()` disables keys unused for this long
/// (an interval; empty, the default, never).
pub static DISABLE_UNUSED_AFTER: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// `keyhippo.usage_retention`: how long the background workers keep rows of
/// `keyhippo.api_key_usage` (an interval; default 90 days).
pub static USAGE_RETENTION: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"90 days"));

/// `keyhippo_audit.function_name`: which keyhippo function written in SQL is running, set by the
/// `SET` clause of each (SECURITY DEFINER, owned by the superuser who created the extension).
/// Superuser-only, so that no caller can make an audit row name a function that did not run.
pub static AUDIT_FUNCTION_NAME: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// How many rate-limit counters shared memory holds (src/limits.rs): keys and owners that can be
/// counted at once; a counter is free again when its window ends.
pub static RATE_LIMIT_COUNTERS: GucSetting<i32> = GucSetting::<i32>::new(65_536);

/// Defines the settings that size shared memory: only while the library is preloaded (a
/// setting read at server start cannot be defined later).
pub fn define_for_preload() {
    GucRegistry::define_int_guc(
        c"keyhippo.rate_limit_counters",
        c"Rate-limit counters in shared memory: the keys and owners whose limits can be counted at once.",
        c"A counter is free again when its window ends; when none is free, a limited key's request is refused. Takes effect at server start.",
        &RATE_LIMIT_COUNTERS,
        1_024,
        16_777_216,
        GucContext::Postmaster,
        GucFlags::default(),
    );
}

/// Defines the settings (from `_PG_init`).
pub fn define() {
    GucRegistry::define_int_guc(
        c"keyhippo.last_used_interval",
        c"Seconds between two recorded uses of the same API key.",
        c"last_used_at is kept accurate to within this interval (plus the flush interval when the background workers are used).",
        &LAST_USED_INTERVAL,
        1,
        86_400,
        GucContext::Suset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"keyhippo.last_used_flush_interval",
        c"Seconds between two writes of recorded key uses by keyhippo's background workers.",
        c"Only used when keyhippo is in shared_preload_libraries.",
        &FLUSH_INTERVAL,
        1,
        3_600,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_bool_guc(
        c"keyhippo.verify_index_probes",
        c"Whether verify finds keys with two index probes instead of a prepared SQL statement.",
        c"On (the default): the faster path. Off: the same lookup as a prepared statement, for comparison.",
        &INDEX_PROBES,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"keyhippo.verified_key_cache",
        c"Whether each backend caches the API keys it has verified.",
        c"Only when keyhippo is in shared_preload_libraries (the cache's invalidation needs shared memory). Off (the default): every verify looks the key up; permissions are cached either way.",
        &VERIFIED_KEY_CACHE,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"keyhippo.default_key_lifetime",
        c"How long a new API key lives when create_api_key is given no expires_in (an interval).",
        c"A positive interval; create_api_key refuses with SQLSTATE 22023 while it is not one.",
        &DEFAULT_KEY_LIFETIME,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"keyhippo.jwt_max_lifetime",
        c"The longest lifetime (an interval) create_jwt_api_key accepts.",
        c"Longer lifetimes are refused with SQLSTATE 22023.",
        &JWT_MAX_LIFETIME,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_bool_guc(
        c"keyhippo.require_api_key",
        c"Whether keyhippo.check_request() refuses anonymous requests that carry no API key.",
        c"Off (the default): a request without x-api-key passes as anon. keyhippo.enable_postgrest_check(true) sets it for PostgREST's role in this database.",
        &REQUIRE_API_KEY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"keyhippo.disable_unused_after",
        c"keyhippo.update_expiring_keys() disables API keys unused for this long (an interval; empty: never).",
        c"Uses are counted from last_used_at, or from created_at for a key never used. Uses seen only on a hot standby are not recorded: keep this off when keys are used through replicas.",
        &DISABLE_UNUSED_AFTER,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"keyhippo.usage_retention",
        c"How long rows of keyhippo.api_key_usage (verifications per key and hour) are kept.",
        c"An interval such as '90 days'; the background workers delete older rows when they write counts.",
        &USAGE_RETENTION,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"keyhippo_audit.function_name",
        c"The keyhippo function making the current change, for its audit rows.",
        c"Set by keyhippo's own functions; only superusers may set it.",
        &AUDIT_FUNCTION_NAME,
        GucContext::Suset,
        GucFlags::NO_SHOW_ALL,
    );
}

/// `keyhippo.last_used_interval` in microseconds.
pub fn last_used_interval_micros() -> i64 {
    LAST_USED_INTERVAL.get().max(1) as i64 * 1_000_000
}

/// `keyhippo.last_used_flush_interval` in microseconds.
pub fn flush_interval_micros() -> i64 {
    FLUSH_INTERVAL.get().max(1) as i64 * 1_000_000
}
