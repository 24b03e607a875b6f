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
            Spi::get_one::<bool>("SELECT keyhippo_internal.header_key_valid()").unwrap(),
            Some(false)
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
    // The background worker's write of recorded uses (src/usage_writer.rs), called directly:
    // the worker itself needs shared_preload_libraries (tests/last_used.sh runs it).

    use crate::usage_writer::{Tid, Use};

    /// Where the row of key `id` is now (its ctid).
    fn tid_of(id: pgrx::Uuid) -> Tid {
        let ctid = Spi::get_one::<String>(&format!(
            "SELECT ctid::text FROM keyhippo.api_key_metadata WHERE id = '{id}'"
        ))
        .unwrap()
        .unwrap();
        let (block, offset) = ctid
            .trim_matches(|c| c == '(' || c == ')')
            .split_once(',')
            .unwrap();
        Tid {
            block: block.parse().unwrap(),
            offset: offset.parse().unwrap(),
        }
    }

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

    /// Runs the writer as the worker does; returns the ids it left to the UPDATE statement.
    fn write_uses(uses: &[Use]) -> Vec<pgrx::Uuid> {
        let (table, id_att, used_att) = crate::lookup::metadata_columns().unwrap();
        let uses = crate::usage_writer::latest_per_key(uses.to_vec());
        // SAFETY: inside the test's transaction, as superuser.
        let rest = unsafe { crate::usage_writer::write(table, id_att, used_att, &uses) };
        rest.iter().map(|u| pgrx::Uuid::from_bytes(u.id)).collect()
    }

    fn use_of(id: pgrx::Uuid, tid: Tid, at: &str) -> Use {
        Use {
            id: *id.as_bytes(),
            tid,
            at: timestamptz(at),
        }
    }

    fn hot_updates() -> i64 {
        Spi::get_one::<i64>(
            "SELECT pg_stat_get_xact_tuples_hot_updated('keyhippo.api_key_metadata'::regclass)",
        )
        .unwrap()
        .unwrap()
    }

    /// Every recorded use written as a new row version (keyhippo.last_used_in_place = off).
    fn row_versions_only() {
        Spi::run("SET LOCAL keyhippo.last_used_in_place = off").unwrap();
    }

    #[pg_test]
    fn recorded_uses_are_written_where_verify_read_the_row() {
        act_as(USER_A);
        row_versions_only();
        let (key_a, a) = create_key("writer a");
        let (_, b) = create_key("writer b");
        let (root_a, root_b) = (tid_of(a), tid_of(b));
        let hot_before = hot_updates();
        let at = "2030-01-02 03:04:05.123456+00";
        // Two uses of a (the later one wins) and one of b, in any order.
        let left = write_uses(&[
            use_of(a, root_a, "2030-01-01 00:00:00+00"),
            use_of(b, root_b, at),
            use_of(a, root_a, at),
        ]);
        assert!(left.is_empty(), "left to the statement: {left:?}");
        assert_eq!(
            last_used_text(a).as_deref(),
            Some("2030-01-02 03:04:05.123456")
        );
        assert_eq!(
            last_used_text(b).as_deref(),
            Some("2030-01-02 03:04:05.123456")
        );
        // As HOT updates: the row stays on its page, no index entries.
        assert_eq!(hot_updates() - hot_before, 2);
        // The row's new version is a heap-only tuple elsewhere on the page; verify still gives
        // the root its index entries point to, and the writer follows the chain from there.
        assert_ne!(tid_of(a), root_a);
        assert_eq!(root_of(&key_a), root_a);
        assert!(write_uses(&[use_of(a, root_a, "2030-01-03 00:00:00+00")]).is_empty());
        assert_eq!(last_used_text(a).as_deref(), Some("2030-01-03 00:00:00"));
        assert_eq!(hot_updates() - hot_before, 3);
        // An older use never moves the time back (and needs no statement either).
        assert!(write_uses(&[use_of(a, root_a, "2029-12-31 00:00:00+00")]).is_empty());
        assert_eq!(last_used_text(a).as_deref(), Some("2030-01-03 00:00:00"));
        // Through an index scan, the updated row is found by its key as before.
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        assert_eq!(
            Spi::get_one::<i64>(&format!(
                "SELECT count(*) FROM keyhippo.api_key_metadata WHERE id = '{a}' AND last_used_at IS NOT NULL"
            ))
            .unwrap(),
            Some(1)
        );
    }

    #[pg_test]
    fn uses_the_writer_cannot_place_are_left_to_the_statement() {
        act_as(USER_A);
        let (_, a) = create_key("moved");
        let (_, b) = create_key("other");
        let (_, c) = create_key("no tid");
        let at = "2030-01-02 00:00:00+00";
        // a's row is updated with an indexed column changing (not a HOT update): the tid verify
        // read now holds a dead version that leads nowhere.
        let old = tid_of(a);
        Spi::run(&format!(
            "UPDATE keyhippo.api_key_metadata SET prefix = prefix || 'x' WHERE id = '{a}'"
        ))
        .unwrap();
        let b_tid = tid_of(b);
        let past_the_end = Tid {
            block: 1_000_000,
            offset: 1,
        };
        let no_such_line = Tid {
            block: b_tid.block,
            offset: 2000,
        };
        let left = write_uses(&[
            use_of(a, old, at),
            // b's tid given for c: another key's row is there.
            use_of(c, b_tid, at),
            use_of(b, past_the_end, at),
        ]);
        let mut expected = vec![a, b, c];
        expected.sort_by_key(|u| *u.as_bytes());
        let mut left_sorted = left.clone();
        left_sorted.sort_by_key(|u| *u.as_bytes());
        assert_eq!(left_sorted, expected);
        let left = write_uses(&[use_of(b, no_such_line, at), use_of(c, Tid::NONE, at)]);
        assert_eq!(left.len(), 2);
        // Nothing was written to any of them (b's row in particular was not c's use).
        for id in [a, b, c] {
            assert_eq!(last_used_text(id), None, "{id}");
        }
    }

    #[pg_test]
    fn an_index_on_last_used_at_gets_the_new_entries() {
        act_as(USER_A);
        let (key, a) = create_key("indexed");
        assert!(write_uses(&[use_of(a, tid_of(a), "2030-05-04 00:00:00+00")]).is_empty());
        Spi::run("CREATE INDEX last_used_idx ON keyhippo.api_key_metadata (last_used_at)").unwrap();
        let hot_before = hot_updates();
        let before = tid_of(a);
        assert!(write_uses(&[use_of(a, root_of(&key), "2030-05-05 00:00:00+00")]).is_empty());
        // Not overwritten in place (the index entry would go stale), not HOT (an indexed column
        // changed): a new version elsewhere, found through its new index entry.
        assert_ne!(tid_of(a), before);
        assert_eq!(hot_updates(), hot_before);
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        Spi::run("SET LOCAL enable_bitmapscan = off").unwrap();
        let found = Spi::get_one::<pgrx::Uuid>(
            "SELECT id FROM keyhippo.api_key_metadata WHERE last_used_at = '2030-05-05 00:00:00+00'",
        )
        .unwrap();
        assert_eq!(found, Some(a));
    }

    #[pg_test]
    fn a_trigger_that_fires_for_the_worker_leaves_everything_to_the_statement() {
        act_as(USER_A);
        let (_, a) = create_key("trigger");
        let root = tid_of(a);
        Spi::run(
            "CREATE FUNCTION pg_temp.count_updates() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN RETURN NEW; END $$",
        )
        .unwrap();
        Spi::run(
            "CREATE TRIGGER user_trigger BEFORE UPDATE ON keyhippo.api_key_metadata \
             FOR EACH ROW EXECUTE FUNCTION pg_temp.count_updates()",
        )
        .unwrap();
        // Enabled as ORIGIN (the default) it does not fire for the worker (replica role).
        assert!(write_uses(&[use_of(a, root, "2030-01-01 00:00:00+00")]).is_empty());
        Spi::run("ALTER TABLE keyhippo.api_key_metadata ENABLE ALWAYS TRIGGER user_trigger")
            .unwrap();
        assert_eq!(
            write_uses(&[use_of(a, root, "2030-02-01 00:00:00+00")]),
            vec![a]
        );
        assert_eq!(last_used_text(a).as_deref(), Some("2030-01-01 00:00:00"));
    }
    /// The root tuple id verify records for `key` (what `lookup::find` gives it).
    fn root_of(key: &str) -> Tid {
        let prefix = keyhippo_core::token::parse(key).unwrap().prefix.to_string();
        // SAFETY: a fresh snapshot for the lookup, popped after it, inside the test's transaction.
        let found = unsafe {
            pg_sys::CommandCounterIncrement();
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
            let found = crate::lookup::find(&prefix);
            pg_sys::PopActiveSnapshot();
            found
        };
        found.unwrap().unwrap().tid
    }

    #[pg_test]
    fn a_row_with_toasted_claims_keeps_them_when_its_use_is_written() {
        act_as(USER_A);
        let (key, a) = create_key("toasted");
        // Claims of 64 kB: stored out of line, in the TOAST table.
        Spi::run(&format!(
            "UPDATE keyhippo.api_key_metadata SET claims = jsonb_build_object('blob', \
               (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 2000) i)) WHERE id = '{a}'"
        ))
        .unwrap();
        let digest = || {
            Spi::get_one::<String>(&format!(
                "SELECT md5(claims::text) || ' ' || pg_column_size(claims) \
                   FROM keyhippo.api_key_metadata WHERE id = '{a}'"
            ))
            .unwrap()
            .unwrap()
        };
        let before = digest();
        let toasted = Spi::get_one::<bool>(
            "SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class \
              WHERE oid = 'keyhippo.api_key_metadata'::regclass",
        )
        .unwrap();
        assert_eq!(toasted, Some(true), "claims not stored out of line");
        assert!(write_uses(&[use_of(a, root_of(&key), "2030-03-03 00:00:00+00")]).is_empty());
        assert_eq!(last_used_text(a).as_deref(), Some("2030-03-03 00:00:00"));
        assert_eq!(digest(), before);
        assert_eq!(verify_count(&format!("'{key}'")), 1);
        // The next use as well (a new row version here: this transaction's UPDATE above left
        // it as a locker on the row; tests/last_used.sh overwrites such a row in place).
        assert!(write_uses(&[use_of(a, root_of(&key), "2030-03-04 00:00:00+00")]).is_empty());
        assert_eq!(last_used_text(a).as_deref(), Some("2030-03-04 00:00:00"));
        assert_eq!(digest(), before);
        assert_eq!(verify_count(&format!("'{key}'")), 1);
    }

    /// The row of key `id` as text (every column but last_used_at), to show nothing else changed.
    fn row_without_last_used(id: pgrx::Uuid) -> String {
        Spi::get_one::<String>(&format!(
            "SELECT (to_jsonb(m) - 'last_used_at')::text FROM keyhippo.api_key_metadata m WHERE id = '{id}'"
        ))
        .unwrap()
        .unwrap()
    }

    #[pg_test]
    fn a_key_used_before_has_its_last_used_at_overwritten_in_place() {
        act_as(USER_A);
        let (key, a) = create_key("in place");
        let hot_before = hot_updates();
        // A first use (last_used_at NULL: the row grows) is a new row version.
        assert!(write_uses(&[use_of(a, root_of(&key), "2030-01-01 00:00:00+00")]).is_empty());
        assert_eq!(hot_updates() - hot_before, 1);
        let here = tid_of(a);
        let row = row_without_last_used(a);
        // The next ones overwrite the time where it is: same tuple, no update counted.
        assert!(write_uses(&[use_of(a, root_of(&key), "2030-01-02 00:00:00.5+00")]).is_empty());
        assert_eq!(last_used_text(a).as_deref(), Some("2030-01-02 00:00:00.5"));
        assert_eq!(tid_of(a), here);
        assert_eq!(hot_updates() - hot_before, 1);
        assert_eq!(row_without_last_used(a), row);
        // Never back.
        assert!(write_uses(&[use_of(a, root_of(&key), "2030-01-01 12:00:00+00")]).is_empty());
        assert_eq!(last_used_text(a).as_deref(), Some("2030-01-02 00:00:00.5"));
        // Found by its indexes as before.
        assert_eq!(verify_count(&format!("'{key}'")), 1);
        Spi::run("SET LOCAL enable_seqscan = off").unwrap();
        assert_eq!(
            Spi::get_one::<String>(&format!(
                "SELECT (last_used_at AT TIME ZONE 'UTC')::text FROM keyhippo.api_key_metadata WHERE id = '{a}'"
            ))
            .unwrap()
            .as_deref(),
            Some("2030-01-02 00:00:00.5")
        );
        // Switched off: a new row version again.
        row_versions_only();
        assert!(write_uses(&[use_of(a, root_of(&key), "2030-01-03 00:00:00+00")]).is_empty());
        assert_eq!(last_used_text(a).as_deref(), Some("2030-01-03 00:00:00"));
        assert_ne!(tid_of(a), here);
        assert_eq!(hot_updates() - hot_before, 2);
    }

    /// Rows of every shape before last_used_at (NULL or set scope_id and description; a
    /// description with a 1-byte header, with a 4-byte header, compressed, stored out of line),
    /// inserted with last_used_at set so that the tuple id the index gives is the row version
    /// itself: each use is written where verify found it (the common path, no fetch and no
    /// re-formed row) over last_used_at's 8 bytes and nothing else.
    #[pg_test]
    fn a_use_is_written_over_last_used_at_alone_whatever_the_row_holds() {
        use std::sync::atomic::Ordering::Relaxed;
        act_as(USER_A);
        let (_, a) = create_key("shapes");
        let scope = Spi::get_one::<pgrx::Uuid>(
            "INSERT INTO keyhippo.scopes (name) VALUES ('shapes') RETURNING id",
        )
        .unwrap()
        .unwrap();
        // Descriptions of every length the table allows, and claims stored inline, compressed
        // and out of line.
        let shapes = [
            ("NULL", "'{\"k\": \"v\"}'"),
            ("'d'", "'{\"k\": \"v\"}'"),
            ("repeat('x', 200)", "'{\"k\": \"v\"}'"),
            ("repeat('y', 255)", "jsonb_build_object('k', repeat('compressed ', 1000))"),
            (
                "'out of line'",
                "jsonb_build_object('k', (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 3000) i))",
            ),
        ];
        for (n, (description, claims)) in shapes.iter().enumerate() {
            for scope_id in ["NULL".to_string(), format!("'{scope}'")] {
                let id = Spi::get_one::<pgrx::Uuid>(&format!(
                    "INSERT INTO keyhippo.api_key_metadata \
                       (user_id, scope_id, description, prefix, last_used_at, claims) \
                     SELECT user_id, {scope_id}, {description}, \
                            'kh_shape' || {n} || coalesce(left({scope_id}::text, 4), 'none'), \
                            '2030-01-01 00:00:00+00', {claims} \
                       FROM keyhippo.api_key_metadata WHERE id = '{a}' RETURNING id"
                ))
                .unwrap()
                .unwrap();
                let (here, row) = (tid_of(id), row_without_last_used(id));
                let before = crate::usage_writer::WRITTEN_WHERE_FOUND.load(Relaxed);
                assert!(
                    write_uses(&[use_of(id, here, "2030-01-02 03:04:05.678901+00")]).is_empty()
                );
                assert_eq!(
                    crate::usage_writer::WRITTEN_WHERE_FOUND.load(Relaxed) - before,
                    1,
                    "description {description}, scope {scope_id}: not written where found"
                );
                assert_eq!(
                    last_used_text(id).as_deref(),
                    Some("2030-01-02 03:04:05.678901")
                );
                assert_eq!(tid_of(id), here);
                assert_eq!(row_without_last_used(id), row, "description {description}");
                // Never back, and nothing written for an earlier time.
                assert!(write_uses(&[use_of(id, here, "2030-01-01 12:00:00+00")]).is_empty());
                assert_eq!(
                    last_used_text(id).as_deref(),
                    Some("2030-01-02 03:04:05.678901")
                );
                assert_eq!(
                    crate::usage_writer::WRITTEN_WHERE_FOUND.load(Relaxed) - before,
                    1
                );
            }
        }
        let toasted = Spi::get_one::<bool>(
            "SELECT pg_relation_size(reltoastrelid) > 0 FROM pg_class \
              WHERE oid = 'keyhippo.api_key_metadata'::regclass",
        )
        .unwrap();
        assert_eq!(toasted, Some(true), "no claims stored out of line");
        // A use recorded at a tuple id that now holds another key's row is not written there.
        let (_, b) = create_key("other");
        Spi::run(&format!(
            "UPDATE keyhippo.api_key_metadata SET last_used_at = '2030-01-01' WHERE id = '{b}'"
        ))
        .unwrap();
        let before = crate::usage_writer::WRITTEN_WHERE_FOUND.load(Relaxed);
        let wrong = use_of(b, tid_of(a), "2030-02-02 00:00:00+00");
        // Left to the caller's UPDATE statement, which finds the row by its key.
        assert_eq!(write_uses(&[wrong]), vec![b]);
        assert_eq!(
            crate::usage_writer::WRITTEN_WHERE_FOUND.load(Relaxed),
            before
        );
        assert_eq!(last_used_text(a), None);
    }

    #[pg_test]
    fn a_locked_or_published_row_gets_a_new_version_instead() {
        act_as(USER_A);
        let (key, a) = create_key("locked");
        assert!(write_uses(&[use_of(a, root_of(&key), "2030-01-01 00:00:00+00")]).is_empty());
        // A row lock (as a foreign key check takes): the use must wait for the locker like an
        // UPDATE, so it is written as a row update (here by the locking transaction itself).
        Spi::run(&format!(
            "SELECT 1 FROM keyhippo.api_key_metadata WHERE id = '{a}' FOR KEY SHARE"
        ))
        .unwrap();
        let here = tid_of(a);
        assert!(write_uses(&[use_of(a, root_of(&key), "2030-01-02 00:00:00+00")]).is_empty());
        assert_eq!(last_used_text(a).as_deref(), Some("2030-01-02 00:00:00"));
        assert_ne!(tid_of(a), here);
        // A table whose updates are published: logical decoding does not see an overwrite.
        let (key_b, b) = create_key("published");
        assert!(write_uses(&[use_of(b, root_of(&key_b), "2030-01-01 00:00:00+00")]).is_empty());
        Spi::run("CREATE PUBLICATION keyhippo_test FOR TABLE keyhippo.api_key_metadata").unwrap();
        let here = tid_of(b);
        assert!(write_uses(&[use_of(b, root_of(&key_b), "2030-01-02 00:00:00+00")]).is_empty());
        assert_eq!(last_used_text(b).as_deref(), Some("2030-01-02 00:00:00"));
        assert_ne!(tid_of(b), here);
    }

    #[pg_test]
    fn an_update_never_moves_last_used_at_back() {
        act_as(USER_A);
        let (_, a) = create_key("kept");
        let update = |set: &str| {
            Spi::run(&format!(
                "UPDATE keyhippo.api_key_metadata SET {set} WHERE id = '{a}'"
            ))
            .unwrap()
        };
        update("last_used_at = '2030-01-02 00:00:00+00'");
        // An UPDATE carrying an earlier time (as one that read the row before the worker
        // overwrote it would) keeps the later one; its other changes are made.
        update("last_used_at = '2030-01-01 00:00:00+00', description = 'renamed'");
        assert_eq!(last_used_text(a).as_deref(), Some("2030-01-02 00:00:00"));
        assert_eq!(
            Spi::get_one::<String>(&format!(
                "SELECT description FROM keyhippo.api_key_metadata WHERE id = '{a}'"
            ))
            .unwrap()
            .as_deref(),
            Some("renamed")
        );
        update("last_used_at = '2030-01-03 00:00:00+00'");
        assert_eq!(last_used_text(a).as_deref(), Some("2030-01-03 00:00:00"));
        // Clearing it is an explicit choice, and kept.
        update("last_used_at = NULL");
        assert_eq!(last_used_text(a), None);
    }
}
