#!/usr/bin/env bash
# Concurrency with real parallel connections against a throwaway cluster (the extension must be
# installed). Ends with "concurrency: N passed, N failed".
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PORT=${CONCURRENCY_PORT:-55440}
WORK="$ROOT/target/concurrency"
# Preloaded, so these run against the verified-key cache and the background workers; with
# pg_cron's interface (tests/fixtures/pg_cron_stub), to check that keyhippo schedules its jobs
# when pg_cron is there. The verified-key cache is on: the revocation tests below must hold with
# it.
. bin/env.sh
EXTRA_CONF="keyhippo.verified_key_cache = on
shared_preload_libraries = 'keyhippo'" bin/cluster start concurrency "$PORT" || exit 1
trap 'bin/cluster stop concurrency' EXIT
PORT=$(bin/cluster port concurrency)
rm -rf "$WORK"; mkdir -p "$WORK"

export PGPORT=$PORT
. tests/lib.sh
setup_kh pg_cron

# 0. With pg_cron installed, CREATE EXTENSION keyhippo scheduled the expiry job hourly and the
#    audit purge daily, and the scheduled commands run.
check "pg_cron jobs scheduled" \
    "keyhippo_purge_audit_log|17 3 * * *|SELECT keyhippo.purge_audit_log();keyhippo_update_expiring_keys|0 * * * *|SELECT keyhippo.update_expiring_keys()" \
    "$(q -c "SELECT string_agg(jobname || '|' || schedule || '|' || command, ';' ORDER BY jobname) FROM cron.job")"
check "scheduled commands run" "0|0" "$(q -c "SELECT keyhippo.update_expiring_keys() || '|' || keyhippo.purge_audit_log()")"

# 1. Eight connections revoke the same key at once: exactly one of them revokes it.
read -r key id <<<"$(new_key race)"
q -c "$as_a" -c "BEGIN" -c "SELECT keyhippo.revoke_api_key('$id')" -c "SELECT pg_sleep(1.5)" -c "COMMIT" \
    >"$WORK/revoke.0" &
sleep 0.5
for i in 1 2 3 4 5 6 7; do
    q -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$id')" >"$WORK/revoke.$i" &
done
wait
check "8 concurrent revokes: one true" 1 "$(cat "$WORK"/revoke.* | grep -c '^t$')"
check "8 concurrent revokes: seven false" 7 "$(cat "$WORK"/revoke.* | grep -c '^f$')"
check "revoked key no longer verifies" 0 "$(q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')")"

# 2. A revocation committed in one backend is seen by the very next verify of another backend
#    that has verified (and so prepared its plan for) the same key before.
# Prints what one backend's verify of key $1 answers before and after another backend revokes
# it (id $2) in between.
verify_around_revoke() {
    q -c "SELECT count(*) FROM keyhippo.verify_api_key('$1')" -c "SELECT pg_sleep(1.5)" \
      -c "SELECT count(*) FROM keyhippo.verify_api_key('$1')" >"$WORK/verifier" &
    sleep 0.5
    q -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$2')" >/dev/null
    wait
    grep -v '^$' "$WORK/verifier" | tr '\n' ' ' | sed 's/ $//'
}
read -r key id <<<"$(new_key visibility)"
check "verify in another backend: before revoke, after revoke" "1 0" "$(verify_around_revoke "$key" "$id")"

# 2b. The same after VACUUM, when verify reads the hash from the primary key's INCLUDE column
#     (index-only; what it does when the hash index on key_metadata_id is gone): the revoking
#     transaction deletes the heap row, which clears the page's all-visible bit, so the next
#     verify goes to the heap and finds nothing.
q -c "DROP INDEX keyhippo.api_key_secrets_key_metadata_id_hash_idx"
read -r key id <<<"$(new_key index_only)"
q -c "VACUUM (FREEZE) keyhippo.api_key_secrets" >/dev/null
check "hash pages all-visible after VACUUM" "t" \
    "$(q -c "SELECT pg_catalog.pg_relation_size('keyhippo.api_key_secrets') > 0 AND (SELECT relallvisible FROM pg_class WHERE oid = 'keyhippo.api_key_secrets'::regclass) = (SELECT relpages FROM pg_class WHERE oid = 'keyhippo.api_key_secrets'::regclass)")"
