-- The security rules, each tried the way an attacker would: a scope never widens its owner's
-- rights, a scoped key never carries admin status, admin-type RBAC objects are the admins',
-- descriptions and claims are bounded on every write path, revocation deletes the hash however it
-- is written, audit rows cannot be forged, caller errors are specific and bounded.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\set A_ADMIN_CLAIM '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated","user_role":"admin"}'
\set B '{"sub":"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb","role":"authenticated"}'
\set N '{"sub":"11111111-1111-4111-8111-111111111111","role":"authenticated"}'
\set G '{"sub":"22222222-2222-4222-8222-222222222222","role":"authenticated"}'
\set ADM '{"sub":"dddddddd-dddd-4ddd-8ddd-dddddddddddd","role":"authenticated"}'
\set secret 'a-test-secret-that-is-at-least-32-bytes-long'

\echo '--- 1. a key never holds a permission its owner lacks'
begin;
insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('11111111-1111-4111-8111-111111111111', 'n@example.com');
-- N holds no RBAC role at all; A holds the default User role (manage_api_keys).
delete from keyhippo_rbac.user_group_roles where user_id = '11111111-1111-4111-8111-111111111111';
-- An admin set up scope "ops" with every permission.
insert into keyhippo.scopes (name, description) values ('ops', 'operations');
insert into keyhippo.scope_permissions (scope_id, permission_id)
select s.id, p.id from keyhippo.scopes s, keyhippo_rbac.permissions p where s.name = 'ops';
select set_config('request.jwt.claims', :'N', true) is not null as as_user_n;
set local role authenticated;
select api_key as n_key from keyhippo.create_api_key('n ops key', 'ops') \gset
select permissions as n_key_permissions from keyhippo.verify_api_key(:'n_key');
select set_config('request.headers', json_build_object('x-api-key', :'n_key')::text, true) is not null as with_n_key;
select keyhippo.authorize('manage_roles') as n_key_manages_roles,
       keyhippo_internal.caller_is_admin() as n_key_is_admin;
select permissions as n_context_permissions from keyhippo.current_user_context();
savepoint s;
select keyhippo_rbac.create_role('escalate', 'all of it',
       (select g.id from keyhippo_rbac.groups g where g.name = 'User Group'), 'user');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- A's key for the same scope carries what A holds of it: manage_api_keys.
select set_config('request.headers', '', true) = '' as no_headers,
       set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
select api_key as a_ops_key from keyhippo.create_api_key('a ops key', 'ops') \gset
select api_key as a_key from keyhippo.create_api_key('a plain key') \gset
select permissions as a_ops_key_permissions from keyhippo.verify_api_key(:'a_ops_key');
-- A JWT's user_role claim counts only when the identity is that JWT's own sub: with N's key
-- beside an admin claim, the request is N's key, not an admin.
select set_config('request.jwt.claims', :'A_ADMIN_CLAIM', true) is not null as admin_claim,
       set_config('request.headers', json_build_object('x-api-key', :'n_key')::text, true) is not null as with_n_key;
select keyhippo.authorize('manage_roles') as key_beside_admin_claim_manages_roles,
       keyhippo_internal.caller_is_admin() as key_beside_admin_claim_is_admin;
select set_config('request.headers', '', true) = '' as no_headers;
select keyhippo.authorize('manage_roles') as admin_claim_alone_manages_roles,
       keyhippo_internal.caller_is_admin() as admin_claim_alone_is_admin;
-- Removing a role from the owner takes effect on their keys at the next statement.
select set_config('request.jwt.claims', '', true) = '' as no_claims,
       set_config('request.headers', json_build_object('x-api-key', :'a_key')::text, true) is not null as with_a_key;
select keyhippo.authorize('manage_api_keys') as a_key_before;
reset role;
delete from keyhippo_rbac.user_group_roles where user_id = 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa';
set local role authenticated;
select keyhippo.authorize('manage_api_keys') as a_key_after,
       (select permissions from keyhippo.current_user_context()) as a_context_after,
       (select permissions from keyhippo.verify_api_key(:'a_key')) as a_verify_after,
       (select permissions from keyhippo.verify_api_key(:'a_ops_key')) as a_ops_verify_after;
rollback;

