-- JWT-format API keys: minted in Rust, HS256 with PostgREST's secret, only jti and hash stored.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\set B '{"sub":"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb","role":"authenticated"}'
\set secret 'a-postgrest-jwt-secret-of-at-least-32-bytes'
begin;
create extension if not exists pgcrypto;
insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'b@example.com');
create function pg_temp.b64url_json(seg text) returns jsonb language sql as $$
    select convert_from(decode(rpad(translate(seg, '-_', '+/'), (ceil(length(seg) / 4.0) * 4)::int, '='), 'base64'), 'UTF8')::jsonb
$$;
create function pg_temp.b64url(data bytea) returns text language sql as $$
    select rtrim(translate(encode(data, 'base64'), E'+/\n', '-_'), '=')
$$;
-- Signs header.payload with pgcrypto: an HMAC computed independently of keyhippo.
create function pg_temp.sign(header text, payload text, secret text, alg text default 'sha256')
returns text language sql as $$
    select pg_temp.b64url(convert_to(header, 'UTF8')) || '.' || pg_temp.b64url(convert_to(payload, 'UTF8')) || '.' ||
           pg_temp.b64url(hmac(pg_temp.b64url(convert_to(header, 'UTF8')) || '.' || pg_temp.b64url(convert_to(payload, 'UTF8')), secret, alg))
$$;
grant execute on all functions in schema pg_temp to authenticated;

\echo '--- no secret, or a short one: minting fails clearly'
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
savepoint s;
select * from keyhippo.create_jwt_api_key('no secret');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
select set_config('keyhippo.jwt_secret', 'too-short', true) is not null as short_secret;
select * from keyhippo.create_jwt_api_key('short secret');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- Supabase keeps PostgREST's secret in app.settings.jwt_secret; keyhippo reads it there too.
select set_config('app.settings.jwt_secret', :'secret', true) is not null as supabase_secret;
savepoint s;
select * from keyhippo.create_jwt_api_key('bad interval', interval '-1 day');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
savepoint s;
set local transaction_read_only = on;
\set VERBOSITY terse
select * from keyhippo.create_jwt_api_key('read only');
\echo :LAST_ERROR_SQLSTATE
\set VERBOSITY default
rollback to savepoint s;
select api_key as token, api_key_id as id from keyhippo.create_jwt_api_key('CI deploy') \gset

\echo '--- the token: HS256, the documented claims, a signature pgcrypto agrees with'
select pg_temp.b64url_json(split_part(:'token', '.', 1)) as header;
select c ->> 'sub' as sub, c ->> 'role' as role, c ->> 'type' as type,
       c ->> 'jti' = :'id' as jti_is_id,
       (c ->> 'exp')::bigint = floor(extract(epoch from m.expires_at)) as exp_is_expires_at,
       (c ->> 'iat')::bigint = floor(extract(epoch from m.created_at)) as iat_is_created_at,
       ((c ->> 'exp')::bigint - (c ->> 'iat')::bigint) / 86400 as lifetime_days,
       (select array_agg(k order by k) from jsonb_object_keys(c) k) as claim_names
  from pg_temp.b64url_json(split_part(:'token', '.', 2)) c, keyhippo.api_key_metadata m
 where m.id = :'id';
select split_part(:'token', '.', 3) =
       pg_temp.b64url(hmac(split_part(:'token', '.', 1) || '.' || split_part(:'token', '.', 2), :'secret', 'sha256'))
       as signature_verifies_with_pgcrypto;