check "index-only hash read: before revoke, after revoke" "1 0" "$(verify_around_revoke "$key" "$id")"
q -c "CREATE INDEX api_key_secrets_key_metadata_id_hash_idx ON keyhippo.api_key_secrets USING hash (key_metadata_id)"

# 3. Four connections create 200 keys each at the same time: 800 distinct keys, all verify.
for i in 1 2 3 4; do
    q -c "$as_a" -c "SELECT api_key FROM generate_series(1, 200) n, keyhippo.create_api_key('parallel ' || n)" \
        >"$WORK/created.$i" &
done
wait
check "parallel creation: distinct keys" 800 "$(cat "$WORK"/created.* | sort -u | grep -c '^kh_')"
q -c "CREATE TABLE public.created (api_key text)"
cat "$WORK"/created.* | q -c "COPY public.created FROM STDIN"
check "parallel creation: all verify" 800 \
    "$(q -c "SELECT count(*) FROM public.created c, keyhippo.verify_api_key(c.api_key) v")"

# 4. Verify under load from two connections while a third revokes and rotates keys: no errors.
read -r key id <<<"$(new_key load)"
echo "SELECT count(*) FROM keyhippo.verify_api_key('$key');" >"$WORK/verify.sql"
"$PGBIN/pgbench" -n -M prepared -c 2 -j 2 -T 3 -f "$WORK/verify.sql" kh >"$WORK/pgbench.log" 2>&1 &
for i in $(seq 1 20); do
    read -r _ rid <<<"$(new_key churn)"
    q -c "$as_a" -c "SELECT count(*) FROM keyhippo.rotate_api_key('$rid')" >/dev/null
done
wait
check "pgbench verify under churn: no failed transactions" 0 \
    "$(failed_transactions "$WORK/pgbench.log")"
check "pgbench verify under churn: transactions ran" yes \
    "$(grep -qE '^number of transactions actually processed: [1-9]' "$WORK/pgbench.log" && echo yes || echo no)"

# 5. The expiry notification reaches a listener on another connection at commit, not before.
read -r key id <<<"$(new_key expiring)"
q -c "LISTEN keyhippo_key_expiring" -c "SELECT pg_sleep(1)" -c "SELECT 'marker: before commit'" \
  -c "SELECT pg_sleep(2)" -c "SELECT 'marker: after commit'" >"$WORK/listener" 2>&1 &
sleep 0.3
q -c "BEGIN" -c "UPDATE keyhippo.api_key_metadata SET expires_at = now() + interval '1 hour' WHERE id = '$id'" \
  -c "SELECT pg_sleep(1.5)" -c "COMMIT" >/dev/null
wait
note_line=$(grep -n 'Asynchronous notification "keyhippo_key_expiring"' "$WORK/listener" | head -1 | cut -d: -f1)
before_line=$(grep -n 'marker: before commit' "$WORK/listener" | cut -d: -f1)
check "LISTEN: expiry notification received" yes "$([ -n "$note_line" ] && echo yes || echo no)"
check "LISTEN: not delivered before commit" yes \
    "$([ -n "$note_line" ] && [ -n "$before_line" ] && [ "$note_line" -gt "$before_line" ] && echo yes || echo no)"
check "LISTEN: payload names the key" yes "$(grep -q "\"id\": \"$id\"" "$WORK/listener" && echo yes || echo no)"
check "LISTEN: payload carries no key material" no \
    "$(grep -q "${key:20:43}" "$WORK/listener" && echo yes || echo no)"
# Anyone may LISTEN: the payload names the key and its expiry, nothing of its owner.
check "LISTEN: payload is the key id, its expiry and the event only" '"event" "expires_at" "id"' \
    "$(grep -o 'payload "{[^}]*}"' "$WORK/listener" | head -1 | grep -oE '"[a-z_]+": ' | tr -d ': ' | sort | tr '\n' ' ' | sed 's/ $//')"

