-- Bad input never crashes a backend, never raises from verify, and every error a caller can
-- cause has its own SQLSTATE.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key as key_a, api_key_id as id_a from keyhippo.create_api_key('target') \gset

-- verify_api_key: zero rows, never an error, for anything that is not a valid key.
create temp table junk (label text, input text) on commit drop;
insert into junk values
    ('null', null),
    ('empty', ''),
    ('spaces', '   '),
    ('100 kB', repeat('x', 100000)),
    ('100 kB of kh_', repeat('kh_', 34000)),
    ('quotes', $$kh_'; drop table keyhippo.api_key_metadata; --$$),
    ('backslashes', repeat(E'\\', 69)),
    ('non-ASCII', 'kh_ключключключключ_' || repeat('é', 24)),
    ('emoji', repeat('🔑', 69)),
    ('control characters', (select string_agg(chr(1 + (i * 37) % 255), '') from generate_series(1, 69) i)),
    ('binary junk of key length', (select string_agg(chr(128 + (i * 7919) % 20000), '') from generate_series(1, 69) i)),
    ('key with a trailing space', :'key_a' || ' '),
    ('key with a leading space', ' ' || :'key_a'),
    ('key in upper case', upper(:'key_a')),
    ('key without its checksum', left(:'key_a', 63)),
    ('prefix alone', left(:'key_a', 19)),
    ('real prefix, zero secret', left(:'key_a', 20) || repeat('0', 49)),
    ('wrong tag', 'gh_' || substr(:'key_a', 4)),
    ('JWT-looking', 'eyJhbGciOiJub25lIn0.eyJzdWIiOiJ4In0.'),
    ('SQL', 'select * from keyhippo.api_key_secrets');
select j.label, count(v.user_id) as rows_returned
  from junk j left join lateral keyhippo.verify_api_key(j.input) v on true
 group by j.label order by j.label;
-- The genuine key still verifies after all that.
select count(*) as genuine_key_verifies from keyhippo.verify_api_key(:'key_a');

-- create_api_key: descriptions are at most 255 characters of [a-zA-Z0-9_ -].
select count(*) as max_length_ok from keyhippo.create_api_key(repeat('d', 255));
select count(*) as empty_ok from keyhippo.create_api_key('');
savepoint s;
select * from keyhippo.create_api_key(repeat('d', 256));
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select * from keyhippo.create_api_key('semi;colon');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select * from keyhippo.create_api_key($$it's$$);
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select * from keyhippo.create_api_key('clé');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select * from keyhippo.create_api_key(E'new\nline');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select * from keyhippo.create_api_key(null);
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select * from keyhippo.create_api_key(repeat('x', 100000));
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- Unknown scope.
select * from keyhippo.create_api_key('scoped', 'no such scope');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;

-- NULL and unknown ids.
select keyhippo.revoke_api_key(null);
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select * from keyhippo.rotate_api_key(null);
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.update_key_claims(null, '{}');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.update_key_claims(:'id_a', jsonb_build_object('big', repeat('x', 70000)));
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select keyhippo.update_key_claims(:'id_a', '"a string"');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;

-- Unauthenticated callers: no claims, empty claims (a pooled connection after a request),
-- malformed claims, a subject that is not a UUID, a subject that is not a user. Each gets a
-- savepoint of its own, taken after switching identity.
release savepoint s;
reset role;
select set_config('request.jwt.claims', '', true) is not null as empty_claims;
set local role authenticated;
savepoint u1;
select * from keyhippo.create_api_key('k');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint u1;
select keyhippo.revoke_api_key(:'id_a');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint u1;
select count(*) as sees_no_keys from keyhippo.api_key_metadata;
reset role;
select set_config('request.jwt.claims', 'not json at all', true) is not null as malformed_claims;
set local role authenticated;
savepoint u2;
select * from keyhippo.create_api_key('k');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint u2;
select keyhippo.update_key_claims(:'id_a', '{}');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint u2;
reset role;
select set_config('request.jwt.claims', '{"sub":"1 OR 1=1"}', true) is not null as sub_not_uuid;
set local role authenticated;
savepoint u3;
select * from keyhippo.create_api_key('k');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint u3;
select count(*) as sees_no_keys from keyhippo.api_key_metadata;
reset role;
select set_config('request.jwt.claims', '{"sub":"cccccccc-cccc-4ccc-8ccc-cccccccccccc"}', true) is not null as unknown_user;
set local role authenticated;
savepoint u4;
select * from keyhippo.create_api_key('k');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint u4;
select * from keyhippo.rotate_api_key(:'id_a');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint u4;

-- Verify is still fine after all those errors, and the backend is alive.
select count(*) as still_verifies from keyhippo.verify_api_key(:'key_a');
rollback;
