-- The key lifecycle beyond create and revoke: why a key is refused (verify_api_key_status),
-- disable and enable, rotation with a grace period, leaked-key reports, the reason of every
-- revocation, and the disabling of unused keys. Run as PostgREST runs each request: claims,
-- SET LOCAL ROLE, the call.
\set ON_ERROR_STOP 0
\set VERBOSITY terse
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\set B '{"sub":"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb","role":"authenticated"}'
begin;
insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'b@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as k, api_key_id as id from keyhippo.create_api_key('status key') \gset
select api_key as k2, api_key_id as id2 from keyhippo.create_api_key('second key') \gset
reset role;
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select api_key as kb, api_key_id as idb from keyhippo.create_api_key('B key') \gset
reset role;

\echo '--- verify_api_key_status: one row always; the key only when its secret matched'
select expires_at as expiry from keyhippo.api_key_metadata where id = :'id' \gset
set local role anon;
select status, api_key_id = :'id' as id_matches, user_id, scope_id, permissions,
       expires_at = :'expiry' as expiry_matches
  from keyhippo.verify_api_key_status(:'k');
reset role;
create temp table not_keys (label text, k text);
insert into not_keys values
    ('NULL', NULL), ('empty', ''), ('junk', 'not a key'),
    ('real prefix, wrong secret', left(:'k', 20) || repeat('A', 49)),
    ('truncated', left(:'k', 60)),
    ('a kilobyte of junk', repeat('x', 1024));
grant select on not_keys to anon;
set local role anon;
select n.label, s.* from not_keys n, keyhippo.verify_api_key_status(n.k) s order by n.label;
reset role;

\echo '--- junk costs no table read: no scan of the key table''s indexes'
select pg_stat_get_xact_numscans('keyhippo.api_key_metadata_prefix_hash_idx'::regclass) as scans_before \gset
select count(*) as rows from not_keys n, keyhippo.verify_api_key_status(n.k) s
 where n.label in ('NULL', 'empty', 'junk', 'truncated', 'a kilobyte of junk');
select pg_stat_get_xact_numscans('keyhippo.api_key_metadata_prefix_hash_idx'::regclass) - :scans_before as scans;

\echo '--- disable: the key stops verifying, keeps its hash, says DISABLED; the table shows it'
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select keyhippo.disable_api_key(:'id') as disabled, keyhippo.disable_api_key(:'id') as again;
select disabled_at = now() as disabled_now from keyhippo.api_key_metadata where id = :'id';
select count(*) as verifies from keyhippo.verify_api_key(:'k');
select status, api_key_id = :'id' as id_matches, permissions, expires_at is not null as has_expiry
  from keyhippo.verify_api_key_status(:'k');
reset role;
select count(*) as hash_kept from keyhippo.api_key_secrets where key_metadata_id = :'id';
select action, function_name, data -> 'old_data' ->> 'disabled_at' is null as was_enabled,
       data -> 'new_data' ->> 'disabled_at' is not null as now_disabled
  from keyhippo.audit_log
 where action = 'UPDATE' and data -> 'new_data' ->> 'id' = :'id' order by "timestamp", id;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select keyhippo.enable_api_key(:'id') as enabled, keyhippo.enable_api_key(:'id') as again;
select status from keyhippo.verify_api_key_status(:'k');

\echo '--- the same rules and errors as revoke_api_key'
savepoint s;
select keyhippo.disable_api_key(:'idb');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
select keyhippo.enable_api_key(gen_random_uuid());
\echo :LAST_ERROR_SQLSTATE
rollback to s;
select keyhippo.disable_api_key(NULL);
\echo :LAST_ERROR_SQLSTATE
rollback to s;
reset role;
set local role anon;
select keyhippo.disable_api_key(:'id');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
reset role;
-- An admin may disable anyone's key.
set local role service_role;
select keyhippo.disable_api_key(:'idb') as admin_disabled, keyhippo.enable_api_key(:'idb') as admin_enabled;
reset role;
-- A revoked key cannot be enabled (55000); disabling it changes nothing.
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key_id as id3 from keyhippo.create_api_key('to revoke') \gset
select keyhippo.revoke_api_key(:'id3') as revoked;
select keyhippo.disable_api_key(:'id3') as disable_revoked;
savepoint s;
select keyhippo.enable_api_key(:'id3');
\echo :LAST_ERROR_SQLSTATE
rollback to s;