# 6. create locks its owner's auth.users row FOR KEY SHARE itself (instead of the foreign key's
#    check statement): a concurrent DELETE of the owner must still wait for the creating
#    transaction and then cascade to the new key, a create racing a DELETE must see the user
#    gone once the DELETE commits (and exist again when it rolls back), and REPEATABLE READ must
#    fail with a serialization failure rather than create an orphan key.
as_user() { echo "SELECT set_config('request.jwt.claims', '{\"sub\":\"$1\",\"role\":\"authenticated\"}', false) IS NULL; SET ROLE authenticated;"; }
new_user() { q -c "INSERT INTO auth.users (id, email) VALUES ('$1', '$1@example.com')"; }
keys_of() { q -c "SELECT count(*) FROM keyhippo.api_key_metadata WHERE user_id = '$1'"; }
U1=b0000000-0000-4000-8000-000000000001 U2=b0000000-0000-4000-8000-000000000002
U3=b0000000-0000-4000-8000-000000000003 U4=b0000000-0000-4000-8000-000000000004
for u in $U1 $U2 $U3 $U4; do new_user "$u"; done
# 6a. create's transaction stays open 2 s; the DELETE starts 0.7 s in.
q -c "$(as_user $U1)" -c "BEGIN" -c "SELECT count(*) FROM keyhippo.create_api_key('held')" \
  -c "SELECT pg_sleep(2)" -c "COMMIT" >/dev/null &
sleep 0.7
start=$(date +%s%N)
q -c "DELETE FROM auth.users WHERE id = '$U1'" >/dev/null
waited_ms=$(( ($(date +%s%N) - start) / 1000000 ))
wait
check "DELETE of a key's owner waits for the creating transaction" yes "$([ "$waited_ms" -ge 700 ] && echo yes || echo "no ($waited_ms ms)")"
check "... and then deletes the new key (no orphan)" 0 "$(keys_of $U1)"
# 6b. The DELETE's transaction is open when create starts; it commits 1.5 s in.
q -c "BEGIN" -c "DELETE FROM auth.users WHERE id = '$U2'" -c "SELECT pg_sleep(1.5)" -c "COMMIT" >/dev/null &
sleep 0.5
out=$(q -v VERBOSITY=verbose -c "$(as_user $U2)" -c "SELECT count(*) FROM keyhippo.create_api_key('racing')" 2>&1 | grep -o 'ERROR: *[0-9A-Z]*' | tr -s ' ')
wait
# The key row's foreign key finds the user gone, as for any INSERT.
check "create racing a committed DELETE of its owner: 23503" "ERROR: 23503" "$out"
check "... and no key" 0 "$(keys_of $U2)"
# 6c. The same DELETE rolled back: create waits for it, then succeeds.
q -c "BEGIN" -c "DELETE FROM auth.users WHERE id = '$U3'" -c "SELECT pg_sleep(1.5)" -c "ROLLBACK" >/dev/null &
sleep 0.5
out=$(q -c "$(as_user $U3)" -c "SELECT count(*) FROM keyhippo.create_api_key('after rollback')" 2>&1 | tail -1)
wait
check "create racing a rolled-back DELETE of its owner: created" 1 "$out"
# 6d. REPEATABLE READ: the owner is deleted after the transaction's snapshot was taken.
q -v VERBOSITY=verbose -c "BEGIN ISOLATION LEVEL REPEATABLE READ" -c "$(as_user $U4)" -c "SELECT pg_sleep(1)" \
  -c "SELECT count(*) FROM keyhippo.create_api_key('repeatable read')" -c "COMMIT" >"$WORK/rr" 2>&1 &
sleep 0.4
q -c "DELETE FROM auth.users WHERE id = '$U4'" >/dev/null
wait
check "REPEATABLE READ create after its owner was deleted: 40001" "ERROR: 40001" "$(grep -o 'ERROR: *[0-9A-Z]*' "$WORK/rr" | tr -s ' ')"
check "... and no key" 0 "$(keys_of $U4)"

