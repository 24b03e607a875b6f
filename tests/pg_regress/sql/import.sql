-- import_api_key: keys issued by another system, imported as their hash, verify with the
-- plaintext their holders already have. Run as PostgREST runs each request.
\set ON_ERROR_STOP 0
\set VERBOSITY terse
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');

\echo '--- before any import, junk costs at most one look at the (empty) index of imported keys'
select pg_stat_get_xact_numscans('keyhippo.api_key_secrets_imported_hash_idx'::regclass) as before \gset
select count(*) as verified from keyhippo.verify_api_key('sk_live_not_ours'),
       generate_series(1, 3);
select pg_stat_get_xact_numscans('keyhippo.api_key_secrets_imported_hash_idx'::regclass) - :before <= 1 as at_most_one;

\echo '--- service_role imports a key made elsewhere, by the SHA-256 of the whole key'
set local role service_role;
select keyhippo.import_api_key('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa',
         'sha256$' || encode(sha256('sk_live_51HxElsewhere'::bytea), 'hex'),
         'sk_live_51Hx', 'Imported from Stripe-like service', NULL, 'default', '{"plan": "pro"}') as id \gset
reset role;
select prefix, description, claims, scope_id is not null as scoped,
       expires_at = now() + interval '100 years' as default_lifetime
  from keyhippo.api_key_metadata where id = :'id';
select key_hash like 'imported-sha256$%' as stored_under_its_own_name
  from keyhippo.api_key_secrets where key_metadata_id = :'id';
select action, function_name from keyhippo.audit_log
 where action = 'INSERT' and data -> 'new_data' ->> 'id' = :'id';

\echo '--- the plaintext its holder has verifies, as anon, through every path'
set local role anon;
select user_id, permissions from keyhippo.verify_api_key('sk_live_51HxElsewhere');
select status, api_key_id = :'id' as id_matches from keyhippo.verify_api_key_status('sk_live_51HxElsewhere');
select status from keyhippo.verify_api_key_status('sk_live_51HxElsewherf');
reset role;

\echo '--- a KeyHippo 1.2.5 key imported by its hash and prefix'
select 'AbCdEfGhIjKlMnOpQrStUvWxYz012+/9' as p125, repeat('0123456789abcdef', 8) as s125 \gset
set local role service_role;
select keyhippo.import_api_key('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa',
         encode(sha512(convert_to(:'s125', 'UTF8')), 'hex'), :'p125', 'From KeyHippo 1-2-5') is not null as imported;
select status from keyhippo.verify_api_key_status(:'p125' || :'s125');
reset role;

\echo '--- revoked and disabled imported keys are refused'
select keyhippo.disable_api_key(:'id') as disabled;
select status from keyhippo.verify_api_key_status('sk_live_51HxElsewhere');
select keyhippo.revoke_api_key(:'id') as revoked;
select status from keyhippo.verify_api_key_status('sk_live_51HxElsewhere');

\echo '--- errors: not an admin, malformed hashes and prefixes, duplicates, the past'
savepoint s;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select keyhippo.import_api_key('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'sha256$' || repeat('a', 64), 'x_1', 'mine');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
set local role service_role;
select keyhippo.import_api_key('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'md5$abc', 'x_1', 'bad hash');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
set local role service_role;
select keyhippo.import_api_key('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'sha256$' || repeat('a', 64), 'kh_abc', 'our prefix');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
set local role service_role;
select keyhippo.import_api_key('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', repeat('a', 128), 'short', 'not a 1-2-5 prefix');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
set local role service_role;
select keyhippo.import_api_key('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'sha256$' || repeat('b', 64), 'sk_live_51Hx', 'same prefix');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
set local role service_role;
select keyhippo.import_api_key('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'sha256$' || repeat('c', 64), 'one', 'first') is not null as first;
select keyhippo.import_api_key('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'sha256$' || repeat('c', 64), 'two', 'same key again');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
set local role service_role;
select keyhippo.import_api_key('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'sha256$' || repeat('d', 64), 'old', 'expired', now() - interval '1 day');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
rollback;