select user_id = 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa' as verifies_for_a from keyhippo.verify_api_key(:'token');
-- As anon too (PostgREST's anon role calling verify).
reset role;
set local role anon;
select count(*) as anon_verifies from keyhippo.verify_api_key(:'token');
reset role;

\echo '--- the token is stored nowhere'
select set_config('kh.test_token', :'token', true) is not null as remembered;
create temp table found (tbl text, hits bigint);
do $$
declare
    t record;
    hits bigint;
begin
    for t in select c.oid::regclass as rel from pg_class c join pg_namespace n on n.oid = c.relnamespace
              where c.relkind = 'r' and n.nspname not in ('pg_catalog', 'information_schema')
                and n.nspname not like 'pg_temp%' and n.nspname not like 'pg_toast%'
    loop
        execute format('select count(*) from %s r where strpos(r::text, %L) > 0', t.rel,
                       split_part(current_setting('kh.test_token'), '.', 3)) into hits;
        insert into found values (t.rel::text, hits);
    end loop;
end
$$;
select count(*) > 10 as tables_searched, sum(hits) as token_hits from found;
select prefix = 'jwt_' || id as prefix_is_jti, key_hash ~ '^sha256\$' as hash_only
  from keyhippo.api_key_metadata m join keyhippo.api_key_secrets s on s.key_metadata_id = m.id
 where m.id = :'id';

\echo '--- refused: tampered payload, another secret, alg none, another alg, a JWT that is no API key'
create temp table forged (label text, token text);
insert into forged values
    ('tampered payload', split_part(:'token', '.', 1) || '.' ||
        pg_temp.b64url(convert_to(jsonb_set(pg_temp.b64url_json(split_part(:'token', '.', 2)), '{sub}', '"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb"')::text, 'UTF8'))
        || '.' || split_part(:'token', '.', 3)),
    ('another secret', pg_temp.sign('{"alg":"HS256","typ":"JWT"}', convert_from(decode(rpad(translate(split_part(:'token', '.', 2), '-_', '+/'), (ceil(length(split_part(:'token', '.', 2)) / 4.0) * 4)::int, '='), 'base64'), 'UTF8'), 'another-secret-another-secret-another!')),
    ('alg none', pg_temp.b64url(convert_to('{"alg":"none","typ":"JWT"}', 'UTF8')) || '.' || split_part(:'token', '.', 2) || '.'),
    ('alg HS512', pg_temp.sign('{"alg":"HS512","typ":"JWT"}', convert_from(decode(rpad(translate(split_part(:'token', '.', 2), '-_', '+/'), (ceil(length(split_part(:'token', '.', 2)) / 4.0) * 4)::int, '='), 'base64'), 'UTF8'), :'secret', 'sha512')),
    ('not an API key', pg_temp.sign('{"alg":"HS256","typ":"JWT"}', json_build_object('sub', 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'role', 'authenticated', 'jti', :'id', 'exp', 4102444800)::text, :'secret')),
    ('unknown jti', pg_temp.sign('{"alg":"HS256","typ":"JWT"}', json_build_object('sub', 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'role', 'authenticated', 'jti', gen_random_uuid(), 'type', 'api_key', 'exp', 4102444800)::text, :'secret')),
    ('expired exp claim', pg_temp.sign('{"alg":"HS256","typ":"JWT"}', json_build_object('sub', 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'role', 'authenticated', 'jti', :'id', 'type', 'api_key', 'exp', 1000)::text, :'secret')),
    ('control: the same claims re-signed with the secret (verifies)', pg_temp.sign('{"alg":"HS256","typ":"JWT"}', convert_from(decode(rpad(translate(split_part(:'token', '.', 2), '-_', '+/'), (ceil(length(split_part(:'token', '.', 2)) / 4.0) * 4)::int, '='), 'base64'), 'UTF8'), :'secret'));
select label, (select count(*) from keyhippo.verify_api_key(f.token)) as verifies from forged f order by label;

\echo '--- check_request: PostgREST has checked the signature and filled in the claims'
create function pg_temp.request_with_claims(claims text) returns text language plpgsql as $$
begin
    perform set_config('request.jwt.claims', claims, true);
    perform set_config('role', 'authenticated', true);
    perform keyhippo.check_request();
    return 'admitted as ' || coalesce((select user_id::text from keyhippo.current_user_context()), 'nobody');
exception when sqlstate 'PGRST' then
    return 'refused: ' || sqlerrm;
end $$;
select pg_temp.request_with_claims(convert_from(decode(rpad(translate(split_part(:'token', '.', 2), '-_', '+/'), (ceil(length(split_part(:'token', '.', 2)) / 4.0) * 4)::int, '='), 'base64'), 'UTF8')) as live_key;
reset role;
select pg_temp.request_with_claims(json_build_object('sub', 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'role', 'authenticated', 'jti', gen_random_uuid(), 'type', 'api_key')::text) as unknown_jti;
reset role;
select pg_temp.request_with_claims(json_build_object('sub', 'bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'role', 'authenticated', 'jti', :'id', 'type', 'api_key')::text) as someone_elses_jti;
reset role;
select pg_temp.request_with_claims(:'A') as ordinary_user_jwt;
reset role;

\echo '--- revocation takes effect at once, for verify and for check_request'
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select new_api_key as token2, new_api_key_id as id2 from keyhippo.rotate_api_key(:'id') \gset
select split_part(:'token2', '.', 1) = split_part(:'token', '.', 1) as rotated_into_a_jwt,
       pg_temp.b64url_json(split_part(:'token2', '.', 2)) ->> 'jti' = :'id2' as new_jti;
select count(*) as old_token_verifies from keyhippo.verify_api_key(:'token');
select count(*) as new_token_verifies from keyhippo.verify_api_key(:'token2');
reset role;
select pg_temp.request_with_claims(convert_from(decode(rpad(translate(split_part(:'token', '.', 2), '-_', '+/'), (ceil(length(split_part(:'token', '.', 2)) / 4.0) * 4)::int, '='), 'base64'), 'UTF8')) as revoked_key;
reset role;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select keyhippo.revoke_api_key(:'id2') as revoked;
select count(*) as revoked_token_verifies from keyhippo.verify_api_key(:'token2');

\echo '--- the table-shaped interface: keyhippo.jwt_api_keys'
insert into keyhippo.jwt_api_keys (description) values ('From the view')
returning token is not null as token_returned, jti = id as jti_is_id,
          user_id = 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa' as owned_by_a,
          expires_at between now() + interval '364 days' and now() + interval '367 days' as one_year \gset
select :'token_returned', :'jti_is_id', :'owned_by_a', :'one_year';
insert into keyhippo.jwt_api_keys (description, expires_at) values ('Short lived', now() + interval '30 days')
returning token as view_token, id as view_id \gset
select count(*) as view_token_verifies from keyhippo.verify_api_key(:'view_token');
select description, token is null as token_not_shown, revoked_at is null as live
  from keyhippo.jwt_api_keys order by created_at, description;
savepoint s;
insert into keyhippo.jwt_api_keys (description, user_id) values ('For B', 'bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb');
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
update keyhippo.jwt_api_keys set expires_at = now() + interval '10 years' where id = :'view_id';
\echo :LAST_ERROR_SQLSTATE
rollback to savepoint s;
-- B sees none of A's JWT keys and cannot touch them.
reset role;
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select count(*) as b_sees from keyhippo.jwt_api_keys;
update keyhippo.jwt_api_keys set revoked_at = now() where id = :'view_id';
delete from keyhippo.jwt_api_keys where id = :'view_id';
reset role;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select count(*) as still_verifies from keyhippo.verify_api_key(:'view_token');
-- A revokes by UPDATE ... SET revoked_at = now(), then deletes.
update keyhippo.jwt_api_keys set revoked_at = now() where id = :'view_id';
select revoked_at is not null as revoked from keyhippo.jwt_api_keys where id = :'view_id';
select count(*) as revoked_view_token_verifies from keyhippo.verify_api_key(:'view_token');
delete from keyhippo.jwt_api_keys where id = :'view_id';
select count(*) as left_after_delete from keyhippo.jwt_api_keys where id = :'view_id';
rollback;