\echo '--- revoked_reason: revoke_api_key says revoked, and so does a plain UPDATE'
select api_key_id as id4 from keyhippo.create_api_key('updated away') \gset
update keyhippo.api_key_metadata set is_revoked = true where id = :'id4';
select description, revoked_reason from keyhippo.api_key_metadata
 where id in (:'id3', :'id4') order by description;

\echo '--- rotation without a grace period: the old key is revoked, reason rotated'
select new_api_key as k5, new_api_key_id as id5 from keyhippo.rotate_api_key(:'id2') \gset
select is_revoked, revoked_reason from keyhippo.api_key_metadata where id = :'id2';
select (select status from keyhippo.verify_api_key_status(:'k2')) as old_key,
       (select status from keyhippo.verify_api_key_status(:'k5')) as new_key;

\echo '--- rotation with a grace period: both keys work until it ends; the old one then says EXPIRED'
select expires_at as old_expiry from keyhippo.api_key_metadata where id = :'id5' \gset
select new_api_key as k6, new_api_key_id as id6 from keyhippo.rotate_api_key(:'id5', interval '1 hour') \gset
select is_revoked, revoked_reason, expires_at = now() + interval '1 hour' as ends_in_an_hour
  from keyhippo.api_key_metadata where id = :'id5';
select description, scope_id is null as same_scope, claims from keyhippo.api_key_metadata where id = :'id6';
select (select status from keyhippo.verify_api_key_status(:'k5')) as old_key,
       (select status from keyhippo.verify_api_key_status(:'k6')) as new_key;
-- A second rotation of the old key, inside its grace period: 55000.
savepoint s;
select * from keyhippo.rotate_api_key(:'id5', interval '1 hour');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
-- A grace period longer than the key has left ends it no later than it would have ended.
select api_key_id as id7 from keyhippo.create_api_key('short-lived', NULL, interval '10 minutes') \gset
select new_api_key_id as id8 from keyhippo.rotate_api_key(:'id7', interval '1 day') \gset
select expires_at = now() + interval '10 minutes' as still_ten_minutes from keyhippo.api_key_metadata where id = :'id7';
-- A negative grace period: 22023.
select * from keyhippo.rotate_api_key(:'id6', interval '-1 minute');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
-- Disabled or expired keys are not rotated: 55000.
select keyhippo.disable_api_key(:'id6') as disabled;
select * from keyhippo.rotate_api_key(:'id6');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
reset role;
update keyhippo.api_key_metadata set expires_at = now() - interval '1 second' where id = :'id6';
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select * from keyhippo.rotate_api_key(:'id6');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
-- The grace period over (moved into the past here), the old key says EXPIRED; the periodic
-- job then revokes it (the reason stays rotated) and its hash goes.
reset role;
update keyhippo.api_key_metadata set expires_at = now() - interval '1 second' where id = :'id5';
select status, api_key_id = :'id5' as id_matches from keyhippo.verify_api_key_status(:'k5');
select keyhippo.update_expiring_keys() >= 0 as job_ran;
select is_revoked, revoked_reason,
       (select count(*) from keyhippo.api_key_secrets where key_metadata_id = :'id5') as hashes
  from keyhippo.api_key_metadata where id = :'id5';
select status from keyhippo.verify_api_key_status(:'k5');

\echo '--- report_leaked_keys: anyone may report; valid keys are revoked as leaked; nothing is returned'
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select api_key as kl, api_key_id as idl from keyhippo.create_api_key('will leak') \gset
select api_key as kd, api_key_id as idd from keyhippo.create_api_key('disabled then leaked') \gset
select keyhippo.disable_api_key(:'idd') as disabled;
reset role;
select set_config('request.jwt.claims', '', true) = '' as cleared;
set local role anon;
select keyhippo.report_leaked_keys(array[:'kl', :'kl', :'kd', 'junk', NULL,
                                         left(:'kb', 20) || repeat('A', 49)]) as returns;
select keyhippo.report_leaked_keys(NULL) as null_list, keyhippo.report_leaked_keys('{}') as empty_list;
reset role;
select description, is_revoked, revoked_reason,
       (select count(*) from keyhippo.api_key_secrets s where s.key_metadata_id = m.id) as hashes
  from keyhippo.api_key_metadata m where m.user_id = 'bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb' order by description;
