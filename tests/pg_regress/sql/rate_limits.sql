-- Rate limits: who sets them, who reads them, what they refuse and what they never touch. The
-- server preloads keyhippo (counting is in shared memory). A request is a transaction: outside
-- an explicit transaction block every statement below is one.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\set B '{"sub":"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb","role":"authenticated"}'
-- Windows are aligned to the clock (an hour here): never start near the end of one.
select pg_sleep(case when 3600 - extract(epoch from clock_timestamp())::numeric % 3600 < 30
                     then 3600 - extract(epoch from clock_timestamp())::numeric % 3600 + 1 else 0 end)
       is not null as window_has_room;
insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'b@example.com');
begin;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as key_a, api_key_id as id_a from keyhippo.create_api_key('limited') \gset
select api_key as key_a2, api_key_id as id_a2 from keyhippo.create_api_key('unlimited') \gset
reset role;
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select api_key as key_b1 from keyhippo.create_api_key('B one') \gset
select api_key as key_b2 from keyhippo.create_api_key('B two') \gset
commit;

\echo '--- only service_role and admins set limits'
begin;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select keyhippo.set_rate_limit(:'id_a', 1000, '1 hour');
\echo :LAST_ERROR_SQLSTATE
rollback;
begin;
set local role anon;
select keyhippo.set_rate_limit(:'id_a', 1000, '1 hour');
\echo :LAST_ERROR_SQLSTATE
rollback;

\echo '--- malformed limits are refused'
begin;
set local role service_role;
savepoint s;
select keyhippo.set_rate_limit(:'id_a', 0, '1 hour');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.set_rate_limit(:'id_a', 10, NULL);
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.set_rate_limit(:'id_a', 10, '0');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.set_rate_limit(:'id_a', 10, '-1 minute');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.set_rate_limit(:'id_a', 10, '1 month');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.set_rate_limit(:'id_a', 10, '400 days');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.set_rate_limit(NULL, 10, '1 hour');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.set_rate_limit('00000000-0000-4000-8000-000000000000', 10, '1 hour');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.set_owner_rate_limit('eeeeeeee-eeee-4eee-8eee-eeeeeeeeeeee', 10, '1 hour');
\echo :LAST_ERROR_SQLSTATE
rollback;

\echo '--- service_role limits key A to 2 requests an hour, and B''s keys to 1 together'
set role service_role;
select keyhippo.set_rate_limit(:'id_a', 2, '1 hour');
select keyhippo.set_owner_rate_limit('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 1, '1 hour');
reset role;
select action, table_name, data -> 'new_data' ->> 'max_requests' as max_requests
  from keyhippo.audit_log where table_name in ('api_key_rate_limits', 'owner_rate_limits')
 order by table_name;

\echo '--- owners read their own limits, nobody else''s'
begin;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key_id = :'id_a' as own_key, max_requests, per from keyhippo.api_key_rate_limits;
select count(*) as owner_limits_seen from keyhippo.owner_rate_limits;
reset role;
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select count(*) as key_limits_seen from keyhippo.api_key_rate_limits;
select max_requests, per from keyhippo.owner_rate_limits;
reset role;
set local role anon;
select count(*) from keyhippo.api_key_rate_limits;
\echo :LAST_ERROR_SQLSTATE
rollback;

\echo '--- one request counts once, however often it verifies'
begin;
set local role anon;
select status from keyhippo.verify_api_key_status(:'key_a');
select status from keyhippo.verify_api_key_status(:'key_a');
select status from keyhippo.verify_api_key_status(:'key_a');
commit;
select status from keyhippo.verify_api_key_status(:'key_a') as second_request;
\echo '--- the third request in the hour is refused; the key''s row, but no permissions'
select status, api_key_id = :'id_a' as same_key, user_id = 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa' as owner,
       permissions is null as no_permissions, expires_at is not null as expiry
  from keyhippo.verify_api_key_status(:'key_a') as third_request;
\echo '--- in a READ ONLY transaction too, and through PostgREST''s hook: HTTP 429 with Retry-After'
begin read only;
select status from keyhippo.verify_api_key_status(:'key_a');
commit;
create function pg_temp.try_request(p_headers text) returns text language plpgsql as $$
declare
    v_detail text;
begin
    perform set_config('request.headers', p_headers, true);
    perform keyhippo.check_request();
    return 'admitted';
exception when sqlstate 'PGRST' then
    get stacked diagnostics v_detail = pg_exception_detail;
    -- The seconds left in the window vary: shown as N.
    return regexp_replace(sqlerrm || ' ' || v_detail, '("retry_after": |Retry-After": "|after )[0-9]+', '\1N', 'g');
end $$;
grant execute on function pg_temp.try_request(text) to anon;
begin;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims;
set local role anon;
select pg_temp.try_request(json_build_object('x-api-key', :'key_a')::text) as limited_key;
select pg_temp.try_request(json_build_object('x-api-key', :'key_a2')::text) as unlimited_key;
commit;
select (select retry_after from (select (keyhippo_internal.rate_limit_refusal() ->> 'retry_after')::int retry_after) r)
       is null as refusal_forgotten_after_the_transaction;

\echo '--- the validity checks never count and never refuse'
begin;
set local role anon;
select count(*) as verify_api_key from keyhippo.verify_api_key(:'key_a');
select set_config('request.headers', json_build_object('x-api-key', :'key_a')::text, true) is not null as headers;
select count(*) as current_user_context from keyhippo.current_user_context() where user_id is not null;
select keyhippo.key_data() is not null as key_data;
commit;

\echo '--- an owner''s limit is shared by all of that owner''s keys'
select status from keyhippo.verify_api_key_status(:'key_b1') as b_first_key;
select status from keyhippo.verify_api_key_status(:'key_b2') as b_second_key;
begin;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims;
set local role anon;
select pg_temp.try_request(json_build_object('x-api-key', :'key_b2')::text) as b_through_postgrest;
commit;

\echo '--- a raised limit applies from the next statement; a removed one lets everything through'
set role service_role;
select keyhippo.set_rate_limit(:'id_a', 3, '1 hour');
reset role;
select status from keyhippo.verify_api_key_status(:'key_a') as third_of_three;
select status from keyhippo.verify_api_key_status(:'key_a') as fourth_of_three;
set role service_role;
select keyhippo.set_rate_limit(:'id_a', NULL, NULL);
select keyhippo.set_owner_rate_limit('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', NULL, NULL);
reset role;
select status from keyhippo.verify_api_key_status(:'key_a') as limit_removed;
select status from keyhippo.verify_api_key_status(:'key_b2') as owner_limit_removed;
select count(*) as limits_left from keyhippo.api_key_rate_limits;

\echo '--- deleting a key deletes its limit'
set role service_role;
select keyhippo.set_rate_limit(:'id_a2', 5, '1 minute');
reset role;
delete from keyhippo.api_key_metadata where id = :'id_a2';
select count(*) as limits_left from keyhippo.api_key_rate_limits;

delete from auth.users;
delete from keyhippo.owner_rate_limits;
delete from keyhippo.audit_log;