# 7. No statement that starts after a revocation or a permission change commits acts on the old
#    state, whatever the isolation level, with the verified-key cache on (this cluster) and under
#    load: pgbench verifies another key from two connections meanwhile. (The other session acts
#    0.8 s in, well inside the 2 s the first one waits.)
read -r lkey _ <<<"$(new_key "7 load")"
echo "SELECT count(*) FROM keyhippo.verify_api_key('$lkey');" >"$WORK/load.sql"
"$PGBIN/pgbench" -n -M prepared -c 2 -j 2 -T 20 -f "$WORK/load.sql" kh >"$WORK/load.log" 2>&1 &
load_pid=$!
lines() { grep -v '^$' "$1" | tr '\n' ' ' | sed 's/ $//'; }
# 7a. A REPEATABLE READ transaction took its snapshot before the revocation committed: inside it
#     the key verifies (right for its snapshot); after its COMMIT, never again in that backend.
read -r key id <<<"$(new_key "7a")"
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" -c "BEGIN ISOLATION LEVEL REPEATABLE READ" \
  -c "SELECT 'snapshot'" -c "SELECT pg_sleep(2)" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" \
  -c "COMMIT" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" \
  -c "SELECT pg_sleep(0.5)" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" >"$WORK/7a" 2>&1 &
sleep 0.8
q -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$id')" >/dev/null
wait "$!"
check "REPEATABLE READ across a revocation: before, inside, after commit, later" "1 snapshot 1 0 0" "$(lines "$WORK/7a")"
# 7b. READ COMMITTED: the revocation commits while a statement that verifies the key sleeps
#     (its snapshot is older than the revocation); the next statements refuse the key.
read -r key id <<<"$(new_key "7b")"
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" \
  -c "SELECT (SELECT count(*) FROM keyhippo.verify_api_key('$key')) >= 0 FROM (SELECT pg_sleep(2) OFFSET 0) s" \
  -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" \
  -c "SELECT pg_sleep(0.5)" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" >"$WORK/7b" 2>&1 &
sleep 0.8
q -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$id')" >/dev/null
wait "$!"
check "READ COMMITTED, revoked during a verifying statement: before, during, next, later" "1 t 0 0" "$(lines "$WORK/7b")"
# 7c. The permissions cache (on whenever preloaded): user U5's role is removed while one of its
#     REPEATABLE READ transactions is open; after that COMMIT, authorize and the context say so.
U5=b0000000-0000-4000-8000-000000000005
new_user "$U5"
q -c "$(as_user $U5)" -c "SELECT keyhippo.authorize('manage_api_keys')" -c "BEGIN ISOLATION LEVEL REPEATABLE READ" \
  -c "SELECT 'snapshot'" -c "SELECT pg_sleep(2)" -c "SELECT keyhippo.authorize('manage_api_keys')" -c "COMMIT" \
  -c "SELECT keyhippo.authorize('manage_api_keys')" \
  -c "SELECT coalesce(nullif(array_to_string(permissions, ','), ''), 'none') FROM keyhippo.current_user_context()" >"$WORK/7c" 2>&1 &
sleep 0.8
q -c "DELETE FROM keyhippo_rbac.user_group_roles WHERE user_id = '$U5'" >/dev/null
wait "$!"
# (psql 15 and later also show as_user's set_config line, an f.)
check "permissions across a role removal: before, inside, after commit, context" "${SET_CONFIG_SHOWN}t snapshot t f none" \
    "$(lines "$WORK/7c" | sed 's/  */ /g')"
wait "$load_pid"
check "pgbench verify load meanwhile: no failed transactions" 0 \
    "$(failed_transactions "$WORK/load.log")"

