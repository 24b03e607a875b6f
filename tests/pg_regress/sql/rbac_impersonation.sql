-- RBAC management (admins yes, ordinary users no; assigned permissions take effect) and
-- impersonation by the database owner.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\set C '{"sub":"cccccccc-cccc-4ccc-8ccc-cccccccccccc","role":"authenticated"}'
begin;
insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('cccccccc-cccc-4ccc-8ccc-cccccccccccc', 'c@example.com');
-- New users got the User role from the trigger on auth.users.
select u.email, r.name as role from keyhippo_rbac.user_group_roles ugr
  join auth.users u on u.id = ugr.user_id join keyhippo_rbac.roles r on r.id = ugr.role_id
 order by 1;
-- C becomes an administrator (as the database owner).
insert into keyhippo_rbac.user_group_roles (user_id, group_id, role_id)
select 'cccccccc-cccc-4ccc-8ccc-cccccccccccc', r.group_id, r.id from keyhippo_rbac.roles r where r.name = 'Admin';

\echo '--- an ordinary user may not manage RBAC'
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
savepoint s;
select keyhippo_rbac.create_group('Sneaky', 'no');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo_rbac.create_role('Sneaky', 'no', (select id from keyhippo_rbac.groups where name = 'User Group'), 'user');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo_rbac.assign_role_to_user('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa',
    (select id from keyhippo_rbac.groups where name = 'Admin Group'), (select id from keyhippo_rbac.roles where name = 'Admin'));
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo_rbac.assign_permission_to_role((select id from keyhippo_rbac.roles where name = 'User'), 'manage_groups');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- Nor by writing the tables directly.
insert into keyhippo_rbac.groups (name) values ('Direct');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
insert into keyhippo_rbac.user_group_roles (user_id, group_id, role_id)
select 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', r.group_id, r.id from keyhippo_rbac.roles r where r.name = 'Admin';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.authorize('manage_scopes') as a_may_manage_scopes;
-- A sees only A's own role assignments.
select count(*) as visible_assignments from keyhippo_rbac.user_group_roles;

\echo '--- an admin creates a group and a role with a permission, and assigns it to A'
reset role;
select set_config('request.jwt.claims', :'C', true) is not null as as_admin_c;
set local role authenticated;
select keyhippo_rbac.create_group('Scope Managers', 'may manage scopes') as group_id \gset
select keyhippo_rbac.create_role('Scoper', 'manages scopes', :'group_id', 'user') as role_id \gset
select keyhippo_rbac.assign_permission_to_role(:'role_id', 'manage_scopes');
select keyhippo_rbac.assign_permission_to_role(:'role_id', 'manage_scopes');  -- idempotent
select keyhippo_rbac.assign_role_to_user('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', :'group_id', :'role_id');
select count(*) as visible_assignments from keyhippo_rbac.user_group_roles;
savepoint s;
select keyhippo_rbac.create_group('Scope Managers', 'again');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo_rbac.create_role('Orphan', null, '00000000-0000-4000-8000-000000000000', 'user');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo_rbac.assign_role_to_user('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa',
    (select id from keyhippo_rbac.groups where name = 'User Group'), :'role_id');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo_rbac.assign_role_to_user('dddddddd-dddd-4ddd-8ddd-dddddddddddd', :'group_id', :'role_id');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo_rbac.create_group('', 'nameless');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;

\echo '--- the assigned permission takes effect for A, in authorize, keys and RLS'
reset role;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select keyhippo.authorize('manage_scopes') as a_may_manage_scopes, keyhippo.authorize('manage_groups') as a_may_manage_groups;
select permissions from keyhippo.current_user_context();
insert into keyhippo.scopes (name, description) values ('by-a', 'created by a scope manager');
select name from keyhippo.scopes order by name;

\echo '--- manage_roles without admin: user-type roles yes, admin-type roles no'
reset role;
select keyhippo_rbac.assign_permission_to_role(:'role_id', 'manage_roles');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select keyhippo_rbac.create_role('Helper', null, :'group_id', 'user') is not null as created_user_role;
savepoint s;
select keyhippo_rbac.create_role('Boss', null, :'group_id', 'admin');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo_rbac.assign_role_to_user('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa',
    (select id from keyhippo_rbac.groups where name = 'Admin Group'), (select id from keyhippo_rbac.roles where name = 'Admin'));
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;

\echo '--- service_role may manage everything'
reset role;
select set_config('request.jwt.claims', '{"role":"service_role"}', true) is not null as as_service_role;
set local role service_role;
select keyhippo_rbac.create_group('Service Made', null) is not null as created;
reset role;

\echo '--- impersonation: the database owner acts as A for up to an hour'
select set_config('request.jwt.claims', '', true) = '' as no_claims;
call keyhippo_impersonation.login_as_user('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa');
select current_user, session_user;
select user_id, permissions from keyhippo.current_user_context();
select count(*) as created from keyhippo.create_api_key('made while impersonating');
select description from keyhippo.api_key_metadata;
call keyhippo_impersonation.logout();
select current_user;
select count(*) as context_rows from keyhippo.current_user_context();
select action, data ->> 'impersonated_user_id' as impersonated, data ->> 'original_role' as original_role,
       user_id, function_name
  from keyhippo.audit_log where table_name = 'impersonation_state' order by "timestamp", action desc;
savepoint s;
call keyhippo_impersonation.logout();
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;

\echo '--- an impersonation older than one hour is over'
call keyhippo_impersonation.login_as_user('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa');
reset role;
update keyhippo_impersonation.impersonation_state set impersonation_time = now() - interval '61 minutes';
set role authenticated;
select count(*) as context_rows from keyhippo.current_user_context();
savepoint s;
select * from keyhippo.create_api_key('too late');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
call keyhippo_impersonation.logout();
select current_user;

\echo '--- login_as_anon'
call keyhippo_impersonation.login_as_anon();
select current_user;
select count(*) as context_rows from keyhippo.current_user_context();
call keyhippo_impersonation.logout();

\echo '--- nobody else may impersonate'
savepoint s;
set local role authenticated;
call keyhippo_impersonation.login_as_user('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
create role keyhippo_test_mallory nologin;
grant usage on schema keyhippo_impersonation to keyhippo_test_mallory;
grant execute on procedure keyhippo_impersonation.login_as_user(uuid) to keyhippo_test_mallory;
grant execute on function keyhippo_impersonation.begin_impersonation(uuid) to keyhippo_test_mallory;
savepoint s;
set session authorization keyhippo_test_mallory;
call keyhippo_impersonation.login_as_user('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
reset session authorization;
savepoint s;
call keyhippo_impersonation.login_as_user('eeeeeeee-eeee-4eee-8eee-eeeeeeeeeeee');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
rollback;
