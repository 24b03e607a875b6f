-- A plain Postgres: no auth schema. Identity is request.jwt.claims ->> 'sub', user ids are not
-- foreign keys, and the PostgREST roles were created by the extension.
\set ON_ERROR_STOP 0
\set U '{"sub":"dddddddd-dddd-4ddd-8ddd-dddddddddddd","role":"authenticated"}'
select to_regclass('auth.users') is null as no_auth_users;
-- Created by CREATE EXTENSION (this database was set up before any other on its cluster).
select rolname, rolcanlogin from pg_roles where rolname in ('anon', 'authenticated', 'service_role') order by 1;
select conname from pg_constraint where conrelid = 'keyhippo.api_key_metadata'::regclass and contype = 'f' order by 1;

begin;
select set_config('request.jwt.claims', :'U', true) is not null as as_user;
set local role authenticated;
select api_key as k, api_key_id as id from keyhippo.create_api_key('plain key') \gset
select user_id, permissions from keyhippo.verify_api_key(:'k');
select description from keyhippo.api_key_metadata;
-- The request context works the same without auth.users: JWT sub, then a key in x-api-key.
select user_id, permissions from keyhippo.current_user_context();
reset role;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as as_anon,
       set_config('request.headers', json_build_object('x-api-key', :'k')::text, true) is not null as with_key;
set local role anon;
select user_id from keyhippo.current_user_context();
select keyhippo.check_request();
reset role;
select set_config('request.jwt.claims', :'U', true) is not null as as_user,
       set_config('request.headers', '', true) = '' as no_headers;
set local role authenticated;
select keyhippo.revoke_api_key(:'id') as revoked;
select count(*) as verifies_after_revoke from keyhippo.verify_api_key(:'k');
-- App code can set the subject itself, as PostgREST does, with set_config(..., true).
reset role;
select set_config('request.jwt.claims', '{"sub":"eeeeeeee-eeee-4eee-8eee-eeeeeeeeeeee"}', true) is not null as as_other;
set local role authenticated;
select count(*) as other_sees from keyhippo.api_key_metadata;
rollback;

-- DROP EXTENSION ... CASCADE and CREATE EXTENSION again work, and leave a working extension.
begin;
drop extension keyhippo cascade;
-- Only the empty schema CREATE EXTENSION made for keyhippo.control's `schema` stays behind
-- (Postgres never drops that one); everything in it is gone.
select n.nspname as schema_left,
       (select count(*) from pg_class c where c.relnamespace = n.oid) as relations,
       (select count(*) from pg_proc p where p.pronamespace = n.oid) as functions,
       (select count(*) from pg_type t where t.typnamespace = n.oid) as types
  from pg_namespace n where n.nspname like 'keyhippo%';
create extension keyhippo;
select set_config('request.jwt.claims', :'U', true) is not null as as_user;
set local role authenticated;
select api_key as k2 from keyhippo.create_api_key('after reinstall') \gset
select count(*) as verifies_after_reinstall from keyhippo.verify_api_key(:'k2');
rollback;
