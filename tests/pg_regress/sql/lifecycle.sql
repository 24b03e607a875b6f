-- The key lifecycle, role by role, the way PostgREST runs a request: claims in
-- request.jwt.claims, then SET LOCAL ROLE. User A and user B are authenticated users.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\set B '{"sub":"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb","role":"authenticated"}'
begin;
insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'b@example.com');

-- User A creates a key. The plaintext comes back once; it is kh_ + 66 URL-safe characters.
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as key_a, api_key_id as id_a from keyhippo.create_api_key('Production API') \gset
select :'key_a' ~ '^kh_[0-9A-Za-z]{16}_[0-9A-Za-z]{49}$' as key_has_documented_shape;
select length(:'key_a') as key_length;

-- It verifies, for the right owner, with no scope.
select user_id = 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa' as owner_is_a, scope_id is null as unscoped
  from keyhippo.verify_api_key(:'key_a');

-- A sees it, with the public prefix and no secret. (Its use is recorded when the verifying
-- transaction commits, which this one never does.)
select description, prefix = left(:'key_a', 19) as prefix_is_public_part, is_revoked,
       revoked_at is null as not_revoked, claims, last_used_at is not null as use_recorded,
       expires_at > now() + interval '99 years' as expires_in_100_years
  from keyhippo.api_key_metadata;

-- A second key for A, and one for B.
select api_key as key_a2, api_key_id as id_a2 from keyhippo.create_api_key('Second key') \gset
reset role;
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select api_key as key_b, api_key_id as id_b from keyhippo.create_api_key('B key') \gset

-- B sees only B's key.
select description from keyhippo.api_key_metadata order by description;

-- B cannot revoke, rotate or change A's key: the same "not found" as for a key that does not
-- exist, so B learns nothing about A's keys.
savepoint s;
select keyhippo.revoke_api_key(:'id_a');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.revoke_api_key('00000000-0000-4000-8000-000000000000');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select * from keyhippo.rotate_api_key(:'id_a');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.update_key_claims(:'id_a', '{"tier":"gold"}');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- Direct writes to A's row match no rows under RLS.
update keyhippo.api_key_metadata set is_revoked = true where id = :'id_a';
delete from keyhippo.api_key_metadata where id = :'id_a';

-- But anyone may verify any key: B's session verifying A's key learns A's id (that is what a
-- key is for).
select user_id = 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa' as a_key_still_valid
  from keyhippo.verify_api_key(:'key_a');

-- Anonymous requests may verify keys, and nothing else.
reset role;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as as_anon;
set local role anon;
select count(*) as anon_verifies_a from keyhippo.verify_api_key(:'key_a');
savepoint s;
select * from keyhippo.create_api_key('anon key');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select * from keyhippo.api_key_metadata;
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.revoke_api_key(:'id_a');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;

-- A updates claims, then revokes: true the first time, false the second.
reset role;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select keyhippo.update_key_claims(:'id_a', '{"tier":"gold","team":"ops"}');
select claims from keyhippo.api_key_metadata where id = :'id_a';
savepoint s;
select keyhippo.update_key_claims(:'id_a', '["not","an","object"]');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.update_key_claims(:'id_a', null);
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.revoke_api_key(:'id_a') as first_revoke;
select keyhippo.revoke_api_key(:'id_a') as second_revoke;
select count(*) as revoked_key_verifies from keyhippo.verify_api_key(:'key_a');
select is_revoked, revoked_at is not null as revoked_at_set
  from keyhippo.api_key_metadata where id = :'id_a';
-- A revoked key stays revoked.
savepoint s;
update keyhippo.api_key_metadata set is_revoked = false where id = :'id_a';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- A revoked key cannot be rotated.
select * from keyhippo.rotate_api_key(:'id_a');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;

-- Rotation: a new key with the same description and claims; the old one stops working.
select keyhippo.update_key_claims(:'id_a2', '{"env":"prod"}');
select new_api_key as key_a3, new_api_key_id as id_a3 from keyhippo.rotate_api_key(:'id_a2') \gset
select :'key_a3' <> :'key_a2' as new_key_differs, :'id_a3' <> :'id_a2' as new_id_differs;
select count(*) as old_key_verifies from keyhippo.verify_api_key(:'key_a2');
select count(*) as new_key_verifies from keyhippo.verify_api_key(:'key_a3');
select id = :'id_a3' as is_new, description, claims, is_revoked
  from keyhippo.api_key_metadata where id in (:'id_a2', :'id_a3') order by is_revoked;

-- Revoking by a direct UPDATE of revoked_at works the same way.
select api_key as key_a4, api_key_id as id_a4 from keyhippo.create_api_key('Direct revoke') \gset
update keyhippo.api_key_metadata set revoked_at = now() where id = :'id_a4';
select is_revoked from keyhippo.api_key_metadata where id = :'id_a4';
select count(*) as directly_revoked_verifies from keyhippo.verify_api_key(:'key_a4');
-- Owners may rename a key, but not move it, re-date it or change its prefix.
update keyhippo.api_key_metadata set description = 'Renamed' where id = :'id_a3';
savepoint s;
update keyhippo.api_key_metadata set expires_at = now() + interval '1000 years' where id = :'id_a3';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
update keyhippo.api_key_metadata set user_id = 'bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb' where id = :'id_a3';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;

-- service_role sees every key and may revoke anyone's.
reset role;
select set_config('request.jwt.claims', '{"role":"service_role"}', true) is not null as as_service_role;
set local role service_role;
select count(*) as all_keys from keyhippo.api_key_metadata;
select keyhippo.revoke_api_key(:'id_b') as service_role_revokes_b;
select count(*) as b_key_verifies from keyhippo.verify_api_key(:'key_b');
-- Without a user, service_role cannot create a key (whose would it be?).
savepoint s;
select * from keyhippo.create_api_key('no owner');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
rollback;
