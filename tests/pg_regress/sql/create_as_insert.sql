-- create_api_key writes its rows with an INSERT statement, so it behaves as one whatever the
-- tables carry: statement-level triggers fire, transition tables are there, and columns are
-- written by their type (or refused with a clean error).
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
create temp table fired (what text, n int);
grant all on fired to authenticated;

\echo '--- 1. a statement-level trigger on api_key_metadata fires on create_api_key'
create function pg_temp.note_statement() returns trigger language plpgsql as $$
begin
    insert into fired values ('statement ' || tg_op, null);
    return null;
end $$;
create trigger note_statement after insert on keyhippo.api_key_metadata
    for each statement execute function pg_temp.note_statement();

\echo '--- 2. an AFTER INSERT trigger with a transition table sees the new row'
create function pg_temp.note_new_rows() returns trigger language plpgsql as $$
begin
    insert into fired select 'new rows', count(*) from newrows;
    return null;
end $$;
create trigger note_new_rows after insert on keyhippo.api_key_metadata
    referencing new table as newrows
    for each statement execute function pg_temp.note_new_rows();

select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select count(*) as created from keyhippo.create_api_key('with triggers');
reset role;
select what, n from fired order by what;
rollback;

\echo '--- 3. claims stored as json: create_api_key writes json, not jsonb bytes'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
alter table keyhippo.api_key_metadata alter column claims drop default;
alter table keyhippo.api_key_metadata drop constraint if exists api_key_metadata_claims_check;
alter table keyhippo.api_key_metadata alter column claims type json using claims::json;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select count(*) as created from keyhippo.create_api_key('json claims');
reset role;
select pg_typeof(claims) as claims_type, claims::text as claims
  from keyhippo.api_key_metadata where description = 'json claims';
rollback;

\echo '--- 4. audit_log.timestamp as text: a clean error or a row, never a crash'
begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
alter table keyhippo.audit_log alter column "timestamp" type text;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select count(*) as created from keyhippo.create_api_key('text timestamp');
reset role;
select count(*) as audit_rows, bool_and("timestamp" is not null) as timestamped
  from keyhippo.audit_log where data->'new_data'->>'description' = 'text timestamp';
rollback;

\echo '--- the server is still up'
select 1 as alive;
