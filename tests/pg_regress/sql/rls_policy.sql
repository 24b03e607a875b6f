-- An application table whose rows belong to users, with policies that let a signed-in user,
-- or an anonymous request carrying that user's API key in x-api-key, see exactly their rows.
\set ON_ERROR_STOP 0
\set A '{"sub":"aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa","role":"authenticated"}'
\set B '{"sub":"bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb","role":"authenticated"}'
begin;
insert into auth.users (id, email) values
    ('aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'a@example.com'),
    ('bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'b@example.com');
create table public.notes (id int primary key, owner uuid not null, body text);
insert into public.notes values
    (1, 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'A one'),
    (2, 'aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa', 'A two'),
    (3, 'bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb', 'B one');
alter table public.notes enable row level security;
grant select on public.notes to anon, authenticated;
create policy own_rows on public.notes for select to authenticated
    using (owner = (select keyhippo_internal.current_user_id()));
create policy notes_by_api_key on public.notes for select to anon
    using (owner = (select v.user_id from keyhippo.verify_api_key(
        nullif(current_setting('request.headers', true), '')::json ->> 'x-api-key') v));

select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select body from public.notes order by id;
select api_key as key_a, api_key_id as id_a from keyhippo.create_api_key('notes') \gset

reset role;
select set_config('request.jwt.claims', :'B', true) is not null as as_user_b;
set local role authenticated;
select body from public.notes order by id;

-- Anonymous request with A's key in the header: A's rows.
reset role;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as as_anon,
       set_config('request.headers', json_build_object('x-api-key', :'key_a')::text, true) is not null as with_key;
set local role anon;
select body from public.notes order by id;
-- Without a key, with a forged key, with an empty header setting: nothing.
select set_config('request.headers', '{}', true) is not null as no_key;
select body from public.notes order by id;
select set_config('request.headers', json_build_object('x-api-key', left(:'key_a', 20) || repeat('A', 49))::text, true) is not null as forged_key;
select body from public.notes order by id;
select set_config('request.headers', '', true) is not null as empty_headers;
select body from public.notes order by id;

-- After A revokes the key, the same header sees nothing.
reset role;
select set_config('request.jwt.claims', :'A', true) is not null as as_user_a;
set local role authenticated;
select keyhippo.revoke_api_key(:'id_a') as revoked;
reset role;
select set_config('request.jwt.claims', '{"role":"anon"}', true) is not null as as_anon,
       set_config('request.headers', json_build_object('x-api-key', :'key_a')::text, true) is not null as with_revoked_key;
set local role anon;
select body from public.notes order by id;
rollback;
