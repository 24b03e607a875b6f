-- What create_api_key writes, through its one INSERT statement: the same rows and audit row a
-- plain INSERT would give, the foreign keys and the triggers enforced (create_as_insert.sql: the
-- triggers and column types a plain INSERT honours).
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\echo '--- the result: a row type with the columns of KeyHippo 1.2.5 RETURNS TABLE; SECURITY DEFINER,'
\echo '--- search_path pinned, at most one row'
select pg_get_function_result(p.oid) as result, pg_get_function_arguments(p.oid) as arguments,
       p.prosecdef, p.proconfig, p.prorows, p.provolatile
  from pg_proc p where p.oid = 'keyhippo.create_api_key(text,text,interval)'::regprocedure;
select a.attname, format_type(a.atttypid, a.atttypmod) as type
  from pg_attribute a
 where a.attrelid = 'keyhippo.create_api_key_result'::regclass and a.attnum > 0
 order by a.attnum;

begin;
insert into auth.users (id, email) values ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com');
create temp table issued (api_key text, id uuid);
grant all on issued to authenticated;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
insert into issued select * from keyhippo.create_api_key('direct path');
insert into issued select * from keyhippo.create_api_key('scoped', 'default');
reset role;

\echo '--- one key row, one hash, one audit row each; the audit row is to_jsonb of the key row'
select m.description, s.key_metadata_id is not null as has_hash, m.scope_id is not null as scoped,
       m.created_at = now() as created_now, m.expires_at = now() + interval '100 years' as expires_default,
       m.claims, m.is_revoked, m.revoked_at, m.last_used_at
  from issued i join keyhippo.api_key_metadata m on m.id = i.id
  left join keyhippo.api_key_secrets s on s.key_metadata_id = m.id
 order by m.description;
select count(*) as audit_rows, bool_and(a.data -> 'new_data' = to_jsonb(m)) as audit_is_row,
       bool_and(a.user_id = m.user_id) as actor, min(a.function_name) as function_name
  from issued i join keyhippo.api_key_metadata m on m.id = i.id
  join keyhippo.audit_log a on a.action = 'INSERT' and a.table_name = 'api_key_metadata'
                            and (a.data -> 'new_data' ->> 'id')::uuid = m.id;
select count(*) as verified from issued i, keyhippo.verify_api_key(i.api_key);

\echo '--- every way of reading the result, as with RETURNS TABLE'
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select length(api_key) as key_length, api_key_id is not null as has_id from keyhippo.create_api_key('star');
select length((keyhippo.create_api_key('column of call')).api_key) as key_length;
select (k).api_key_id is not null as has_id from keyhippo.create_api_key('row value') k;
reset role;

\echo '--- in another time zone, and for a rotated key carrying claims, the audit row is still to_jsonb of the row'
set local timezone = 'America/New_York';
select keyhippo.update_key_claims(id, '{"tier": "gold", "n": [1, 2.5, null], "nested": {"a": true}}')
  from issued where id = (select id from keyhippo.api_key_metadata where description = 'direct path');
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
insert into issued select * from keyhippo.rotate_api_key((select id from keyhippo.api_key_metadata where description = 'direct path' and not is_revoked));
insert into issued select * from keyhippo.create_api_key('new york');
reset role;
select m.description, m.claims, a.data -> 'new_data' = to_jsonb(m) as audit_is_row,
       a.data -> 'new_data' ->> 'created_at' like '%-05:00' as local_time
  from keyhippo.api_key_metadata m
  join keyhippo.audit_log a on a.action = 'INSERT' and a.table_name = 'api_key_metadata'
                            and (a.data -> 'new_data' ->> 'id')::uuid = m.id
 where m.id in (select id from issued) and not m.is_revoked and m.description in ('direct path', 'new york')
 order by m.description;
reset timezone;

\echo '--- a hash without its key row is refused by the foreign key'
savepoint orphan;
insert into keyhippo.api_key_secrets (key_metadata_id, key_hash)
values ('00000000-0000-4000-8000-000000000000', 'sha256$00');
rollback to savepoint orphan;

