-- verify_api_key's declared result, and its lookup (src/pg/lookup.rs) at the edges: a stored hash
-- it cannot use, relations renamed or replaced under a session that already resolved them, and
-- permissions changing between two verifies of the same key in one session.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'

\echo '--- the result: a row type with the columns of KeyHippo 1.2.5 RETURNS TABLE, at most one row'
select pg_get_function_result('keyhippo.verify_api_key(text)'::regprocedure) as result,
       (select prorows from pg_proc where oid = 'keyhippo.verify_api_key(text)'::regprocedure) as rows;
select a.attname, format_type(a.atttypid, a.atttypmod) as type
  from pg_attribute a
 where a.attrelid = 'keyhippo.verify_api_key_result'::regclass and a.attnum > 0
 order by a.attnum;

begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as k, api_key_id as id from keyhippo.create_api_key('lookup') \gset
select api_key as ks, api_key_id as ids from keyhippo.create_api_key('scoped lookup', 'default') \gset
\echo '--- every way of reading the result, as with RETURNS TABLE'
select user_id, scope_id, permissions from keyhippo.verify_api_key(:'k');
select (keyhippo.verify_api_key(:'k')).user_id as column_of_call;
select (v).permissions from keyhippo.verify_api_key(:'k') v;
select count(*) as rows_for_junk from keyhippo.verify_api_key('kh_nope');
reset role;

\echo '--- a stored hash verify cannot use (too long, or the wrong one) verifies nothing and raises nothing'
update keyhippo.api_key_secrets set key_hash = 'sha256$' || repeat('ab', 200) where key_metadata_id = :'id';
select count(*) as verifies_with_long_hash from keyhippo.verify_api_key(:'k');
update keyhippo.api_key_secrets set key_hash = 'sha256$' || repeat('0', 64) where key_metadata_id = :'id';
select count(*) as verifies_with_wrong_hash from keyhippo.verify_api_key(:'k');
\echo '--- a key row whose hash row is gone verifies nothing'
delete from keyhippo.api_key_secrets where key_metadata_id = :'ids';
select count(*) as verifies_without_hash from keyhippo.verify_api_key(:'ks');
rollback;

\echo '--- relations resolved earlier in the session are forgotten when they change: a renamed'
\echo '--- table makes verify raise a clean internal error (not read the old relation), and once'
\echo '--- the rename is rolled back verify works again'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as k from keyhippo.create_api_key('renamed') \gset
select count(*) as verifies_before from keyhippo.verify_api_key(:'k');
reset role;
savepoint renamed;
alter table keyhippo.api_key_secrets rename to api_key_secrets_moved;
select count(*) from keyhippo.verify_api_key(:'k');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint renamed;
select count(*) as verifies_after_rollback from keyhippo.verify_api_key(:'k');
\echo '--- without the hash index on key_metadata_id, verify reads the hash from the primary key'
\echo '--- (index-only where the page is all-visible), and without the INCLUDE from the heap row'
drop index keyhippo.api_key_secrets_key_metadata_id_hash_idx;
select count(*) as verifies_through_primary_key from keyhippo.verify_api_key(:'k');
alter table keyhippo.api_key_secrets drop constraint api_key_secrets_pkey cascade;
alter table keyhippo.api_key_secrets add constraint api_key_secrets_pkey primary key (key_metadata_id);
select count(*) as verifies_without_include from keyhippo.verify_api_key(:'k');
rollback;

\echo '--- verify finds the prefix through the hash index on prefix and the hash through the hash'
\echo '--- index on key_metadata_id (one scan of each per verify, none of the B-trees), and the'
\echo '--- prefix through the unique B-tree once its hash index is gone'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as k from keyhippo.create_api_key('hash index') \gset
reset role;
select pg_stat_get_xact_numscans('keyhippo.api_key_metadata_prefix_hash_idx'::regclass) as h0,
       pg_stat_get_xact_numscans('keyhippo.api_key_metadata_prefix_key'::regclass) as b0,
       pg_stat_get_xact_numscans('keyhippo.api_key_secrets_key_metadata_id_hash_idx'::regclass) as s0,
       pg_stat_get_xact_numscans('keyhippo.api_key_secrets_pkey'::regclass) as p0 \gset
select count(*) as verifies from keyhippo.verify_api_key(:'k');
select count(*) as verifies from keyhippo.verify_api_key(:'k');
select pg_stat_get_xact_numscans('keyhippo.api_key_metadata_prefix_hash_idx'::regclass) - :h0 as hash_index_scans,
       pg_stat_get_xact_numscans('keyhippo.api_key_metadata_prefix_key'::regclass) - :b0 as unique_btree_scans,
       pg_stat_get_xact_numscans('keyhippo.api_key_secrets_key_metadata_id_hash_idx'::regclass) - :s0 as secrets_hash_index_scans,
       pg_stat_get_xact_numscans('keyhippo.api_key_secrets_pkey'::regclass) - :p0 as secrets_pkey_scans;
drop index keyhippo.api_key_metadata_prefix_hash_idx;
select count(*) as verifies_without_hash_index from keyhippo.verify_api_key(:'k');
select pg_stat_get_xact_numscans('keyhippo.api_key_metadata_prefix_key'::regclass) - :b0 as unique_btree_scans;
rollback;

\echo '--- permissions: the next verify in the same session sees a change to the scope'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
-- A holds every permission (the Admin role): a key's scope narrows its owner's permissions.
insert into keyhippo_rbac.user_group_roles (user_id, group_id, role_id)
select 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', r.group_id, r.id from keyhippo_rbac.roles r where r.name = 'Admin';
insert into keyhippo.scopes (name, description) values ('lookup_scope', 'for verify_lookup');
insert into keyhippo.scope_permissions (scope_id, permission_id)
select s.id, p.id from keyhippo.scopes s, keyhippo_rbac.permissions p
 where s.name = 'lookup_scope' and p.name = 'manage_api_keys';
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as k from keyhippo.create_api_key('scoped', 'lookup_scope') \gset
select permissions as first from keyhippo.verify_api_key(:'k');
select permissions as again from keyhippo.verify_api_key(:'k');
reset role;
insert into keyhippo.scope_permissions (scope_id, permission_id)
select s.id, p.id from keyhippo.scopes s, keyhippo_rbac.permissions p
 where s.name = 'lookup_scope' and p.name = 'manage_scopes';
select permissions as after_grant from keyhippo.verify_api_key(:'k');
rollback;

\echo '--- the same answers through the prepared-statement lookup (keyhippo.verify_index_probes = off)'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as k, api_key_id as id from keyhippo.create_api_key('by statement') \gset
reset role;
set local keyhippo.verify_index_probes = off;
set local role authenticated;
select user_id, scope_id, permissions from keyhippo.verify_api_key(:'k');
-- The last character changed (to 'x', or to 'y' when it is 'x').
select count(*) as wrong_key from keyhippo.verify_api_key(
    left(:'k', length(:'k') - 1) || case right(:'k', 1) when 'x' then 'y' else 'x' end);
select keyhippo.revoke_api_key(:'id') as revoked;
select count(*) as after_revoke from keyhippo.verify_api_key(:'k');
reset role;
rollback;