-- Each leaked key's owner is told in the audit log (the webhook sends audit rows on).
select action, function_name, data -> 'leaked_key' ->> 'user_id' as owner,
       data -> 'leaked_key' ->> 'description' as description
  from keyhippo.audit_log where action = 'leaked_key' order by description;
select count(*) as revocation_rows from keyhippo.audit_log
 where action = 'UPDATE' and function_name = 'report_leaked_keys';
-- Reporting the same key again changes nothing.
set local role authenticated;
select keyhippo.report_leaked_keys(array[:'kl']) as again;
reset role;
select count(*) as leak_rows from keyhippo.audit_log where action = 'leaked_key';

\echo '--- with the audit webhook configured, the report goes out through it too'
-- A stand-in for pg_net that records what it would send.
create schema net;
create table net.sent (url text, body jsonb);
create function net.http_post(url text, body jsonb, headers jsonb) returns bigint
language sql as $$ insert into net.sent values (url, body); select 1::bigint $$;
insert into keyhippo_internal.config (key, value) values ('audit_log_endpoint', 'https://hooks.example.com/keyhippo')
    on conflict (key) do update set value = excluded.value;
select keyhippo_internal.enable_audit_log_notify();
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select api_key as kw, api_key_id as idw from keyhippo.create_api_key('leaks by webhook') \gset
reset role;
select set_config('request.jwt.claims', '', true) = '' as cleared;
set local role anon;
select keyhippo.report_leaked_keys(array[:'kw']) as reported;
reset role;
select url, body -> 'data' -> 'leaked_key' ->> 'id' = :'idw' as names_the_key,
       body -> 'data' -> 'leaked_key' ->> 'user_id' as owner
  from net.sent where body ->> 'action' = 'leaked_key';
select keyhippo_internal.disable_audit_log_notify();

\echo '--- at most 1,000 keys of at most 1 kB each: 22023'
savepoint s;
set local role anon;
select keyhippo.report_leaked_keys(array_fill('junk'::text, array[1001]));
\echo :LAST_ERROR_SQLSTATE
rollback to s;
set local role anon;
select keyhippo.report_leaked_keys(array[repeat('x', 1025)]);
\echo :LAST_ERROR_SQLSTATE
rollback to s;
-- A thousand keys of junk are accepted, and cost no table read.
select pg_stat_get_xact_numscans('keyhippo.api_key_metadata_prefix_hash_idx'::regclass) as scans_before \gset
set local role service_role;
select keyhippo.report_leaked_keys(array_fill('junk'::text, array[1000])) as thousand_accepted;
reset role;
select pg_stat_get_xact_numscans('keyhippo.api_key_metadata_prefix_hash_idx'::regclass) - :scans_before as scans_for_junk;

\echo '--- keyhippo.disable_unused_after: the periodic job disables keys unused that long'
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key_id as id_old from keyhippo.create_api_key('used long ago') \gset
select api_key_id as id_never from keyhippo.create_api_key('never used and old') \gset
select api_key_id as id_recent from keyhippo.create_api_key('used recently') \gset
reset role;
update keyhippo.api_key_metadata set created_at = now() - interval '60 days' where id in (:'id_old', :'id_never', :'id_recent');
update keyhippo.api_key_metadata set last_used_at = now() - interval '45 days' where id = :'id_old';
update keyhippo.api_key_metadata set last_used_at = now() - interval '1 day' where id = :'id_recent';
-- Off by default: nothing is disabled.
select keyhippo.update_expiring_keys() >= 0 as job_ran;
select count(*) as disabled from keyhippo.api_key_metadata where disabled_at is not null
   and id in (:'id_old', :'id_never', :'id_recent');
set local keyhippo.disable_unused_after = '30 days';
select keyhippo.update_expiring_keys() >= 0 as job_ran;
select description, disabled_at is not null as disabled from keyhippo.api_key_metadata
 where id in (:'id_old', :'id_never', :'id_recent') order by description;
-- A value that is no positive interval disables nothing and says so.
set local keyhippo.disable_unused_after = 'soon';
select keyhippo.update_expiring_keys() >= 0 as job_ran;
rollback;
