-- keyhippo's key lifecycle in a few statements: a signed-in user creates a key, the key
-- verifies, is disabled and enabled, rotated with an overlap, and a revoked key does not verify (examples/postgrest_policy.sql adds a Row Level Security
-- policy). Runs as written in a Supabase-shaped database with keyhippo installed (`make run`
-- makes one); `make test` runs it and compares the output with examples/expected/quickstart.out.
BEGIN;
INSERT INTO auth.users (id) VALUES ('8d0fd2b3-9ca7-4b7d-9d4c-1f3e6b7a2c11');

-- A request signed in as that user (PostgREST sets these two for each request).
SELECT set_config('request.jwt.claims', '{"sub":"8d0fd2b3-9ca7-4b7d-9d4c-1f3e6b7a2c11","role":"authenticated"}', true) <> '' AS signed_in;
SET LOCAL ROLE authenticated;

-- 1. Create a key. The plaintext comes back once; only its hash is stored.
SELECT api_key, api_key_id FROM keyhippo.create_api_key('CLI') \gset
SELECT left(:'api_key', 3) AS tag, length(:'api_key') AS length;

-- 2. Verify it: one row with its owner, scope and permissions. A wrong key gives no row.
SELECT user_id, scope_id, permissions FROM keyhippo.verify_api_key(:'api_key');
SELECT count(*) AS rows_for_a_wrong_key FROM keyhippo.verify_api_key('kh_not_a_key');

-- 3. Ask why a key is accepted or not: VALID, NOT_FOUND, EXPIRED or DISABLED.
SELECT status FROM keyhippo.verify_api_key_status(:'api_key');

-- 4. Pause it and resume it: a disabled key does not verify, and keeps working once enabled.
SELECT keyhippo.disable_api_key(:'api_key_id') AS disabled;
SELECT status FROM keyhippo.verify_api_key_status(:'api_key');
SELECT keyhippo.enable_api_key(:'api_key_id') AS enabled;

-- 5. Rotate it with a day's overlap: both keys work until the old one's grace period ends.
SELECT new_api_key, new_api_key_id FROM keyhippo.rotate_api_key(:'api_key_id', interval '1 day') \gset
SELECT (SELECT status FROM keyhippo.verify_api_key_status(:'api_key')) AS old_key,
       (SELECT status FROM keyhippo.verify_api_key_status(:'new_api_key')) AS new_key;

-- 6. Revoke it: it stops verifying at once, in every session.
SELECT keyhippo.revoke_api_key(:'new_api_key_id') AS revoked;
SELECT count(*) AS rows_after_revoke FROM keyhippo.verify_api_key(:'new_api_key');
ROLLBACK;
