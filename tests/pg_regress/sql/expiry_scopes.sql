-- Expiry, scoped keys and the permissions verify reports.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');

-- The defaults of initialize_keyhippo(), present from install.
select name from keyhippo.scopes order by name;
select g.name as group_name, r.name as role_name, r.role_type,
       array_agg(p.name::text order by p.name::text) as permissions
  from keyhippo_rbac.roles r
  join keyhippo_rbac.groups g on g.id = r.group_id
  left join keyhippo_rbac.role_permissions rp on rp.role_id = r.id
  left join keyhippo_rbac.permissions p on p.id = rp.permission_id
 group by 1, 2, 3 order by 1;
-- Idempotent: running it again changes nothing.
select keyhippo.initialize_keyhippo();
select (select count(*) from keyhippo_rbac.groups) as groups, (select count(*) from keyhippo_rbac.roles) as roles,
       (select count(*) from keyhippo_rbac.permissions) as permissions,
       (select count(*) from keyhippo_rbac.role_permissions) as role_permissions,
       (select count(*) from keyhippo.scopes) as scopes;

-- A scope with two permissions, set up by service_role.
set local role service_role;
insert into keyhippo.scopes (name, description) values ('reports', 'Read reports');
insert into keyhippo.scope_permissions (scope_id, permission_id)
select s.id, p.id from keyhippo.scopes s, keyhippo_rbac.permissions p
 where s.name = 'reports' and p.name in ('manage_scopes', 'manage_api_keys');
reset role;

select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as scoped_key, api_key_id as scoped_id from keyhippo.create_api_key('Reports key', 'reports') \gset
select api_key as default_key from keyhippo.create_api_key('Default scoped', 'default') \gset
select api_key as plain_key, api_key_id as plain_id from keyhippo.create_api_key('Unscoped') \gset

-- A scoped key reports its scope and those of the scope's permissions its owner holds: A holds
-- manage_api_keys (the User role) but not manage_scopes. A scope narrows, never widens.
select s.name as scope, v.permissions
  from keyhippo.verify_api_key(:'scoped_key') v join keyhippo.scopes s on s.id = v.scope_id;
-- The default scope carries no permissions of its own.
select s.name as scope, v.permissions
  from keyhippo.verify_api_key(:'default_key') v join keyhippo.scopes s on s.id = v.scope_id;
-- An unscoped key reports its owner's RBAC permissions: A got the User role from the trigger on
-- auth.users.
select scope_id, permissions from keyhippo.verify_api_key(:'plain_key');
-- Without any role: an empty array, never NULL.
reset role;
delete from keyhippo_rbac.user_group_roles where user_id = 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa';
select scope_id, permissions from keyhippo.verify_api_key(:'plain_key');
-- initialize_existing_project() gives every user without a role the User role again.
select keyhippo.initialize_existing_project();
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
-- Now A holds the User role (manage_api_keys).
select scope_id, permissions from keyhippo.verify_api_key(:'plain_key');

-- Expiry: a key whose expires_at has passed stops verifying, without being revoked.
reset role;
set local role service_role;
update keyhippo.api_key_metadata set expires_at = now() - interval '1 second' where id = :'plain_id';
select count(*) as expired_key_verifies from keyhippo.verify_api_key(:'plain_key');
select is_revoked as expired_key_is_revoked from keyhippo.api_key_metadata where id = :'plain_id';
update keyhippo.api_key_metadata set expires_at = now() + interval '1 hour' where id = :'plain_id';
select count(*) as renewed_key_verifies from keyhippo.verify_api_key(:'plain_key');

-- Rotating keeps the scope and the remaining lifetime's length.
reset role;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select new_api_key as rotated_key from keyhippo.rotate_api_key(:'scoped_id') \gset
select s.name as rotated_scope, v.permissions
  from keyhippo.verify_api_key(:'rotated_key') v join keyhippo.scopes s on s.id = v.scope_id;
select new_api_key_id as rotated_plain_id from keyhippo.rotate_api_key(:'plain_id') \gset
select expires_at between now() + interval '59 minutes' and now() + interval '61 minutes' as keeps_lifetime
  from keyhippo.api_key_metadata where id = :'rotated_plain_id';
rollback;