\echo '--- 2. a scoped key of an admin acts with its scope only'
begin;
insert into auth.users (id, email) values
    ('dddddddd-dddd-4ddd-8ddd-dddddddddddd', 'admin@example.com'),
    ('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'b@example.com');
insert into keyhippo_rbac.user_group_roles (user_id, group_id, role_id)
select 'dddddddd-dddd-4ddd-8ddd-dddddddddddd', r.group_id, r.id from keyhippo_rbac.roles r where r.name = 'Admin';
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select api_key_id as b_id from keyhippo.create_api_key('b key') \gset
select set_config('request.jwt.claims', :'ADM', true) is not null as as_admin;
select api_key as adm_scoped from keyhippo.create_api_key('admin default', 'default') \gset
select api_key as adm_key from keyhippo.create_api_key('admin plain') \gset
select set_config('request.jwt.claims', '', true) = '' as no_claims,
       set_config('request.headers', json_build_object('x-api-key', :'adm_scoped')::text, true) is not null as with_scoped_key;
select keyhippo_internal.caller_is_admin() as scoped_key_is_admin,
       (select count(*) from keyhippo.api_key_metadata) as scoped_key_sees_keys;
savepoint s;
select keyhippo.revoke_api_key(:'b_id');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo_rbac.create_role('more admins', 'x',
       (select g.id from keyhippo_rbac.groups g where g.name = 'Admin Group'), 'admin');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select set_config('request.headers', json_build_object('x-api-key', :'adm_key')::text, true) is not null as with_unscoped_key;
select keyhippo_internal.caller_is_admin() as unscoped_key_is_admin,
       (select count(*) from keyhippo.api_key_metadata) as unscoped_key_sees_keys;
rollback;

\echo '--- 3. admin-type groups, roles and assignments are the admins'''
begin;
insert into auth.users (id, email) values
    ('dddddddd-dddd-4ddd-8ddd-dddddddddddd', 'admin@example.com'),
    ('22222222-2222-4222-8222-222222222222', 'g@example.com');
insert into keyhippo_rbac.user_group_roles (user_id, group_id, role_id)
select 'dddddddd-dddd-4ddd-8ddd-dddddddddddd', r.group_id, r.id from keyhippo_rbac.roles r where r.name = 'Admin';
-- G holds manage_groups through a role of type user.
insert into keyhippo_rbac.roles (name, description, group_id, role_type)
select 'Group keeper', 'manages groups', g.id, 'user' from keyhippo_rbac.groups g where g.name = 'User Group';
insert into keyhippo_rbac.role_permissions (role_id, permission_id)
select r.id, p.id from keyhippo_rbac.roles r, keyhippo_rbac.permissions p
 where r.name = 'Group keeper' and p.name = 'manage_groups';
insert into keyhippo_rbac.user_group_roles (user_id, group_id, role_id)
select '22222222-2222-4222-8222-222222222222', r.group_id, r.id from keyhippo_rbac.roles r where r.name = 'Group keeper';
select set_config('request.jwt.claims', :'G', true) is not null as as_group_keeper;
set local role authenticated;
savepoint s;
delete from keyhippo_rbac.groups where name = 'Admin Group';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
update keyhippo_rbac.groups set description = 'mine now' where name = 'Admin Group';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- Groups without an admin role stay theirs to manage.
insert into keyhippo_rbac.groups (name, description) values ('Team', 'a team');
delete from keyhippo_rbac.groups where name = 'Team';
-- An admin cannot remove the last admin assignment, neither directly nor by a cascade.
select set_config('request.jwt.claims', :'ADM', true) is not null as as_admin;
delete from keyhippo_rbac.user_group_roles where user_id = 'dddddddd-dddd-4ddd-8ddd-dddddddddddd';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
delete from keyhippo_rbac.groups where name = 'Admin Group';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- service_role may.
reset role;
set local role service_role;
delete from keyhippo_rbac.user_group_roles ugr using keyhippo_rbac.roles r
 where r.id = ugr.role_id and r.role_type = 'admin';
rollback to savepoint s;
-- Deleting a user from auth.users takes their assignments along, the last admin's too, whoever
-- may delete users.
reset role;
create role keyhippo_test_auth_admin nologin;
grant usage on schema auth to keyhippo_test_auth_admin;
grant select, delete on auth.users to keyhippo_test_auth_admin;
set local role keyhippo_test_auth_admin;
delete from auth.users where id = 'dddddddd-dddd-4ddd-8ddd-dddddddddddd';
reset role;
select count(*) as admin_assignments_left from keyhippo_rbac.user_group_roles
 where user_id = 'dddddddd-dddd-4ddd-8ddd-dddddddddddd';
rollback;

\echo '--- 4. descriptions are checked on every write path; the expiry job survives one bad key'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key_id as k1 from keyhippo.create_api_key('first') \gset
select api_key_id as k2 from keyhippo.create_api_key('second') \gset
savepoint s;
update keyhippo.api_key_metadata set description = repeat('x', 9000) where id = :'k1';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
update keyhippo.api_key_metadata set description = 'semi;colon' where id = :'k1';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
reset role;
-- Claims too, for service_role's direct writes: a JSON object, no value deeper than 31 levels.
set local role service_role;
update keyhippo.api_key_metadata set claims = '[1]' where id = :'k1';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
set local role service_role;
update keyhippo.api_key_metadata
   set claims = (repeat('{"a":', 32) || '1' || repeat('}', 32))::jsonb where id = :'k1';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
set local role service_role;
update keyhippo.api_key_metadata
   set claims = (repeat('{"a":[', 15) || '{}' || repeat(']}', 15))::jsonb where id = :'k1';
select count(*) as deep_but_allowed from keyhippo.api_key_metadata where claims ? 'a';
reset role;
-- Both keys drift into the window unreported; reporting the first one fails.
update keyhippo_internal.config set value = 'false' where key = 'enable_key_expiry_notifications';
update keyhippo.api_key_metadata set expires_at = now() + interval '1 hour' where id in (:'k1', :'k2');
update keyhippo_internal.config set value = 'true' where key = 'enable_key_expiry_notifications';
create function public.keyhippo_test_refuse_one() returns trigger language plpgsql as $$
begin
    if NEW.data -> 'expiring_key' ->> 'id' = current_setting('keyhippo_test.refuse') then
        raise exception 'refused for the test';
    end if;
    return NEW;
end $$;
create trigger keyhippo_test_refuse_one before insert on keyhippo.audit_log
    for each row execute function public.keyhippo_test_refuse_one();
select set_config('keyhippo_test.refuse', :'k1', true) is not null as refusing_first;
set local client_min_messages = error;
select keyhippo.update_expiring_keys() as reported;
reset client_min_messages;
select data -> 'expiring_key' ->> 'id' = :'k2' as second_reported
  from keyhippo.audit_log where action = 'expiring_key';
rollback;

\echo '--- 6. revocation deletes the hash however it is written'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as key1, api_key_id as id1 from keyhippo.create_api_key('one') \gset
select api_key as key2, api_key_id as id2 from keyhippo.create_api_key('two') \gset
select api_key as key3, api_key_id as id3 from keyhippo.create_api_key('three') \gset
update keyhippo.api_key_metadata set revoked_at = now() where id = :'id1';
reset role;
set local session_replication_role = replica;
update keyhippo.api_key_metadata set is_revoked = true where id = :'id2';
update keyhippo.api_key_metadata set revoked_at = now() where id = :'id3';
reset session_replication_role;
select m.description, m.is_revoked, m.revoked_at is not null as revoked_at_set,
       exists (select 1 from keyhippo.api_key_secrets s where s.key_metadata_id = m.id) as hash_kept
  from keyhippo.api_key_metadata m order by m.description;
select (select count(*) from keyhippo.verify_api_key(:'key1')) as one_verifies,
       (select count(*) from keyhippo.verify_api_key(:'key2')) as two_verifies,
       (select count(*) from keyhippo.verify_api_key(:'key3')) as three_verifies;
rollback;

\echo '--- 7. a use is recorded for the verified key only, also when written under a hostile search_path'
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
begin;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as used_key from keyhippo.create_api_key('used') \gset
select api_key as unused_key from keyhippo.create_api_key('unused') \gset
commit;
-- A look-alike "=" earlier in the search_path, which would match every row, changes nothing.
create schema evil;
create function evil.always(uuid, uuid) returns boolean language sql immutable as 'select true';
create operator evil.= (leftarg = uuid, rightarg = uuid, function = evil.always);
grant usage on schema evil to authenticated;
begin;
set local search_path = evil, pg_catalog, public;
set local role authenticated;
select count(*) as verified from keyhippo.verify_api_key(:'used_key');
reset role;
-- The server preloads keyhippo: the use waits in shared memory (or was written by a worker
-- already); written now, from here.
select keyhippo.flush_key_usage() is not null as flushed;
commit;
select description, last_used_at is not null as used from keyhippo.api_key_metadata order by description;
drop schema evil cascade;
delete from auth.users where id = 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa';
delete from keyhippo.api_key_metadata;
delete from keyhippo.audit_log;

\echo '--- 9. an audit row names a keyhippo function only when that function made the change'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key_id as id from keyhippo.create_api_key('to rename') \gset
savepoint s;
set local keyhippo_audit.function_name = 'revoke_api_key';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
update keyhippo.api_key_metadata set description = 'renamed' where id = :'id';
select keyhippo.revoke_api_key(:'id');
reset role;
select action, data -> 'new_data' ->> 'description' as description, function_name
  from keyhippo.audit_log where table_name = 'api_key_metadata'
 order by action, function_name nulls first; -- (one transaction: one timestamp)
rollback;

\echo '--- 10, 11. caller errors: specific SQLSTATEs, plain messages, bounded JWT lifetimes'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a,
       set_config('keyhippo.jwt_secret', :'secret', true) is not null as secret_set;
set local role authenticated;
select api_key_id as id from keyhippo.create_api_key('claims') \gset
select repeat('{"a":', 127) || '1' || repeat('}', 127) as deep127 \gset
select repeat('{"a":', 200) || '1' || repeat('}', 200) as deep200 \gset
savepoint s;
select keyhippo.update_key_claims(:'id', :'deep127');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.update_key_claims(:'id', :'deep200');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- Numbers beyond a double are JSON like any other.
select keyhippo.update_key_claims(:'id', '{"a":1e400, "b":[1,2,{"c":0.1}]}');
select claims -> 'b' as b, claims ->> 'a' = (1e400)::numeric::text as a_kept
  from keyhippo.api_key_metadata where id = :'id';
-- 32 levels (the object and 31 below it) are accepted.
select keyhippo.update_key_claims(:'id', (repeat('{"a":', 31) || '1' || repeat('}', 31))::jsonb);
select current_setting('keyhippo.jwt_max_lifetime') as jwt_max_lifetime;
savepoint s;
select api_key_id from keyhippo.create_jwt_api_key('long', interval '5000 years');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select api_key_id from keyhippo.create_jwt_api_key('huge', interval '100000000 years');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select api_key_id from keyhippo.create_jwt_api_key('never', interval '-1 day');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
set local keyhippo.jwt_max_lifetime = '100 years';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select count(*) as within_a_year from keyhippo.create_jwt_api_key('year', interval '365 days');
rollback;

\echo '--- 12. another user''s key and a missing one go through the same statements'
begin;
insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'b@example.com');
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select api_key_id as b_id from keyhippo.create_api_key('b key') \gset
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
-- Index and table scans of keyhippo's tables in this transaction so far.
\set scans 'select sum(coalesce(idx_scan, 0) + coalesce(seq_scan, 0)) from pg_stat_xact_user_tables where schemaname like ''keyhippo%'' or schemaname = ''auth'''
select (:scans) as s0 \gset
savepoint s;
select keyhippo.revoke_api_key(:'b_id');
rollback to savepoint s;
select (:scans) as s1 \gset
select keyhippo.revoke_api_key('00000000-0000-4000-8000-000000000000');
rollback to savepoint s;
select (:scans) as s2 \gset
select keyhippo.update_key_claims(:'b_id', '{}');
rollback to savepoint s;
select (:scans) as s3 \gset
select keyhippo.update_key_claims('00000000-0000-4000-8000-000000000000', '{}');
rollback to savepoint s;
select (:scans) as s4 \gset
select * from keyhippo.rotate_api_key(:'b_id');
rollback to savepoint s;
select (:scans) as s5 \gset
select * from keyhippo.rotate_api_key('00000000-0000-4000-8000-000000000000');
rollback to savepoint s;
select (:scans) as s6 \gset
select :s1 - :s0 = :s2 - :s1 as revoke_same_scans,
       :s3 - :s2 = :s4 - :s3 as update_claims_same_scans,
       :s5 - :s4 = :s6 - :s5 as rotate_same_scans;
rollback;

\echo '--- 12. names in errors are cut; a JWT key inserted revoked is revoked; flush in READ ONLY'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a,
       set_config('keyhippo.jwt_secret', :'secret', true) is not null as secret_set;
set local role authenticated;
savepoint s;
select * from keyhippo.create_api_key('x', repeat('s', 100000));
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
insert into keyhippo.jwt_api_keys (description, revoked_at) values ('born revoked', now())
returning revoked_at is not null as revoked, token is null as no_token;
select is_revoked from keyhippo.api_key_metadata where description = 'born revoked';
reset role;
select count(*) as hashes_of_born_revoked from keyhippo.api_key_secrets s
  join keyhippo.api_key_metadata m on m.id = s.key_metadata_id where m.description = 'born revoked';
rollback;
begin read only;
set local role service_role;
select keyhippo.flush_key_usage();
\echo :LAST_ERROR_SQLSTATE
rollback;
