-- Credits: who grants them, what an admitted request costs, spend_credits, refunds when a
-- transaction or savepoint rolls back, two-phase commit refused, the 429 responses. The server
-- preloads keyhippo (balances are in shared memory). A request is a transaction.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\set B '{"sub":"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb","role":"authenticated"}'
insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'b@example.com');
begin;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as key_a, api_key_id as id_a from keyhippo.create_api_key('metered') \gset
select api_key as key_u, api_key_id as id_u from keyhippo.create_api_key('unmetered') \gset
select api_key as key_r, api_key_id as id_r from keyhippo.create_api_key('refilled') \gset
commit;

\echo '--- only service_role and admins grant credits; malformed grants are refused'
begin;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select keyhippo.set_credits(:'id_a', 1000);
\echo :LAST_ERROR_SQLSTATE
rollback;
begin;
set local role service_role;
savepoint s;
select keyhippo.set_credits(:'id_a', -1);
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.set_credits(:'id_a', 10, 5);
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.set_credits(:'id_a', 10, 0, '1 day');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.set_credits(:'id_a', 10, 5, '1 month');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.set_credits('00000000-0000-4000-8000-000000000000', 10);
\echo :LAST_ERROR_SQLSTATE
rollback;

\echo '--- key A gets 5 credits; each admitted request costs 1, spend_credits more'
set role service_role;
select keyhippo.set_credits(:'id_a', 5);
select keyhippo.set_credits(:'id_r', 1, 10, '1 day');
reset role;
begin;
set local role anon;
select status from keyhippo.verify_api_key_status(:'key_a');
select keyhippo.spend_credits(0) as left_after_admission;
select keyhippo.spend_credits(2) as left_after_spending_2;
commit;
\echo '--- a rolled-back request gets its credits back, admission included'
begin;
set local role anon;
select status from keyhippo.verify_api_key_status(:'key_a');
select keyhippo.spend_credits(1) as left_inside;
rollback;
begin;
set local role anon;
select status from keyhippo.verify_api_key_status(:'key_a');
select keyhippo.spend_credits(0) as left_after_the_rollback;
\echo '--- a rolled-back savepoint refunds what was spent inside it'
savepoint s;
select keyhippo.spend_credits(1) as left_in_savepoint;
rollback to savepoint s;
select keyhippo.spend_credits(0) as left_after_rollback_to_savepoint;
\echo '--- not enough: 429 through PostgREST, nothing charged'
savepoint s;
select keyhippo.spend_credits(5);
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.spend_credits(0) as left_after_refusal;
commit;
\echo '--- one credit is left: the next request takes it, the one after is refused'
select status from keyhippo.verify_api_key_status(:'key_a') as takes_the_last;
select status, api_key_id = :'id_a' as same_key, permissions is null as no_permissions
  from keyhippo.verify_api_key_status(:'key_a') as over;
\echo '--- verify_api_key never spends and never refuses for credits'
select count(*) as verify_api_key from keyhippo.verify_api_key(:'key_a');
create function pg_temp.try_request(p_headers text) returns text language plpgsql as $$
declare
    v_detail text;
begin
    perform set_config('request.headers', p_headers, true);
    perform keyhippo.check_request();
    return 'admitted';
exception when sqlstate 'PGRST' then
    get stacked diagnostics v_detail = pg_exception_detail;
    return regexp_replace(sqlerrm || ' ' || v_detail, '("retry_after": |Retry-After": "|after )[0-9]+', '\1N', 'g');
end $$;
grant execute on function pg_temp.try_request(text) to anon;
begin;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims;
set local role anon;
select pg_temp.try_request(json_build_object('x-api-key', :'key_a')::text) as no_credits_left_postgrest;
select pg_temp.try_request(json_build_object('x-api-key', :'key_r')::text) as refilled_key_first;
select pg_temp.try_request(json_build_object('x-api-key', :'key_r')::text) as same_request_again;
commit;
begin;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims;
set local role anon;
select pg_temp.try_request(json_build_object('x-api-key', :'key_r')::text) as refilled_key_empty;
commit;

\echo '--- READ ONLY transactions (PostgREST GET requests) spend too'
set role service_role;
select keyhippo.set_credits(:'id_r', 4);
reset role;
begin read only;
set local role anon;
select status from keyhippo.verify_api_key_status(:'key_r');
select keyhippo.spend_credits(2) as left_read_only;
commit;
begin read only;
set local role anon;
select status from keyhippo.verify_api_key_status(:'key_r');
select keyhippo.spend_credits(0) as left_in_the_next_request;
rollback;

\echo '--- a key without credits: spend_credits says NULL; with no key admitted, 22023'
begin;
set local role anon;
select status from keyhippo.verify_api_key_status(:'key_u');
select keyhippo.spend_credits(3) is null as unlimited;
rollback;
begin;
set local role anon;
select keyhippo.spend_credits(1);
\echo :LAST_ERROR_SQLSTATE
rollback;
begin;
set local role anon;
select status from keyhippo.verify_api_key_status(:'key_u');
select keyhippo.spend_credits(-1);
\echo :LAST_ERROR_SQLSTATE
rollback;

\echo '--- a transaction that spent credits cannot be prepared'
set role service_role;
select keyhippo.set_credits(:'id_u', 3);
reset role;
begin;
select status from keyhippo.verify_api_key_status(:'key_u');
prepare transaction 'kh_credits';
\echo :LAST_ERROR_SQLSTATE
select status from keyhippo.verify_api_key_status(:'key_u') as after_the_refused_prepare;
begin;
select status from keyhippo.verify_api_key_status(:'key_u');
select keyhippo.spend_credits(0) as nothing_was_spent_by_the_prepare;
rollback;

\echo '--- written back: the table shows what is left; owners read their own rows'
select keyhippo.flush_key_usage() is not null as written;
begin;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select m.description, c.remaining, c.refill_amount, c.refill_interval
  from keyhippo.api_key_credits c join keyhippo.api_key_metadata m on m.id = c.api_key_id
 order by m.description;
reset role;
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select count(*) as rows_seen from keyhippo.api_key_credits;
rollback;

\echo '--- a new grant replaces the balance; NULL removes the credits'
set role service_role;
select keyhippo.set_credits(:'id_a', 2);
reset role;
select status from keyhippo.verify_api_key_status(:'key_a') as after_new_grant;
set role service_role;
select keyhippo.set_credits(:'id_a', NULL);
reset role;
select status from keyhippo.verify_api_key_status(:'key_a') as credits_removed;
select count(*) as grants_left from keyhippo.api_key_credits where api_key_id = :'id_a';

delete from auth.users;
delete from keyhippo.audit_log;