# 8. Where no worker records uses, verify's fallback write runs when the verifying transaction
#    commits: it never holds the key row while the request runs, and never fails in REPEATABLE
#    READ. Database kh2 is a template: the workers never connect to one, so verify there uses
#    the fallback, as it does everywhere when keyhippo is not preloaded.
q -d postgres -c 'CREATE DATABASE kh2'
q -d kh2 -f tests/fixtures/supabase.sql -c 'CREATE EXTENSION keyhippo' >/dev/null 2>&1
q -d postgres -c 'ALTER DATABASE kh2 IS_TEMPLATE true'
q -d kh2 -c "INSERT INTO auth.users (id, email) VALUES ('$USER_A', 'a@example.com')"
new_key2() { q -d kh2 -c "$as_a" -c "SELECT api_key || ' ' || api_key_id FROM keyhippo.create_api_key('$1')" | tail -1; }
# 8a. A request verifies and runs on for 2 s; the owner revokes the key meanwhile without waiting.
read -r key id <<<"$(new_key2 "8a")"
q -d kh2 -c "BEGIN" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" -c "SELECT pg_sleep(2)" -c "COMMIT" \
  >/dev/null 2>&1 &
sleep 0.5
out=$(q -d kh2 -c "SET lock_timeout = '500ms'" -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$id')" 2>&1 | tail -1)
wait "$!"
check "revoke while a verifying transaction is open: not held up" t "$out"
# 8b. REPEATABLE READ: another session records a use of the key after the snapshot; verify
#     answers, and the commit succeeds (its own use, which would conflict, is dropped).
read -r key id <<<"$(new_key2 "8b")"
q -d kh2 -v VERBOSITY=verbose -c "BEGIN ISOLATION LEVEL REPEATABLE READ" -c "SELECT 'snapshot'" -c "SELECT pg_sleep(2)" \
  -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" -c "COMMIT" -c "SELECT 'committed'" >"$WORK/8b" 2>&1 &
sleep 0.8
q -d kh2 -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" >/dev/null
wait "$!"
check "REPEATABLE READ verify after a concurrent use: answers and commits" "snapshot 1 committed" "$(lines "$WORK/8b")"
check "... the other session's use recorded" t \
    "$(q -d kh2 -c "SELECT last_used_at IS NOT NULL FROM keyhippo.api_key_metadata WHERE id = '$id'")"
# 8c. The same after a concurrent revocation: the snapshot still shows the key; no error.
read -r key id <<<"$(new_key2 "8c")"
q -d kh2 -v VERBOSITY=verbose -c "BEGIN ISOLATION LEVEL REPEATABLE READ" -c "SELECT 'snapshot'" -c "SELECT pg_sleep(2)" \
  -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" -c "COMMIT" -c "SELECT 'committed'" >"$WORK/8c" 2>&1 &
sleep 0.8
q -d kh2 -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$id')" >/dev/null
wait "$!"
check "REPEATABLE READ verify after a concurrent revocation: answers and commits" "snapshot 1 committed" "$(lines "$WORK/8c")"

# 9. Impersonation belongs to the session that logged in: another session of the same role
#    logging in as someone else, and out again, changes nothing for the first.
U6=b0000000-0000-4000-8000-000000000006
new_user "$U6"
q -c "CALL keyhippo_impersonation.login_as_user('$USER_A')" -c "SELECT pg_sleep(1.2)" \
  -c "SELECT user_id FROM keyhippo.current_user_context()" -c "CALL keyhippo_impersonation.logout()" \
  -c "SELECT 'logged out'" >"$WORK/9a" 2>&1 &
sleep 0.3
q -c "CALL keyhippo_impersonation.login_as_user('$U6')" -c "SELECT user_id FROM keyhippo.current_user_context()" \
  -c "CALL keyhippo_impersonation.logout()" >"$WORK/9b" 2>&1
wait "$!"
check "second connection acts as its own user" "$U6" "$(lines "$WORK/9b")"
check "first connection still acts as its user, and logs out" "$USER_A logged out" "$(lines "$WORK/9a")"

# 10. Two rotations of one key at once: one winner. The first holds the key's row; the second
#     waits, then finds the key already rotated (55000), in READ COMMITTED and with a grace
#     period alike; in REPEATABLE READ the loser gets a serialization failure (40001).
rotate_race() { # grace isolation: prints the two outcomes, sorted
    read -r key id <<<"$(new_key "rotate race")"
    q -c "$as_a" -c "BEGIN ISOLATION LEVEL $2" \
      -c "SELECT 'rotated ' || (new_api_key_id IS NOT NULL) FROM keyhippo.rotate_api_key('$id', '$1')" \
      -c "SELECT pg_sleep(1.2)" -c "COMMIT" >"$WORK/rot.1" 2>&1 &
    sleep 0.4
    q -v VERBOSITY=verbose -c "$as_a" -c "BEGIN ISOLATION LEVEL $2" \
      -c "SELECT 'rotated ' || (new_api_key_id IS NOT NULL) FROM keyhippo.rotate_api_key('$id', '$1')" \
      -c "COMMIT" >"$WORK/rot.2" 2>&1
    wait "$!"
    for f in "$WORK/rot.1" "$WORK/rot.2"; do
        grep -oE 'rotated t|ERROR: +[0-9A-Z]{5}' "$f" | head -1 | tr -s ' '
    done | sort | tr '\n' ' ' | sed 's/ $//'
    echo " $(q -c "SELECT count(*) FROM keyhippo.api_key_metadata WHERE description = 'rotate race' AND revoked_reason IS NULL")"
}
check "concurrent rotations, READ COMMITTED: one winner, one 55000, one new key" "ERROR: 55000 rotated t 1" \
    "$(rotate_race 0 'READ COMMITTED')"
q -c "DELETE FROM keyhippo.api_key_metadata WHERE description = 'rotate race'"
check "concurrent rotations with a grace period: one winner, one 55000, one new key" "ERROR: 55000 rotated t 1" \
    "$(rotate_race '1 hour' 'READ COMMITTED')"
q -c "DELETE FROM keyhippo.api_key_metadata WHERE description = 'rotate race'"
check "concurrent rotations, REPEATABLE READ: one winner, one 40001, one new key" "ERROR: 40001 rotated t 1" \
    "$(rotate_race '1 hour' 'REPEATABLE READ')"

# 11. A key disabled in one backend is refused by the very next verify of another backend that
#     had verified (and cached) it; enabled again, it verifies again.
read -r key id <<<"$(new_key disable)"
q -c "SELECT status FROM keyhippo.verify_api_key_status('$key')" -c "SELECT pg_sleep(1.5)" \
  -c "SELECT status FROM keyhippo.verify_api_key_status('$key')" -c "SELECT pg_sleep(1.5)" \
  -c "SELECT status FROM keyhippo.verify_api_key_status('$key')" >"$WORK/11" &
sleep 0.5
q -c "$as_a" -c "SELECT keyhippo.disable_api_key('$id')" >/dev/null
sleep 1.5
q -c "$as_a" -c "SELECT keyhippo.enable_api_key('$id')" >/dev/null
wait "$!"
check "verify in another backend: before disable, after disable, after enable" "VALID DISABLED VALID" "$(lines "$WORK/11")"

# 12. A leaked-key report: the owner's listener hears of it at commit, by key id only.
read -r key id <<<"$(new_key leaked)"
q -c "LISTEN keyhippo_key_leaked" -c "SELECT pg_sleep(1.5)" -c "SELECT 'marker: after report'" >"$WORK/listener12" 2>&1 &
sleep 0.3
q -c "SET ROLE anon" -c "SELECT keyhippo.report_leaked_keys(ARRAY['$key', 'junk'])" >/dev/null
wait "$!"
check "LISTEN: leaked-key notification received" yes \
    "$(grep -q 'Asynchronous notification "keyhippo_key_leaked"' "$WORK/listener12" && echo yes || echo no)"
check "LISTEN: leaked-key payload is the event and the key id only" "{\"id\": \"$id\", \"event\": \"leaked_key\"}" \
    "$(grep -o 'payload "{[^}]*}"' "$WORK/listener12" | head -1 | sed -E 's/^payload "(.*)"$/\1/')"
check "reported key revoked as leaked" "true|leaked|0" \
    "$(q -c "SELECT m.is_revoked || '|' || m.revoked_reason || '|' || (SELECT count(*) FROM keyhippo.api_key_secrets s WHERE s.key_metadata_id = m.id) FROM keyhippo.api_key_metadata m WHERE m.id = '$id'")"

echo "concurrency: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
