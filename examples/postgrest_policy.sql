-- A table whose rows belong to users, readable by their owner whether the request is signed in
-- (a JWT, role authenticated) or anonymous with one of the owner's API keys in the x-api-key
-- header (role anon). Each request below is replayed the way PostgREST runs it: claims and
-- headers set for the transaction, then SET LOCAL ROLE. `make test` runs this file and
-- compares the output with examples/expected/postgrest_policy.out.
BEGIN;
INSERT INTO auth.users (id) VALUES
    ('11111111-1111-4111-8111-111111111111'),
    ('22222222-2222-4222-8222-222222222222');

-- The table and its policy.
CREATE TABLE public.notes (id bigint PRIMARY KEY, owner uuid NOT NULL, body text);
ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY;
GRANT SELECT ON public.notes TO anon, authenticated;
CREATE POLICY notes_owner ON public.notes FOR SELECT TO anon, authenticated
    USING (owner = (SELECT keyhippo_internal.current_user_id()));
INSERT INTO public.notes VALUES
    (1, '11111111-1111-4111-8111-111111111111', 'first user''s note'),
    (2, '22222222-2222-4222-8222-222222222222', 'second user''s note');

-- The first user, signed in, creates a key.
SELECT set_config('request.jwt.claims', '{"sub":"11111111-1111-4111-8111-111111111111","role":"authenticated"}', true) <> '' AS signed_in;
SET LOCAL ROLE authenticated;
SELECT api_key FROM keyhippo.create_api_key('notes reader') \gset
SELECT body FROM public.notes;
RESET ROLE;

-- An anonymous request carrying that key sees that user's rows, and only those.
SELECT set_config('request.jwt.claims', '{"role":"anon"}', true) <> '' AS anonymous,
       set_config('request.headers', json_build_object('x-api-key', :'api_key')::text, true) <> '' AS with_key;
SET LOCAL ROLE anon;
SELECT body FROM public.notes;
RESET ROLE;

-- Without a key: nothing.
SELECT set_config('request.headers', '{}', true) <> '' AS without_key;
SET LOCAL ROLE anon;
SELECT body FROM public.notes;
ROLLBACK;
