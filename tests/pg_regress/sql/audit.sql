-- The audit trail, expiry notifications, retention, and the opt-in webhook.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\set C '{"sub":"cccccccc-cccc-4ccc-8ccc-cccccccccccc","role":"authenticated"}'
begin;
insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('cccccccc-cccc-4ccc-8ccc-cccccccccccc', 'c@example.com');
insert into keyhippo_rbac.user_group_roles (user_id, group_id, role_id)
select 'cccccccc-cccc-4ccc-8ccc-cccccccccccc', r.group_id, r.id from keyhippo_rbac.roles r where r.name = 'Admin';
delete from keyhippo.audit_log;
create temp table issued (api_key text);
grant all on issued to authenticated;
-- Shows the audit rows written since the last call (and forgets them).
create function pg_temp.audit_rows() returns table (action text, table_name text, acting_user text,
                                                    function_name text, summary text)
language sql as $$
    with gone as (delete from keyhippo.audit_log returning *)
    select action, table_name,
           case user_id when 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa' then 'A'
                        when 'cccccccc-cccc-4ccc-8ccc-cccccccccccc' then 'C' end,
           function_name,
           concat_ws(' ', data -> 'old_data' ->> 'description', data -> 'new_data' ->> 'description',
                     data -> 'new_data' ->> 'name', data -> 'new_data' ->> 'key',
                     'revoked=' || (data -> 'new_data' ->> 'is_revoked'))
      from gone order by "timestamp", 1, 2, 5
$$;

\echo '--- create, revoke, rotate by user A'
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
insert into issued select api_key from keyhippo.create_api_key('Audited');
select api_key_id as id1 from keyhippo.create_api_key('Revoked') \gset
select keyhippo.revoke_api_key(:'id1');
select api_key_id as id2 from keyhippo.create_api_key('Rotated') \gset
insert into issued select new_api_key from keyhippo.rotate_api_key(:'id2');
select keyhippo.update_key_claims(:'id2', '{"a": 1}');
update keyhippo.api_key_metadata set description = 'Renamed' where id = (select id from keyhippo.api_key_metadata where description = 'Audited');
-- A verify records use; that is not audited.
select count(*) as verified from issued i, keyhippo.verify_api_key(i.api_key);
reset role;
-- Nor is any other change of last_used_at alone; one that also changes another column is.
update keyhippo.api_key_metadata set last_used_at = now() - interval '1 day' where description = 'Renamed';
update keyhippo.api_key_metadata set last_used_at = now(), description = 'Renamed again' where description = 'Renamed';
update keyhippo.api_key_metadata set description = 'Renamed' where description = 'Renamed again';
select * from pg_temp.audit_rows();

\echo '--- an RBAC change by admin C, a config change, and service_role revoking'
select set_config('request.jwt.claims', :'C', true) is not null as as_admin_c;
set local role authenticated;
select keyhippo_rbac.create_group('Auditors', 'audited group') is not null as created;
reset role;
-- The database owner, with no request context: the acting user is NULL.
select set_config('request.jwt.claims', '', true) = '' as as_database_owner;
insert into keyhippo_internal.config (key, value) values ('webhook_secret', 'hunter2'), ('team_name', 'blue');
select set_config('request.jwt.claims', '{"role":"service_role"}', true) is not null as as_service_role;
set local role service_role;
select keyhippo.revoke_api_key(id) from keyhippo.api_key_metadata where description = 'Renamed';
reset role;
select * from pg_temp.audit_rows();

\echo '--- no audit row holds key material: no key, no secret part, no hash'
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
insert into issued select api_key from keyhippo.create_api_key('Another');
reset role;
select count(*) as audit_rows_now from keyhippo.audit_log;
select count(*) as rows_with_key_material
  from keyhippo.audit_log a, issued i
 where strpos(a::text, substr(i.api_key, 21, 43)) > 0;
select count(*) as rows_with_a_hash
  from keyhippo.audit_log a, keyhippo.api_key_secrets s
 where strpos(a::text, substr(s.key_hash, 8)) > 0;
-- The secret config value was masked.
insert into keyhippo_internal.config (key, value) values ('db_password', 'swordfish');
select data -> 'new_data' ->> 'value' as logged_value from keyhippo.audit_log
 where table_name = 'config' order by "timestamp" desc limit 1;
select count(*) as rows_with_secret_value from keyhippo.audit_log where data::text like '%swordfish%';
delete from keyhippo.audit_log;

\echo '--- a key updated into the expiry window is reported exactly once'
select id as soon_id from keyhippo.api_key_metadata where description = 'Another' \gset
update keyhippo.api_key_metadata set expires_at = now() + interval '48 hours' where id = :'soon_id';
update keyhippo.api_key_metadata set expires_at = now() + interval '24 hours' where id = :'soon_id';
update keyhippo.api_key_metadata set description = 'Still expiring' where id = :'soon_id';
select action, data -> 'expiring_key' ->> 'description' as description,
       (data -> 'expiring_key' ->> 'id') = :'soon_id' as right_key,
       (data -> 'expiring_key' ->> 'user_id') as user_id,
       (data -> 'expiring_key' ->> 'expires_at')::timestamptz = now() + interval '48 hours' as first_expiry
  from keyhippo.audit_log where action = 'expiring_key';
