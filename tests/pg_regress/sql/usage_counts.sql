-- Usage counts: verifications per key and hour by outcome, counted by the calls that admit a
-- request and written by the background workers (here at once, by flush_key_usage). Owners
-- read their own keys' rows. The server preloads keyhippo.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\set B '{"sub":"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb","role":"authenticated"}'
-- Counts go by the clock hour: never start near the end of one.
select pg_sleep(case when 3600 - extract(epoch from clock_timestamp())::numeric % 3600 < 30
                     then 3600 - extract(epoch from clock_timestamp())::numeric % 3600 + 1 else 0 end)
       is not null as hour_has_room;
select keyhippo.flush_key_usage() is not null as earlier_counts_written;
insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'b@example.com');
begin;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as key_a, api_key_id as id_a from keyhippo.create_api_key('counted') \gset
select api_key as key_d, api_key_id as id_d from keyhippo.create_api_key('disabled') \gset
select api_key as key_e, api_key_id as id_e from keyhippo.create_api_key('expired', NULL, '1 second') \gset
reset role;
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select api_key as key_b from keyhippo.create_api_key('B key') \gset
commit;
update keyhippo.api_key_metadata set expires_at = now() - interval '1 minute' where id = :'id_e';
update keyhippo.api_key_metadata set disabled_at = now() where id = :'id_d';
set role service_role;
select keyhippo.set_rate_limit(:'id_a', 3, '1 hour');
reset role;

\echo '--- five requests with key A (three admitted, two over its limit), one each with the others'
select status from keyhippo.verify_api_key_status(:'key_a');
select status from keyhippo.verify_api_key_status(:'key_a');
begin;
set local role anon;
select set_config('request.headers', json_build_object('x-api-key', :'key_a')::text, true) is not null as headers;
select keyhippo.check_request();
commit;
select status from keyhippo.verify_api_key_status(:'key_a');
select status from keyhippo.verify_api_key_status(:'key_a');
select status from keyhippo.verify_api_key_status(:'key_d');
select status from keyhippo.verify_api_key_status(:'key_e');
select status from keyhippo.verify_api_key_status(:'key_b');
\echo '--- not counted: verify_api_key (a validity check) and unknown keys'
select count(*) from keyhippo.verify_api_key(:'key_b');
select status from keyhippo.verify_api_key_status('kh_not_a_key');
-- A background writer may have taken some counts already and be writing them: wait for all
-- eight (at most ten seconds).
do $$
begin
    for i in 1..100 loop
        perform keyhippo.flush_key_usage();
        exit when (select coalesce(sum(u.count), 0) from keyhippo.api_key_usage u
                     join keyhippo.api_key_metadata m on m.id = u.api_key_id
                    where m.description in ('counted', 'disabled', 'expired', 'B key')) >= 8;
        perform pg_sleep(0.1);
    end loop;
end
$$;

\echo '--- one query: each of my keys, this hour, admitted and refused'
begin;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select m.description,
       coalesce(sum(u.count) filter (where u.outcome = 'VALID'), 0) as admitted,
       coalesce(sum(u.count) filter (where u.outcome <> 'VALID'), 0) as refused,
       string_agg(distinct u.outcome, ',' order by u.outcome) as outcomes
  from keyhippo.api_key_metadata m
  left join keyhippo.api_key_usage u
    on u.api_key_id = m.id and u.hour = to_timestamp(floor(extract(epoch from now()) / 3600) * 3600)
 group by m.description order by m.description;
reset role;
\echo '--- B sees only B''s rows; anon sees nothing'
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select count(*) as rows_seen, sum(count) as verifications from keyhippo.api_key_usage;
reset role;
set local role anon;
select count(*) from keyhippo.api_key_usage;
\echo :LAST_ERROR_SQLSTATE
rollback;

\echo '--- nobody but the workers writes them'
begin;
set local role service_role;
insert into keyhippo.api_key_usage values (:'id_a', now(), 'VALID', 1);
\echo :LAST_ERROR_SQLSTATE
rollback;

\echo '--- rows older than keyhippo.usage_retention (90 days by default) go at the next write'
insert into keyhippo.api_key_usage values
    (:'id_d', date_trunc('hour', now() - interval '91 days'), 'VALID', 5),
    (:'id_d', date_trunc('hour', now() - interval '89 days'), 'VALID', 7);
select keyhippo.flush_key_usage() is not null as written;
select sum(count) as old_counts_left from keyhippo.api_key_usage
 where api_key_id = :'id_d' and hour < now() - interval '30 days';
set keyhippo.usage_retention = '30 days';
select keyhippo.flush_key_usage() is not null as written;
select count(*) as old_rows_left from keyhippo.api_key_usage
 where api_key_id = :'id_d' and hour < now() - interval '30 days';
reset keyhippo.usage_retention;

\echo '--- counts outlive nothing: deleting a key deletes its rows'
delete from keyhippo.api_key_metadata where id = :'id_a';
select count(*) as rows_left from keyhippo.api_key_usage where api_key_id = :'id_a';

delete from auth.users;
delete from keyhippo.audit_log;
