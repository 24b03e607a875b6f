-- The security model in the catalogue: hashes unreadable, definer functions pinned, nothing
-- executable by PUBLIC that should not be.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as key_a from keyhippo.create_api_key('secret holder') \gset

-- api_key_secrets: no client role may read it, not even the key's owner or service_role.
savepoint s;
select * from keyhippo.api_key_secrets;
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
reset role;
set local role anon;
select * from keyhippo.api_key_secrets;
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
reset role;
set local role service_role;
select * from keyhippo.api_key_secrets;
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
reset role;
select has_table_privilege(r, 'keyhippo.api_key_secrets', 'select') as can_read_secrets, r as role
  from unnest(array['anon', 'authenticated', 'service_role']) r order by r;

-- What the stored hash looks like.
select key_hash ~ '^sha256\$[0-9a-f]{64}$' as hash_names_algorithm,
       key_hash = 'sha256$' || encode(sha256(convert_to(:'key_a', 'UTF8')), 'hex') as is_sha256_of_key
  from keyhippo.api_key_secrets;

-- Every SECURITY DEFINER function of the extension pins search_path.
select p.oid::regprocedure as definer_function, p.proconfig
  from pg_proc p
  join pg_depend d on d.objid = p.oid and d.deptype = 'e'
  join pg_extension e on e.oid = d.refobjid and e.extname = 'keyhippo'
 where p.prosecdef
 order by p.oid::regprocedure::text;

-- What anon and authenticated may execute.
select p.oid::regprocedure as function,
       has_function_privilege('anon', p.oid, 'execute') as anon,
       has_function_privilege('authenticated', p.oid, 'execute') as authenticated,
       has_function_privilege('service_role', p.oid, 'execute') as service_role
  from pg_proc p
  join pg_depend d on d.objid = p.oid and d.deptype = 'e'
  join pg_extension e on e.oid = d.refobjid and e.extname = 'keyhippo'
 where p.prorettype <> 'trigger'::regtype
 order by p.oid::regprocedure::text;

-- Every keyhippo table has RLS on.
select c.oid::regclass as tbl, c.relrowsecurity as rls
  from pg_class c join pg_namespace n on n.oid = c.relnamespace
 where n.nspname like 'keyhippo%' and c.relkind = 'r' order by c.oid::regclass::text;

-- A hostile search_path cannot redirect the definer functions: a look-alike table earlier in
-- the path changes nothing.
create schema evil;
create table evil.api_key_metadata (like keyhippo.api_key_metadata);
set local search_path = evil, public;
select count(*) as verifies_with_hostile_search_path from keyhippo.verify_api_key(:'key_a');

-- verify_api_key is not SECURITY DEFINER (its common path runs no SQL); the statements of its
-- rare paths (permissions, the fallback last_used_at update) take the owner's rights with
-- search_path pinned, so a look-alike "=" earlier in the path, which would match every row,
-- changes nothing: the right permissions. (The fallback update runs when the verifying
-- transaction commits, which this one never does: security_rules checks it marks only the
-- verified key as used.)
select prosecdef, proconfig from pg_proc where oid = 'keyhippo.verify_api_key(text)'::regprocedure;
reset search_path;
set local role authenticated;
select api_key as key_b from keyhippo.create_api_key('second key') \gset
select api_key_id as id_c from keyhippo.create_api_key('third key') \gset
reset role;
create function evil.always(uuid, uuid) returns boolean language sql immutable as 'select true';
create operator evil.= (leftarg = uuid, rightarg = uuid, function = evil.always);
grant usage on schema evil to authenticated;
set local search_path = evil, pg_catalog, public;
set local role authenticated;
select count(*) as verified, array_to_string(permissions, ',') as permissions
  from keyhippo.verify_api_key(:'key_b') group by 2;
reset role;
reset search_path;
select description, last_used_at is not null as used
  from keyhippo.api_key_metadata order by description;
rollback;