-- The periodic job finds nothing new: that key was reported when it entered the window.
select keyhippo.update_expiring_keys() as reported_by_job;
-- Renewed out of the window and moved back in: a new entry, reported again.
update keyhippo.api_key_metadata set expires_at = now() + interval '1 year' where id = :'soon_id';
update keyhippo.api_key_metadata set expires_at = now() + interval '1 day' where id = :'soon_id';
select count(*) as reports_of_that_key from keyhippo.audit_log
 where action = 'expiring_key' and (data -> 'expiring_key' ->> 'id') = :'soon_id';

\echo '--- a key that drifts into the window (time passes, no write) is reported by the job once'
-- Simulate the passage of time: move expires_at with triggers off, as if 97 hours had passed.
set local session_replication_role = replica;
update keyhippo.api_key_metadata set expires_at = now() + interval '1 hour'
 where description = 'Rotated' and not is_revoked;
set local session_replication_role = origin;
select keyhippo.update_expiring_keys() as reported_by_job;
select keyhippo.update_expiring_keys() as reported_again;
select count(*) as expiring_rows from keyhippo.audit_log where action = 'expiring_key';
-- Revoked keys are not reported.
select count(*) as revoked_reported from keyhippo.audit_log a
  join keyhippo.api_key_metadata m on m.id::text = a.data -> 'expiring_key' ->> 'id'
 where a.action = 'expiring_key' and m.is_revoked;

\echo '--- with notifications switched off, nothing is reported'
update keyhippo_internal.config set value = 'false' where key = 'enable_key_expiry_notifications';
select api_key_id as quiet_id from keyhippo.create_api_key('Quiet') \gset
select count(*) as before from keyhippo.audit_log where action = 'expiring_key' \gset
update keyhippo.api_key_metadata set expires_at = now() + interval '1 hour' where id = :'quiet_id';
select keyhippo.update_expiring_keys() as reported_by_job;
select count(*) - :before as new_expiring_rows from keyhippo.audit_log where action = 'expiring_key';
update keyhippo_internal.config set value = 'true' where key = 'enable_key_expiry_notifications';

\echo '--- retention'
insert into keyhippo.audit_log ("timestamp", action, table_name) values
    (now() - interval '100 days', 'OLD', 'x'), (now() - interval '89 days', 'RECENT', 'x');
select keyhippo.purge_audit_log() as purged;
select action from keyhippo.audit_log where table_name = 'x';
update keyhippo_internal.config set value = '0' where key = 'audit_log_retention_days';
insert into keyhippo.audit_log ("timestamp", action, table_name) values (now() - interval '1000 days', 'ANCIENT', 'x');
select keyhippo.purge_audit_log() as purged_with_retention_0;

\echo '--- the webhook: nothing is sent unless pg_net exists, an endpoint is set, and it is enabled'
savepoint s;
select keyhippo_internal.enable_audit_log_notify();
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- A stand-in for pg_net that records what it would send.
create schema net;
create table net.sent (url text, body jsonb);
create function net.http_post(url text, body jsonb, headers jsonb) returns bigint
language sql as $$ insert into net.sent values (url, body); select 1::bigint $$;
savepoint s;
select keyhippo_internal.enable_audit_log_notify();
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- Even switched on by hand, with no endpoint nothing goes out.
update keyhippo_internal.config set value = 'true' where key = 'enable_http_logging';
create trigger keyhippo_audit_log_notify after insert on keyhippo.audit_log
    for each row execute function keyhippo_internal.notify_audit_change();
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
insert into issued select api_key from keyhippo.create_api_key('Not sent');
reset role;
select count(*) as sent_without_endpoint from net.sent;
drop trigger keyhippo_audit_log_notify on keyhippo.audit_log;
update keyhippo_internal.config set value = 'false' where key = 'enable_http_logging';
-- With an endpoint and enabled: audit events are delivered.
insert into keyhippo_internal.config (key, value) values ('audit_log_endpoint', 'https://audit.example.test/ingest');
select keyhippo_internal.enable_audit_log_notify();
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
insert into issued select api_key from keyhippo.create_api_key('Sent');
reset role;
select url, body ->> 'action' as action, body ->> 'table_name' as table_name,
       body -> 'data' -> 'new_data' ->> 'description' as description
  from net.sent order by body ->> 'table_name';
select count(*) as sent_with_key_material from net.sent s, issued i
 where strpos(s.body::text, substr(i.api_key, 21, 43)) > 0;
select keyhippo_internal.disable_audit_log_notify();
delete from net.sent;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select count(*) from keyhippo.create_api_key('After disable');
reset role;
select count(*) as sent_after_disable from net.sent;
rollback;
