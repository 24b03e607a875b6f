//! `#[pg_test]`s: where the Rust code meets Postgres (SPI, settings, roles, the catalogue).
//! The SQL contract, role by role, is in tests/pg_regress.

use pgrx::prelude::*;

#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    const USER_A: &str = "aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa";

    fn act_as(sub: &str) {
        Spi::run(&format!(
            "SELECT set_config('request.jwt.claims', '{{\"sub\":\"{sub}\",\"role\":\"authenticated\"}}', true)"
        ))
        .unwrap();
    }

    fn create_key(description: &str) -> (String, pgrx::Uuid) {
        let (key, id) = Spi::get_two::<String, pgrx::Uuid>(&format!(
            "SELECT api_key, api_key_id FROM keyhippo.create_api_key('{description}')"
        ))
        .unwrap();
        (key.unwrap(), id.unwrap())
    }

    fn verify_count(key_sql: &str) -> i64 {
        Spi::get_one::<i64>(&format!(
            "SELECT count(*) FROM keyhippo.verify_api_key({key_sql})"
        ))
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn created_key_verifies_and_reports_its_owner() {
        act_as(USER_A);
        let (key, id) = create_key("pg test");
        assert!(key.starts_with("kh_"));
        let owner = Spi::get_one::<pgrx::Uuid>(&format!(
            "SELECT user_id FROM keyhippo.verify_api_key('{key}')"
        ))
        .unwrap()
        .unwrap();
        assert_eq!(owner.to_string(), USER_A);
        let prefix = Spi::get_one::<String>(&format!(
            "SELECT prefix FROM keyhippo.api_key_metadata WHERE id = '{id}'"
        ))
        .unwrap()
        .unwrap();
        assert!(key.starts_with(&prefix));
    }

    #[pg_test]
    fn stored_hash_names_its_algorithm_and_is_not_the_key() {
        act_as(USER_A);
        let (key, id) = create_key("hash");
        let stored = Spi::get_one::<String>(&format!(
            "SELECT key_hash FROM keyhippo.api_key_secrets WHERE key_metadata_id = '{id}'"
        ))
        .unwrap()
        .unwrap();
        assert!(stored.starts_with("sha256$"));
        assert_eq!(stored, keyhippo_core::hash::hash_key(&key));
        assert!(!stored.contains(&key[3..]));
    }

    /// One `#[pg_test]` per kind of junk: verify answers zero rows and never raises.
    macro_rules! verify_rejects {
        ($($name:ident: $sql:expr,)*) => {$(
            #[pg_test]
            fn $name() {
                act_as(USER_A);
                let _ = create_key("junk target");
                assert_eq!(verify_count($sql), 0);
            }
        )*};
    }

    verify_rejects! {
        verify_rejects_null: "NULL",
        verify_rejects_empty: "''",
        verify_rejects_huge: "repeat('k', 100000)",
        verify_rejects_quotes: "$$kh_'; DROP TABLE keyhippo.api_key_metadata; --$$",
        verify_rejects_non_ascii: "'kh_ééééééééééééééééé_ключ'",
        verify_rejects_binary_junk: "(SELECT string_agg(chr(1 + (i * 37) % 255), '') FROM generate_series(1, 69) i)",
        verify_rejects_wrong_checksum: "(SELECT prefix || '_' || repeat('A', 43) || '000000' FROM keyhippo.api_key_metadata LIMIT 1)",
    }

    #[pg_test]
    fn a_real_prefix_with_a_forged_secret_does_not_verify() {
        act_as(USER_A);
        let (key, _) = create_key("forgery");
        // Same prefix, another secret, and a valid checksum: passes the format check, fails the hash.
        let fresh = keyhippo_core::token::generate().key;
        let body = format!("{}{}", &key[..20], &fresh[20..fresh.len() - 6]);
        let forged = keyhippo_core::token::seal(body);
        assert!(keyhippo_core::token::parse(&forged).is_ok());
        assert_eq!(verify_count(&format!("'{forged}'")), 0);
        assert_eq!(verify_count(&format!("'{key}'")), 1);
    }

    fn status_of(key: &str) -> String {
        Spi::get_one::<String>(&format!(
            "SELECT status FROM keyhippo.verify_api_key_status('{key}')"
        ))
        .unwrap()
        .unwrap()
    }

    /// Both lookups (index probes, prepared statement) read disabled_at and expires_at, and
    /// verify_api_key_status names what they found.
    #[pg_test]
    fn both_lookups_tell_disabled_and_expired_keys() {
        act_as(USER_A);
        let (key, id) = create_key("status");
        for probes in ["on", "off"] {
            Spi::run(&format!("SET keyhippo.verify_index_probes = {probes}")).unwrap();
            assert_eq!(status_of(&key), "VALID");
            Spi::run(&format!("SELECT keyhippo.disable_api_key('{id}')")).unwrap();
            assert_eq!(status_of(&key), "DISABLED");
            assert_eq!(verify_count(&format!("'{key}'")), 0);
            Spi::run(&format!("SELECT keyhippo.enable_api_key('{id}')")).unwrap();
            assert_eq!(status_of(&key), "VALID");
            assert_eq!(verify_count(&format!("'{key}'")), 1);
        }
        Spi::run(&format!(
            "UPDATE keyhippo.api_key_metadata SET expires_at = now() - interval '1 second' WHERE id = '{id}'"
        ))
        .unwrap();
        for probes in ["on", "off"] {
            Spi::run(&format!("SET keyhippo.verify_index_probes = {probes}")).unwrap();
            assert_eq!(status_of(&key), "EXPIRED");
        }
        // The wrong secret on the same prefix is not the key: nothing about it is told.
        let fresh = keyhippo_core::token::generate().key;
        let forged =
            keyhippo_core::token::seal(format!("{}{}", &key[..20], &fresh[20..fresh.len() - 6]));
        assert_eq!(status_of(&forged), "NOT_FOUND");
    }

    #[pg_test]
    fn revocation_deletes_the_hash_and_stops_verification() {
        act_as(USER_A);
        let (key, id) = create_key("revoke me");
        let revoked = Spi::get_one::<bool>(&format!("SELECT keyhippo.revoke_api_key('{id}')"))
            .unwrap()
            .unwrap();
        assert!(revoked);
        let secrets = Spi::get_one::<i64>(&format!(
            "SELECT count(*) FROM keyhippo.api_key_secrets WHERE key_metadata_id = '{id}'"
        ))
        .unwrap()
        .unwrap();
        assert_eq!(secrets, 0);
        assert_eq!(verify_count(&format!("'{key}'")), 0);
    }

    #[pg_test]
    fn definer_functions_see_the_outer_role() {
        Spi::run("SET LOCAL ROLE authenticated").unwrap();
        // caller_is_admin is SECURITY DEFINER: inside it current_user is the owner, but the caller
        // (authenticated, with no admin role) must not count as an admin.
        assert_eq!(
            Spi::get_one::<bool>("SELECT keyhippo_internal.caller_is_admin()").unwrap(),
            Some(false)
        );
        assert_eq!(
            Spi::get_one::<String>("SELECT keyhippo_internal.caller_role_name()").unwrap(),
            Some("authenticated".into())
        );
        Spi::run("RESET ROLE").unwrap();
    }

    #[pg_test]
    fn empty_or_malformed_claims_mean_nobody() {
        for claims in ["", "not json", "[]", "{\"sub\":\"nope\"}", "{\"sub\":42}"] {
            Spi::run(&format!(
                "SELECT set_config('request.jwt.claims', $q${claims}$q$, true)"
            ))
            .unwrap();
            assert_eq!(
                Spi::get_one::<pgrx::Uuid>("SELECT keyhippo_internal.current_user_id()").unwrap(),
                None,
                "{claims}"
            );
        }
    }

    #[pg_test]
    fn verify_works_in_a_read_only_transaction() {
        act_as(USER_A);
        let (key, _) = create_key("read only");
        Spi::run("SET LOCAL transaction_read_only = on").unwrap();
        assert_eq!(verify_count(&format!("'{key}'")), 1);
    }

    #[pg_test]
    fn every_security_definer_function_pins_search_path() {
        let unpinned = Spi::get_one::<i64>(
            "SELECT count(*) FROM pg_catalog.pg_proc p
               JOIN pg_catalog.pg_depend d ON d.objid = p.oid AND d.deptype = 'e'
               JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'keyhippo'
              WHERE p.prosecdef
                AND NOT coalesce(p.proconfig @> ARRAY['search_path=pg_catalog, pg_temp'], false)",
        )
        .unwrap()
        .unwrap();
        assert_eq!(unpinned, 0);
    }

    fn set_header_key(key: &str) {
        Spi::run(&format!(
            "SELECT set_config('request.headers', json_build_object('x-api-key', '{key}')::text, true)"
        ))
        .unwrap();
    }

    #[pg_test]
    fn key_data_verifies_the_whole_key_not_just_its_prefix() {
        act_as(USER_A);
        let (key, id) = create_key("claims holder");
        Spi::run(&format!(
            "SELECT keyhippo.update_key_claims('{id}', '{{\"tier\":\"gold\"}}')"
        ))
        .unwrap();
        // KeyHippo 1.2.5 returned the claims for any string with a real prefix. A forged key
        // with the real prefix and a valid checksum must get nothing.
        let fresh = keyhippo_core::token::generate().key;
        let forged =
            keyhippo_core::token::seal(format!("{}{}", &key[..20], &fresh[20..fresh.len() - 6]));
        set_header_key(&forged);
        assert_eq!(
            Spi::get_one::<pgrx::JsonB>("SELECT keyhippo.key_data()")
                .unwrap()
                .map(|j| j.0),
            None
        );
        assert_eq!(
            Spi::get_one::<&str>("SELECT keyhippo_internal.header_key_status()").unwrap(),
            Some("NOT_FOUND")
        );
        set_header_key(&key);
        let data = Spi::get_one::<pgrx::JsonB>("SELECT keyhippo.key_data()")
            .unwrap()
            .unwrap()
            .0;
        assert_eq!(data["claims"]["tier"], "gold");
        assert_eq!(data["id"], id.to_string());
    }

    #[pg_test]
    fn context_prefers_a_valid_header_key_and_falls_back_to_the_jwt() {
        const USER_B: &str = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb";
        act_as(USER_A);
        let (key_a, _) = create_key("a key");
        act_as(USER_B);
        set_header_key(&key_a);
        let who = || {
            Spi::get_one::<pgrx::Uuid>("SELECT user_id FROM keyhippo.current_user_context()")
                .unwrap()
                .map(|u| u.to_string())
        };
        assert_eq!(who().as_deref(), Some(USER_A));
        set_header_key("kh_not_a_key");
        assert_eq!(who().as_deref(), Some(USER_B));
        Spi::run("SELECT set_config('request.headers', '', true)").unwrap();
        assert_eq!(who().as_deref(), Some(USER_B));
    }

    /// A scope narrows its owner's permissions, never widens them: a key for a scope holding
    /// every permission carries only those its owner holds, and loses them with the owner's role.
    #[pg_test]
    fn a_scoped_key_carries_only_what_its_owner_holds() {
        Spi::run(
            "INSERT INTO keyhippo.scopes (name) VALUES ('everything'); \
             INSERT INTO keyhippo.scope_permissions (scope_id, permission_id) \
             SELECT s.id, p.id FROM keyhippo.scopes s, keyhippo_rbac.permissions p \
              WHERE s.name = 'everything'; \
             INSERT INTO keyhippo_rbac.user_group_roles (user_id, group_id, role_id) \
             SELECT 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', r.group_id, r.id \
               FROM keyhippo_rbac.roles r WHERE r.name = 'User'",
        )
        .unwrap();
        act_as(USER_A);
        let key = Spi::get_one::<String>(
            "SELECT api_key FROM keyhippo.create_api_key('scoped', 'everything')",
        )
        .unwrap()
        .unwrap();
        let permissions = || {
            Spi::get_one::<Vec<String>>(&format!(
                "SELECT permissions FROM keyhippo.verify_api_key('{key}')"
            ))
            .unwrap()
            .unwrap()
        };
        assert_eq!(permissions(), vec!["manage_api_keys".to_string()]);
        Spi::run("DELETE FROM keyhippo_rbac.user_group_roles").unwrap();
        assert!(permissions().is_empty());
    }

    /// A JWT's user_role claim makes an admin only of the JWT's own subject, never of a key sent
    /// beside it; a scoped key of an admin is not an admin's.
    #[pg_test]
    fn admin_status_never_travels_with_a_key() {
        const USER_B: &str = "bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb";
        Spi::run(&format!(
            "INSERT INTO keyhippo_rbac.user_group_roles (user_id, group_id, role_id) \
             SELECT '{USER_B}', r.group_id, r.id FROM keyhippo_rbac.roles r WHERE r.name = 'Admin'"
        ))
        .unwrap();
        act_as(USER_A);
        let (key_a, _) = create_key("a key");
        act_as(USER_B);
        let scoped_b = Spi::get_one::<String>(
            "SELECT api_key FROM keyhippo.create_api_key('b scoped', 'default')",
        )
        .unwrap()
        .unwrap();
        let (key_b, _) = create_key("b key");
        Spi::run("SET LOCAL ROLE authenticated").unwrap();
        let is_admin = || {
            Spi::get_one::<bool>("SELECT keyhippo_internal.caller_is_admin()")
                .unwrap()
                .unwrap()
        };
        Spi::run(&format!(
            "SELECT set_config('request.jwt.claims', '{{\"sub\":\"{USER_A}\",\"user_role\":\"admin\"}}', true)"
        ))
        .unwrap();
        assert!(is_admin(), "the claim counts for the JWT's own sub");
        set_header_key(&key_a);
        assert!(!is_admin(), "not for a key sent beside it");
        Spi::run("SELECT set_config('request.jwt.claims', '', true)").unwrap();
        set_header_key(&scoped_b);
        assert!(!is_admin(), "a scoped key of an admin");
        set_header_key(&key_b);
        assert!(is_admin(), "an unscoped key of an admin");
        Spi::run("RESET ROLE").unwrap();
    }

    #[pg_test]
    fn error_messages_cut_long_names() {
        assert_eq!(crate::error::echo("ops"), "ops");
        assert_eq!(crate::error::echo("a\"b"), "a\\\"b");
        let long = "x".repeat(100_000);
        assert_eq!(crate::error::echo(&long), format!("{}...", "x".repeat(64)));
    }

    /// verify finds a prefix, and then the hash by key id, through hash indexes, which return
    /// every row whose value has the same 32-bit hash code: two keys whose prefixes collide
    /// and whose ids collide must each verify as themselves (whichever comes first in the
    /// bucket), and a wrong secret as neither.
    #[pg_test]
    fn prefixes_with_the_same_hash_code_verify_as_their_own_key() {
        use keyhippo_core::{hash, token};
        // A pair of prefixes with equal hashtext() (the hash index's hash code): among 300,000
        // candidates about ten pairs are expected.
        let (p1, p2) = Spi::get_two::<String, String>(
            "SELECT min(p), max(p) FROM (SELECT 'kh_' || substr(md5(i::text), 1, 16) AS p \
               FROM generate_series(1, 300000) i) c \
              GROUP BY hashtext(p) HAVING count(*) = 2 ORDER BY 1 LIMIT 1",
        )
        .unwrap();
        let (p1, p2) = (p1.unwrap(), p2.unwrap());
        // And a pair of ids with equal uuid_hash() (the hash index on key_metadata_id).
        let (u1, u2) = Spi::get_two::<String, String>(
            "SELECT min(u::text), max(u::text) FROM (SELECT md5(i::text)::uuid AS u \
               FROM generate_series(1, 300000) i) c \
              GROUP BY uuid_hash(u) HAVING count(*) = 2 ORDER BY 1 LIMIT 1",
        )
        .unwrap();
        let ids = [u1.unwrap(), u2.unwrap()];
        // Two owners, so that verify's answer says which row it found.
        const OWNERS: [&str; 2] = [
            "c0000000-0000-4000-8000-000000000001",
            "c0000000-0000-4000-8000-000000000002",
        ];
        let mut keys = Vec::new();
        for (((prefix, fill), owner), id) in
            [(&p1, "A"), (&p2, "B")].into_iter().zip(OWNERS).zip(&ids)
        {
            let key = token::seal(format!("{prefix}_{}", fill.repeat(token::SECRET_LEN)));
            assert_eq!(token::parse(&key).unwrap().prefix, prefix.as_str());
            Spi::run(&format!(
                "WITH m AS (INSERT INTO keyhippo.api_key_metadata (id, user_id, prefix, description) \
                            VALUES ('{id}', '{owner}', '{prefix}', 'collision') RETURNING id) \
                 INSERT INTO keyhippo.api_key_secrets SELECT m.id, '{}' FROM m",
                hash::hash_key(&key)
            ))
            .unwrap();
            keys.push(key);
        }
        // Through SQL, so that verify runs under a snapshot that sees the rows just inserted.
        let owner_of = |key: &str| {
            Spi::get_one::<pgrx::Uuid>(&format!(
                "SELECT (SELECT user_id FROM keyhippo.verify_api_key('{key}'))"
            ))
            .unwrap()
            .map(|u| u.to_string())
        };
        assert_eq!(owner_of(&keys[0]).as_deref(), Some(OWNERS[0]));
        assert_eq!(owner_of(&keys[1]).as_deref(), Some(OWNERS[1]));
        let wrong = token::seal(format!("{p1}_{}", "C".repeat(token::SECRET_LEN)));
        assert_eq!(owner_of(&wrong), None);
        // Both were found through the hash indexes.
        for index in [
            "keyhippo.api_key_metadata_prefix_hash_idx",
            "keyhippo.api_key_secrets_key_metadata_id_hash_idx",
        ] {
            let scans = Spi::get_one::<i64>(&format!(
                "SELECT pg_stat_get_xact_numscans('{index}'::regclass)"
            ))
            .unwrap()
            .unwrap();
            assert!(scans >= 2, "{index} scans: {scans}");
        }
    }
    // The background workers' write of recorded uses (src/usage.rs), called directly: the
    // workers themselves need shared_preload_libraries (tests/last_used.sh runs them).

    use crate::usage::Use;

    fn last_used_text(id: pgrx::Uuid) -> Option<String> {
        Spi::get_one::<String>(&format!(
            "SELECT (last_used_at AT TIME ZONE 'UTC')::text FROM keyhippo.api_key_metadata WHERE id = '{id}'"
        ))
        .unwrap()
    }

    /// A TimestampTz (microseconds since 2000-01-01) for `text`.
    fn timestamptz(text: &str) -> i64 {
        Spi::get_one::<i64>(&format!(
            "SELECT ((extract(epoch FROM '{text}'::timestamptz) - 946684800) * 1000000)::bigint"
        ))
        .unwrap()
        .unwrap()
    }

    fn use_of(id: pgrx::Uuid, at: &str) -> Use {
        Use {
            id: *id.as_bytes(),
            at: timestamptz(at),
        }
    }

    /// Writes uses as a writer does (the latest per key, one statement).
    fn write_uses(uses: &[Use]) {
        let uses = crate::usage::latest_per_key(uses.to_vec());
        Spi::connect_mut(|client| crate::usage::write(client, &uses)).unwrap();
    }

    #[pg_test]
    fn recorded_uses_are_written_latest_first_and_never_back() {
        act_as(USER_A);
        let (_, a) = create_key("a");
        let (_, b) = create_key("b");
        write_uses(&[
            use_of(a, "2030-01-01 00:00:00+00"),
            use_of(a, "2030-01-03 00:00:00+00"),
            use_of(a, "2030-01-02 00:00:00+00"),
            use_of(b, "2030-02-01 00:00:00+00"),
        ]);
        assert_eq!(last_used_text(a).as_deref(), Some("2030-01-03 00:00:00"));
        assert_eq!(last_used_text(b).as_deref(), Some("2030-02-01 00:00:00"));
        // An earlier use written later does not move the time back.
        write_uses(&[use_of(a, "2029-12-31 00:00:00+00")]);
        assert_eq!(last_used_text(a).as_deref(), Some("2030-01-03 00:00:00"));
        // A deleted key's use is nothing to write, and no error.
        Spi::run(&format!(
            "DELETE FROM keyhippo.api_key_metadata WHERE id = '{b}'"
        ))
        .unwrap();
        write_uses(&[use_of(b, "2030-03-01 00:00:00+00")]);
    }

    #[pg_test]
    fn a_use_changes_last_used_at_alone() {
        act_as(USER_A);
        let (_, a) = create_key("alone");
        let row = || {
            Spi::get_one::<String>(&format!(
                "SELECT (to_jsonb(m) - 'last_used_at')::text FROM keyhippo.api_key_metadata m WHERE id = '{a}'"
            ))
            .unwrap()
        };
        let before = row();
        write_uses(&[use_of(a, "2030-01-01 00:00:00+00")]);
        assert_eq!(row(), before);
        assert_eq!(last_used_text(a).as_deref(), Some("2030-01-01 00:00:00"));
    }

    #[pg_test]
    fn the_library_reports_the_crate_version_and_accepts_it() {
        let loaded = Spi::get_one::<String>("SELECT keyhippo_internal.library_version()")
            .unwrap()
            .unwrap();
        assert_eq!(loaded, env!("CARGO_PKG_VERSION"));
        // Its own version and any older one pass (an older script, or the 2.0.0 baseline).
        Spi::run(&format!(
            "SELECT keyhippo_internal.require_library('{loaded}'), keyhippo_internal.require_library('2.0.0')"
        ))
        .unwrap();
    }

    // A newer version's refusal (55000) is checked through ALTER EXTENSION by tests/upgrade.sh.
    #[pg_test(error = "keyhippo: \"2.x\" is not a version (MAJOR.MINOR.PATCH)")]
    fn a_required_version_must_parse() {
        Spi::run("SELECT keyhippo_internal.require_library('2.x')").unwrap();
    }
}
