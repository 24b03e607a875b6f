-- PostgREST's transaction, replayed role by role: claims and headers in request.*, SET LOCAL
-- ROLE, the pre-request hook keyhippo.check_request(), then the query. Each request runs in a
-- savepoint of its own, as each PostgREST request runs in a transaction of its own.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\set B '{"sub":"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb","role":"authenticated"}'
begin;
-- CREATE EXTENSION changed no role: PostgREST's authenticator has no setting of keyhippo's.
select r.rolname, s.setconfig
  from pg_db_role_setting s join pg_roles r on r.oid = s.setrole
 where r.rolname = 'authenticator';
-- Switching the hook on sets it for this database only; off removes it again.
select keyhippo.enable_postgrest_check();
select s.setdatabase = (select oid from pg_database where datname = current_database()) as this_database_only,
       s.setconfig
  from pg_db_role_setting s join pg_roles r on r.oid = s.setrole
 where r.rolname = 'authenticator';
select keyhippo.enable_postgrest_check(require_api_key => true);
select s.setconfig
  from pg_db_role_setting s join pg_roles r on r.oid = s.setrole
 where r.rolname = 'authenticator';
select keyhippo.disable_postgrest_check();
select count(*) as settings_left
  from pg_db_role_setting s join pg_roles r on r.oid = s.setrole
 where r.rolname = 'authenticator';
-- Without PostgREST's login role there is nothing to set: 42704.
savepoint s;
alter role authenticator rename to authenticator_elsewhere;
select keyhippo.enable_postgrest_check();
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- A hook set for every database (as KeyHippo 1.2.5 did) is not this database's to remove: a
-- warning says so.
savepoint s;
alter role authenticator set pgrst.db_pre_request = 'keyhippo.check_request';
select keyhippo.disable_postgrest_check();
rollback to savepoint s;
-- Only the database owner (and superusers) may switch it.
savepoint s;
set local role service_role;
select keyhippo.enable_postgrest_check();
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;

insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'b@example.com');
create table public.notes (id int primary key, owner uuid not null, body text);
insert into public.notes values
    (1, 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'A one'),
    (2, 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'A two'),
    (3, 'bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'B one');
alter table public.notes enable row level security;
grant select on public.notes to anon, authenticated;
-- The policy of the README: a key acts as its owner, exactly like a signed-in session.
create policy notes_owner on public.notes for select to anon, authenticated
    using (owner = (select user_id from keyhippo.current_user_context()));

-- A signs in and creates a key; B does too.
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as key_a, api_key_id as id_a from keyhippo.create_api_key('PostgREST key') \gset
select keyhippo.update_key_claims(:'id_a', '{"plan":"pro"}');
reset role;
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select api_key as key_b, api_key_id as id_b from keyhippo.create_api_key('B key') \gset
reset role;
-- Back to a connection with no request settings, as the pool hands it to the next request.
select set_config('request.jwt.claims', '', true) = '' as cleared;

\echo '--- anonymous request with A''s key: admitted, sees exactly A''s rows'
savepoint req;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims,
       set_config('request.headers', json_build_object('x-api-key', :'key_a')::text, true) is not null as headers;
set local role anon;
select keyhippo.check_request();
select body from public.notes order by id;
select user_id, scope_id, permissions from keyhippo.current_user_context();
select keyhippo.key_data() - 'id' as key_data, (keyhippo.key_data() ->> 'id') = :'id_a' as key_data_id_matches;
select keyhippo.authorize('manage_api_keys') as may_manage_keys, keyhippo.authorize('manage_groups') as may_manage_groups;
rollback to savepoint req;

\echo '--- anonymous request without a key: admitted as anon (as with KeyHippo 1.2.5), sees nothing'
savepoint req;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims;
set local role anon;
select keyhippo.check_request();
rollback to savepoint req;
\echo '--- with keyhippo.require_api_key on, the same request is refused with 401 "missing"'
savepoint req;
set local keyhippo.require_api_key = on;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims;
set local role anon;
select keyhippo.check_request();
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint req;
\echo '--- ... but a signed-in request without a key still passes'
savepoint req;
set local keyhippo.require_api_key = on;
select set_config('request.jwt.claims', :'B', true) is not null as claims;
set local role authenticated;
select keyhippo.check_request();
rollback to savepoint req;
savepoint req;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims;
set local role anon;
select body from public.notes order by id;
select count(*) as context_rows from keyhippo.current_user_context();
select keyhippo.key_data() is null as no_key_data;
rollback to savepoint req;

\echo '--- bad keys are refused as "invalid"; headers that carry no key pass (refused as "missing" when keys are required)'
create temp table bad_headers (label text, headers text);
insert into bad_headers values
    ('real prefix, wrong secret', json_build_object('x-api-key', left(:'key_a', 20) || repeat('A', 49))::text),
    ('truncated key', json_build_object('x-api-key', left(:'key_a', 60))::text),
    ('junk', '{"x-api-key":"'' or 1=1 --"}'),
    ('key in another header', json_build_object('authorization', :'key_a')::text),
    ('key as a number', '{"x-api-key":42}'),
    ('empty setting', ''),
    ('malformed JSON', '{"x-api-key":'),
    ('JSON array', '["x-api-key"]');
grant select on bad_headers to anon;
create function pg_temp.try_request(p_headers text) returns text language plpgsql as $$
begin
    perform set_config('request.headers', p_headers, true);
    perform keyhippo.check_request();
    return 'admitted';
exception when sqlstate 'PGRST' then
    return 'refused: ' || sqlerrm;
end $$;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims;
set local role anon;
select label, pg_temp.try_request(headers) as outcome,
       (select keyhippo.key_data() is null) as no_key_data
  from bad_headers order by label;
reset role;
set local keyhippo.require_api_key = on;
set local role anon;
select label, pg_temp.try_request(headers) as outcome_when_required
  from bad_headers order by label;
reset role;
reset keyhippo.require_api_key;

\echo '--- signed-in requests pass the hook and see their own rows'
savepoint req;
select set_config('request.jwt.claims', :'B', true) is not null as claims;
set local role authenticated;
select keyhippo.check_request();
select body from public.notes order by id;
select user_id from keyhippo.current_user_context();
rollback to savepoint req;
savepoint req;
set local role service_role;
select keyhippo.check_request();
rollback to savepoint req;

\echo '--- a key in the header comes before the JWT: B''s session carrying A''s key acts as A'
savepoint req;
select set_config('request.jwt.claims', :'B', true) is not null as claims,
       set_config('request.headers', json_build_object('x-api-key', :'key_a')::text, true) is not null as headers;
set local role authenticated;
select body from public.notes order by id;
rollback to savepoint req;

\echo '--- a key in the header that is not valid is refused even on a signed-in request'
savepoint req;
select set_config('request.jwt.claims', :'B', true) is not null as claims,
       set_config('request.headers', json_build_object('x-api-key', left(:'key_a', 60))::text, true) is not null as headers;
set local role authenticated;
select keyhippo.check_request();
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint req;

\echo '--- a disabled key is refused with "disabled"; enabled again, admitted'
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select keyhippo.disable_api_key(:'id_b') as disabled;
reset role;
savepoint req;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims,
       set_config('request.headers', json_build_object('x-api-key', :'key_b')::text, true) is not null as headers;
set local role anon;
select keyhippo.check_request();
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint req;
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select keyhippo.enable_api_key(:'id_b') as enabled;
reset role;
savepoint req;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims,
       set_config('request.headers', json_build_object('x-api-key', :'key_b')::text, true) is not null as headers;
set local role anon;
select keyhippo.check_request();
select body from public.notes order by id;
rollback to savepoint req;

\echo '--- an expired key is refused with "expired"'
savepoint req;
update keyhippo.api_key_metadata set expires_at = now() - interval '1 minute' where id = :'id_b';
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims,
       set_config('request.headers', json_build_object('x-api-key', :'key_b')::text, true) is not null as headers;
set local role anon;
select keyhippo.key_data() is null as no_key_data;
select count(*) as context_rows from keyhippo.current_user_context();
select keyhippo.check_request();
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint req;

\echo '--- after A revokes the key, the same request is refused and sees nothing'
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select keyhippo.revoke_api_key(:'id_a') as revoked;
reset role;
savepoint req;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as claims,
       set_config('request.headers', json_build_object('x-api-key', :'key_a')::text, true) is not null as headers;
set local role anon;
select body from public.notes order by id;
select keyhippo.key_data() is null as no_key_data;
select keyhippo.check_request();
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint req;

\echo '--- ordinary users see only their own keys, even with user_role = user in the JWT'
savepoint req;
select set_config('request.jwt.claims', '{"sub":"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb","role":"authenticated","user_role":"user"}', true) is not null as claims;
set local role authenticated;
select keyhippo.authorize('manage_api_keys') as holds_manage_api_keys;
select description from keyhippo.api_key_metadata order by description;
rollback to savepoint req;
\echo '--- a JWT with user_role = admin (custom access token hook) sees all and holds every permission'
savepoint req;
select set_config('request.jwt.claims', '{"sub":"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb","role":"authenticated","user_role":"admin"}', true) is not null as claims;
set local role authenticated;
select keyhippo.authorize('manage_groups') as holds_manage_groups;
select description from keyhippo.api_key_metadata order by description;
rollback to savepoint req;

\echo '--- is_authorized'
savepoint req;
select set_config('request.jwt.claims', :'B', true) is not null as claims;
set local role authenticated;
select keyhippo.is_authorized('public.notes', 'manage_api_keys') as holds,
       keyhippo.is_authorized('public.notes', 'manage_roles') as lacks,
       keyhippo.is_authorized('public.notes', 'no_such_permission') as unknown;
rollback to savepoint req;
rollback;
