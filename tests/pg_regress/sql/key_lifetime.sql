-- How long keys live: create_api_key's expires_in, the keyhippo.default_key_lifetime setting,
-- and create_jwt_api_key's default lifetime. Run as PostgREST runs a signed-in request.
\set ON_ERROR_STOP 0
\set VERBOSITY terse
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;

\echo '--- no expires_in: keyhippo.default_key_lifetime, 100 years by default (KeyHippo 1.2.5)'
select api_key_id as id from keyhippo.create_api_key('default') \gset
select expires_at = now() + interval '100 years' as hundred_years
  from keyhippo.api_key_metadata where id = :'id';
select count(*) as one_argument_call from keyhippo.create_api_key('one argument');
select count(*) as two_argument_call from keyhippo.create_api_key('two arguments', 'default');

\echo '--- a chosen lifetime: positional, named, with a scope'
select api_key as k, api_key_id as id from keyhippo.create_api_key('a day', NULL, interval '1 day') \gset
select expires_at = now() + interval '1 day' as one_day from keyhippo.api_key_metadata where id = :'id';
select count(*) as verifies from keyhippo.verify_api_key(:'k');
select api_key_id as id from keyhippo.create_api_key('named', expires_in => interval '90 days') \gset
select expires_at = now() + interval '90 days' as ninety_days from keyhippo.api_key_metadata where id = :'id';
select api_key_id as id from keyhippo.create_api_key('scoped', 'default', interval '1 hour') \gset
select expires_at = now() + interval '1 hour' as one_hour, scope_id is not null as scoped
  from keyhippo.api_key_metadata where id = :'id';

\echo '--- not a positive lifetime: 22023, nothing written'
savepoint s;
select * from keyhippo.create_api_key('zero', NULL, interval '0');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
select * from keyhippo.create_api_key('negative', NULL, interval '-1 day');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
-- A month counts as 30 days, as when PostgreSQL compares intervals.
select * from keyhippo.create_api_key('mixed', NULL, interval '1 month -31 days');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
-- Past the last timestamp PostgreSQL can hold.
select * from keyhippo.create_api_key('too long', NULL, interval '300000 years');
\echo :LAST_ERROR_SQLSTATE
rollback to s;
select count(*) as refused_keys_written from keyhippo.api_key_metadata
 where description in ('zero', 'negative', 'mixed', 'too long');

\echo '--- the setting: superusers set it; users cannot'
reset role;
set local keyhippo.default_key_lifetime = '30 days';
set local role authenticated;
select api_key_id as id from keyhippo.create_api_key('thirty days') \gset
select expires_at = now() + interval '30 days' as thirty_days from keyhippo.api_key_metadata where id = :'id';
savepoint s2;
set local keyhippo.default_key_lifetime = '1 day';
\echo :LAST_ERROR_SQLSTATE
rollback to s2;
reset role;
set local keyhippo.default_key_lifetime = 'banana';
set local role authenticated;
select * from keyhippo.create_api_key('bad setting');
\echo :LAST_ERROR_SQLSTATE
rollback to s2;
reset role;
set local keyhippo.default_key_lifetime = '-1 day';
set local role authenticated;
select * from keyhippo.create_api_key('negative setting');
\echo :LAST_ERROR_SQLSTATE
rollback to s2;
reset role;
set local keyhippo.default_key_lifetime = '300000 years';
set local role authenticated;
select * from keyhippo.create_api_key('setting too long');
\echo :LAST_ERROR_SQLSTATE
rollback to s2;
-- A chosen lifetime does not need the setting.
select count(*) as chosen_despite_bad_setting from keyhippo.create_api_key('chosen', NULL, interval '2 days');
rollback to s2;

\echo '--- JWT-format keys: a year by default, or keyhippo.jwt_max_lifetime when shorter'
reset role;
set local keyhippo.default_key_lifetime = '100 years';
set local keyhippo.jwt_secret = 'a-postgrest-jwt-secret-of-at-least-32-bytes';
set local role authenticated;
select api_key_id as id from keyhippo.create_jwt_api_key('jwt default') \gset
select expires_at = now() + interval '1 year' as one_year from keyhippo.api_key_metadata where id = :'id';
select api_key_id as id from keyhippo.create_jwt_api_key('jwt null', NULL) \gset
select expires_at = now() + interval '1 year' as one_year_for_null from keyhippo.api_key_metadata where id = :'id';
reset role;
set local keyhippo.jwt_max_lifetime = '30 days';
set local role authenticated;
select api_key_id as id from keyhippo.create_jwt_api_key('jwt capped') \gset
select expires_at = now() + interval '30 days' as capped_at_max from keyhippo.api_key_metadata where id = :'id';
select api_key_id as id from keyhippo.create_jwt_api_key('jwt chosen', interval '7 days') \gset
select expires_at = now() + interval '7 days' as seven_days from keyhippo.api_key_metadata where id = :'id';
rollback;