\echo '--- the auth.users foreign key is in place'
savepoint no_user;
insert into keyhippo.api_key_metadata (user_id, prefix) values ('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'kh_nouser');
rollback to savepoint no_user;

\echo '--- create locks the owner row of auth.users FOR KEY SHARE (the xmax of the row is this'
\echo '--- transaction, as after the check of the foreign key), so a concurrent DELETE of the user waits'
select xmax = pg_current_xact_id()::xid as owner_row_locked_by_this_transaction
  from auth.users where id = 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa';

\echo '--- foreign keys other than the two create satisfies itself are still checked on its direct path'
create table public.allowed_ids (id uuid primary key);
savepoint extra_fk;
alter table keyhippo.api_key_secrets add constraint extra_fk
    foreign key (key_metadata_id) references public.allowed_ids (id) not valid;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
\set VERBOSITY terse
select count(*) from keyhippo.create_api_key('refused by extra hash fk');
rollback to savepoint extra_fk;
alter table keyhippo.api_key_metadata add constraint extra_fk
    foreign key (user_id) references public.allowed_ids (id) not valid;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select count(*) from keyhippo.create_api_key('refused by extra owner fk');
rollback to savepoint extra_fk;
\echo '--- a BEFORE trigger that rewrites the columns the foreign keys are about: checked as usual'
create function pg_temp.elsewhere() returns trigger language plpgsql as $$
begin new.key_metadata_id := '00000000-0000-4000-8000-000000000000'; return new; end $$;
create trigger a_test_elsewhere before insert on keyhippo.api_key_secrets
    for each row execute function pg_temp.elsewhere();
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select count(*) from keyhippo.create_api_key('hash moved by a trigger');
rollback to savepoint extra_fk;
create function pg_temp.other_owner() returns trigger language plpgsql as $$
begin new.user_id := '00000000-0000-4000-8000-000000000000'; return new; end $$;
create trigger a_test_other_owner before insert on keyhippo.api_key_metadata
    for each row execute function pg_temp.other_owner();
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select count(*) from keyhippo.create_api_key('owner moved by a trigger');
\set VERBOSITY default
rollback to savepoint extra_fk;
\echo '--- the same foreign keys again (to the same columns): satisfied, the key is created'
alter table keyhippo.api_key_secrets add constraint extra_fk
    foreign key (key_metadata_id) references keyhippo.api_key_metadata (id);
alter table keyhippo.api_key_metadata add constraint extra_fk
    foreign key (user_id) references auth.users (id);
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select count(*) as created_with_duplicate_fks from keyhippo.create_api_key('duplicate fks');
reset role;
rollback to savepoint extra_fk;
select count(*) as keys_of_savepoint from keyhippo.api_key_metadata where description like '%fk%';

\echo '--- deleting a key row still deletes its hash (ON DELETE CASCADE is a trigger of the key table)'
savepoint cascade;
delete from keyhippo.api_key_metadata where id = (select id from issued where api_key is not null limit 1);
select count(*) as orphan_hashes from keyhippo.api_key_secrets s
 where not exists (select 1 from keyhippo.api_key_metadata m where m.id = s.key_metadata_id);
rollback to savepoint cascade;

\echo '--- READ ONLY: create writes nothing and says why (25006), as an INSERT would'
savepoint read_only;
set local transaction_read_only = on;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
\set VERBOSITY terse
select count(*) from keyhippo.create_api_key('read only');
\echo :LAST_ERROR_SQLSTATE
\set VERBOSITY default
rollback to savepoint read_only;
reset role;

\echo '--- a user-defined trigger on the key table fires for keys created by create_api_key'
create function pg_temp.seen() returns trigger language plpgsql as $$
begin raise notice 'trigger saw a new key: %', new.description; return new; end $$;
create trigger a_test_seen before insert on keyhippo.api_key_metadata
    for each row execute function pg_temp.seen();
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select api_key_id is not null as created from keyhippo.create_api_key('with trigger');
reset role;
drop trigger a_test_seen on keyhippo.api_key_metadata;

\echo '--- a key expiring inside the notification window is reported once (Rust expiry trigger)'
update keyhippo.api_key_metadata set expires_at = now() + interval '1 hour'
 where description = 'new york';
update keyhippo.api_key_metadata set expires_at = now() + interval '2 hours'
 where description = 'new york';
update keyhippo.api_key_metadata set expires_at = now() + interval '2 years'
 where description = 'scoped';
select count(*) as expiring_reports from keyhippo.audit_log where action = 'expiring_key';

\echo '--- an altered table: create falls back to its SQL statement, with the same result'
alter table keyhippo.api_key_metadata add column note text;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
insert into issued select * from keyhippo.create_api_key('fallback path');
reset role;
select m.description, s.key_metadata_id is not null as has_hash, m.expires_at = now() + interval '100 years' as expires_default
  from issued i join keyhippo.api_key_metadata m on m.id = i.id
  join keyhippo.api_key_secrets s on s.key_metadata_id = m.id
 where m.description = 'fallback path';
select count(*) as audit_rows, bool_and(a.data -> 'new_data' = to_jsonb(m) - 'note') as audit_is_row
  from keyhippo.api_key_metadata m
  join keyhippo.audit_log a on a.action = 'INSERT' and a.table_name = 'api_key_metadata'
                            and (a.data -> 'new_data' ->> 'id')::uuid = m.id
 where m.description = 'fallback path';
select count(*) as verified from issued i, keyhippo.verify_api_key(i.api_key) where i.api_key is not null;
rollback;
