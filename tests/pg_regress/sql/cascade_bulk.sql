-- Deleting a user deletes their keys; 500 keys are all distinct and all verify; no plaintext
-- key is stored in any table.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\set B '{"sub":"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb","role":"authenticated"}'
begin;
insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'b@example.com');
create temp table issued (n int, api_key text, api_key_id uuid);
grant all on issued to authenticated;

select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
insert into issued
select n, k.api_key, k.api_key_id
  from generate_series(1, 500) n, keyhippo.create_api_key('bulk ' || n) k;
select count(*) as issued, count(distinct api_key) as distinct_keys,
       count(distinct api_key_id) as distinct_ids,
       count(distinct left(api_key, 19)) as distinct_prefixes from issued;
select count(*) as verified
  from issued i, keyhippo.verify_api_key(i.api_key) v
 where v.user_id = 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa';

reset role;
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
insert into issued select 0, api_key, api_key_id from keyhippo.create_api_key('B key');
reset role;

-- No table of the database holds any issued key, nor its secret part, in any column (as
-- superuser, so every row of every table is searched, api_key_secrets and audit_log included).
create temp table found (tbl text, hits bigint);
do $$
declare
    t record;
    hits bigint;
begin
    for t in select c.oid::regclass as rel
               from pg_class c join pg_namespace n on n.oid = c.relnamespace
              where c.relkind = 'r' and n.nspname not in ('pg_catalog', 'information_schema')
                and n.nspname not like 'pg_temp%' and n.nspname not like 'pg_toast%'
    loop
        execute format(
            'select count(*) from %s r, pg_temp.issued i
              where strpos(r::text, substr(i.api_key, 21, 43)) > 0', t.rel) into hits;
        insert into found values (t.rel::text, hits);
    end loop;
end
$$;
select count(*) > 10 as tables_searched, coalesce(sum(hits), 0) as plaintext_hits from found;
-- Control: the same search over the list of issued keys finds each of them.
select count(*) as control_hits
  from pg_temp.issued r, pg_temp.issued i where strpos(r::text, substr(i.api_key, 21, 43)) > 0;

-- Deleting user A removes A's 500 keys and their hashes; B's key is untouched.
delete from auth.users where id = 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa';
select count(*) as a_keys_left from keyhippo.api_key_metadata where user_id = 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa';
select count(*) as hashes_left from keyhippo.api_key_secrets;
select count(v.user_id) as verifying_keys from issued i left join lateral keyhippo.verify_api_key(i.api_key) v on true;
rollback;
