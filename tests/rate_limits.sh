#!/usr/bin/env bash
# Rate limits and credits under real parallel connections (pgbench) on a preloaded server, and a
# server that does not preload keyhippo:
#   - four connections hammer one key limited to N per hour: exactly N requests are admitted;
#   - two keys of one owner, two connections each, under an owner limit of M: exactly M;
#   - the same through check_request() in READ ONLY transactions (PostgREST's GET requests);
#   - credits spent by four connections: paid + left = granted, refused requests refunded;
#     spent credits survive a clean restart, a crash loses at most what was not yet written;
#   - with shared memory full of counters, limited keys are refused, not admitted uncounted;
#   - without preloading, a limited key is refused with 55000 and an unlimited one is admitted.
# Needs the extension installed into the private build (bin/install). Ends with
# "rate_limits: N passed, N failed".
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PORT=${RATE_LIMITS_PORT:-55452}
WORK="$ROOT/target/rate-limits-test"
. bin/env.sh
EXTRA_CONF="shared_preload_libraries = 'keyhippo'" bin/cluster start rate_limits "$PORT" || exit 1
trap 'bin/cluster stop rate_limits; bin/cluster stop rate_limits_plain' EXIT
PORT=$(bin/cluster port rate_limits)
rm -rf "$WORK"; mkdir -p "$WORK"
export PGPORT=$PORT
. tests/lib.sh
setup_kh
q -c "INSERT INTO auth.users (id, email) VALUES ('$USER_B', 'b@example.com')"
q -c "CREATE TABLE public.admitted (key text, at timestamptz DEFAULT clock_timestamp())" \
  -c "GRANT INSERT, SELECT ON public.admitted TO anon"

# Windows are aligned to the clock hour: start well inside one, so that the whole run falls
# into a single window.
left=$(q -c "SELECT (3600 - extract(epoch FROM clock_timestamp())::numeric % 3600)::int")
[ "$left" -gt 60 ] || sleep $((left + 1))

N=700
read -r key_a id_a <<<"$(new_key 'hammered')"
q -c "SET ROLE service_role" -c "SELECT keyhippo.set_rate_limit('$id_a', $N, '1 hour')" >/dev/null
cat >"$WORK/status.sql" <<SQL
SET ROLE anon;
INSERT INTO public.admitted (key) SELECT 'a' FROM keyhippo.verify_api_key_status('$key_a') WHERE status = 'VALID';
RESET ROLE;
SQL
"$PGBIN/pgbench" -n -M prepared -c 4 -j 2 -t 400 -f "$WORK/status.sql" kh >"$WORK/a.log" 2>&1
check "four connections, 1,600 requests on a key limited to $N an hour: pgbench ran them all" \
    "0 1600" "$(failed_transactions "$WORK/a.log") $(grep -E '^number of transactions actually processed' "$WORK/a.log" | sed -E 's/.*: ([0-9]+).*/\1/')"
check "... exactly $N admitted" "$N" "$(q -c "SELECT count(*) FROM public.admitted WHERE key = 'a'")"
check "... and the next request is refused" RATE_LIMITED \
    "$(q -c "SELECT status FROM keyhippo.verify_api_key_status('$key_a')")"

# One owner, two keys, two connections each: the owner's limit is shared.
M=300
read -r key_b1 _ <<<"$(q -c "$as_b" -c "SELECT api_key || ' ' || api_key_id FROM keyhippo.create_api_key('B one')" | tail -1)"
read -r key_b2 _ <<<"$(q -c "$as_b" -c "SELECT api_key || ' ' || api_key_id FROM keyhippo.create_api_key('B two')" | tail -1)"
q -c "SET ROLE service_role" -c "SELECT keyhippo.set_owner_rate_limit('$USER_B', $M, '1 hour')" >/dev/null
for k in b1 b2; do
    key=key_$k
    cat >"$WORK/status_$k.sql" <<SQL
SET ROLE anon;
INSERT INTO public.admitted (key) SELECT '$k' FROM keyhippo.verify_api_key_status('${!key}') WHERE status = 'VALID';
RESET ROLE;
SQL
done
"$PGBIN/pgbench" -n -M prepared -c 2 -j 1 -t 300 -f "$WORK/status_b1.sql" kh >"$WORK/b1.log" 2>&1 &
b1=$!
"$PGBIN/pgbench" -n -M prepared -c 2 -j 1 -t 300 -f "$WORK/status_b2.sql" kh >"$WORK/b2.log" 2>&1
wait "$b1"
check "two keys of one owner, four connections, 1,200 requests under an owner limit of $M: exactly $M admitted" \
    "$M" "$(q -c "SELECT count(*) FROM public.admitted WHERE key IN ('b1', 'b2')")"
check "... by both keys" 2 "$(q -c "SELECT count(DISTINCT key) FROM public.admitted WHERE key IN ('b1', 'b2')")"

# PostgREST's hook in READ ONLY transactions (GET requests), four connections.
R=200
read -r key_r id_r <<<"$(new_key 'through PostgREST')"
q -c "SET ROLE service_role" -c "SELECT keyhippo.set_rate_limit('$id_r', $R, '1 hour')" >/dev/null
q -c "CREATE FUNCTION public.get_request(p_key text) RETURNS int LANGUAGE plpgsql AS \$\$
BEGIN
    PERFORM set_config('request.headers', json_build_object('x-api-key', p_key)::text, true);
    PERFORM keyhippo.check_request();
    RETURN 200;
EXCEPTION WHEN sqlstate 'PGRST' THEN
    RETURN (SQLERRM::jsonb ->> 'code' = 'KH429')::int * 429;
END \$\$" -c "CREATE TABLE public.responses (status int)" -c "GRANT INSERT ON public.responses TO anon"
cat >"$WORK/get.sql" <<SQL
BEGIN READ ONLY;
SET LOCAL ROLE anon;
SELECT public.get_request('$key_r') AS status \gset
COMMIT;
INSERT INTO public.responses VALUES (:status);
SQL
"$PGBIN/pgbench" -n -c 4 -j 2 -t 100 -f "$WORK/get.sql" kh >"$WORK/r.log" 2>&1
check "check_request() in READ ONLY transactions, 400 requests limited to $R: $R answered 200, the rest 429" \
    "200=$R 429=$((400 - R))" \
    "$(q -c "SELECT string_agg(status || '=' || n, ' ' ORDER BY status) FROM (SELECT status, count(*) n FROM public.responses GROUP BY status) s")"

# A JWT API key that PostgREST accepted by its signature counts through check_request() too.
q -c "ALTER DATABASE kh SET keyhippo.jwt_secret = 'a-test-secret-that-is-long-enough-32'"
read -r token id_j <<<"$(q -c "$as_a" -c "SELECT api_key || ' ' || api_key_id FROM keyhippo.create_jwt_api_key('jwt limited')" | tail -1)"
q -c "SET ROLE service_role" -c "SELECT keyhippo.set_rate_limit('$id_j', 2, '1 hour')" >/dev/null
claims=$(q -c "SELECT convert_from(decode(rpad(translate(split_part('$token', '.', 2), '-_', '+/'), (ceil(length(split_part('$token', '.', 2)) / 4.0) * 4)::int, '='), 'base64'), 'UTF8')")
q -c "CREATE FUNCTION public.jwt_request(p_claims text) RETURNS int LANGUAGE plpgsql AS \$\$
BEGIN
    PERFORM set_config('request.jwt.claims', p_claims, true);
    PERFORM set_config('request.headers', '{}', true);
    PERFORM keyhippo.check_request();
    RETURN 200;
EXCEPTION WHEN sqlstate 'PGRST' THEN
    RETURN (SQLERRM::jsonb ->> 'code' = 'KH429')::int * 429;
END \$\$"
answers=""
for i in 1 2 3; do
    answers="$answers $(q -c "BEGIN READ ONLY" -c "SET LOCAL ROLE authenticated" -c "SELECT public.jwt_request('$claims')" -c "COMMIT")"
done
check "a JWT API key limited to 2 an hour, three requests through check_request()" "200 200 429" "$(echo $answers)"

# Credits under four connections: each request costs 2 (its admission and spend_credits(1)); a
# request that cannot pay rolls back, which gives back its admission. No credit is spent twice
# or lost: what was paid plus what is left is what was granted.
read -r key_c id_c <<<"$(new_key 'paid requests')"
q -c "SET ROLE service_role" -c "SELECT keyhippo.set_credits('$id_c', 500)" >/dev/null
q -c "CREATE TABLE public.paid (cost int)" -c "GRANT INSERT ON public.paid TO anon" \
  -c "CREATE FUNCTION public.charge(p_key text) RETURNS boolean LANGUAGE plpgsql AS \$\$
BEGIN
    IF (SELECT status FROM keyhippo.verify_api_key_status(p_key)) <> 'VALID' THEN
        RETURN false;
    END IF;
    PERFORM keyhippo.spend_credits(1);
    RETURN true;
EXCEPTION WHEN sqlstate 'PGRST' THEN
    RETURN false;
END \$\$"
cat >"$WORK/paid.sql" <<SQL
BEGIN;
SET LOCAL ROLE anon;
SELECT public.charge('$key_c') AS ok \gset
\if :ok
INSERT INTO public.paid VALUES (2);
COMMIT;
\else
ROLLBACK;
\endif
SQL
"$PGBIN/pgbench" -n -c 4 -j 2 -t 100 -f "$WORK/paid.sql" kh >"$WORK/paid.log" 2>&1
q -c "SELECT keyhippo.flush_key_usage()" >/dev/null
paid=$(q -c "SELECT coalesce(sum(cost), 0) FROM public.paid")
left=$(q -c "SELECT remaining FROM keyhippo.api_key_credits WHERE api_key_id = '$id_c'")
check "credits: 400 requests at 2 credits on 500, four connections: paid + left = granted" "500 yes" \
    "$((paid + left)) $([ "$paid" -gt 0 ] && [ "$paid" -le 500 ] && echo yes || echo "no: paid $paid")"
# What a new request finds available is what the table says is left: nothing is still held by
# the requests that rolled back.
if [ "$left" -eq 0 ]; then expected=USAGE_EXCEEDED; else expected="VALID $((left - 1))"; fi
check "... every refused request gave its admission back: $left left, all available" "$expected" \
    "$(q -c "BEGIN" -c "SELECT status FROM keyhippo.verify_api_key_status('$key_c')" -c "SELECT keyhippo.spend_credits(0) WHERE $left > 0" -c "ROLLBACK" 2>/dev/null | tr '\n' ' ' | sed 's/ *$//')"

# Spent credits survive a clean restart, written or not.
read -r key_s id_s <<<"$(new_key 'restart')"
q -c "SET ROLE service_role" -c "SELECT keyhippo.set_credits('$id_s', 100)" >/dev/null
for i in 1 2 3; do q -c "SELECT status FROM keyhippo.verify_api_key_status('$key_s')" >/dev/null; done
before=$(q -c "BEGIN" -c "SELECT status FROM keyhippo.verify_api_key_status('$key_s')" -c "SELECT keyhippo.spend_credits(0)" -c "ROLLBACK" | tail -1)
bin/cluster restart rate_limits >/dev/null || exit 1
after=$(q -c "BEGIN" -c "SELECT status FROM keyhippo.verify_api_key_status('$key_s')" -c "SELECT keyhippo.spend_credits(0)" -c "ROLLBACK" | tail -1)
check "credits: 3 spent of 100, then a clean restart: 97 left (96 once the reading request holds one)" "96 96" "$before $after"

# A crash (a backend killed: the server reinitialises shared memory) loses at most the spending
# since the last write, in the customer's favour: what is left afterwards is between what was
# left before and what was last written.
read -r key_k id_k <<<"$(new_key 'crash')"
q -c "SET ROLE service_role" -c "SELECT keyhippo.set_credits('$id_k', 100)" >/dev/null
for i in 1 2; do q -c "SELECT status FROM keyhippo.verify_api_key_status('$key_k')" >/dev/null; done
q -c "SELECT keyhippo.flush_key_usage()" >/dev/null
for i in 1 2 3; do q -c "SELECT status FROM keyhippo.verify_api_key_status('$key_k')" >/dev/null; done
q -c "SELECT pg_sleep(60)" >/dev/null 2>&1 &
sleeper=$!
victim=""
for i in $(seq 1 50); do
    victim=$(q -c "SELECT pid FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(60)' AND pid <> pg_backend_pid()")
    [ -n "$victim" ] && break
    sleep 0.1
done
kill -9 "$victim"
wait "$sleeper" 2>/dev/null
for i in $(seq 1 100); do q -c "SELECT 1" >/dev/null 2>&1 && break; sleep 0.2; done
after_crash=$(q -c "BEGIN" -c "SELECT status FROM keyhippo.verify_api_key_status('$key_k')" -c "SELECT keyhippo.spend_credits(0) + 1" -c "ROLLBACK" | tail -1)
check "credits: 2 written, 3 more spent, then a crash: between 95 and 98 left, never fewer" yes \
    "$([ "$after_crash" -ge 95 ] && [ "$after_crash" -le 98 ] && echo yes || echo "no: $after_crash")"
check "... and the server did go through crash recovery" yes \
    "$(grep -q 'terminated by signal 9' "$ROOT/target/clusters/rate_limits/server.log" && echo yes || echo no)"

# When shared memory has no room for another counter, a limited key is refused, never admitted
# uncounted: a server with the fewest counters (1,024), 1,100 limited keys in one request each.
q -c "ALTER SYSTEM SET keyhippo.rate_limit_counters = 1024" >/dev/null
bin/cluster restart rate_limits >/dev/null || exit 1
q -c "$as_a" -c "CREATE TEMP TABLE many AS SELECT (keyhippo.create_api_key('many ' || g)).* FROM generate_series(1, 1100) g" \
  -c "RESET ROLE" \
  -c "INSERT INTO keyhippo.api_key_rate_limits (api_key_id, max_requests, per) SELECT api_key_id, 1000, '1 hour' FROM many" \
  -c "CREATE TABLE public.many_keys AS SELECT api_key FROM many" >/dev/null
outcomes=$(q -c "SELECT string_agg(status || '=' || n, ' ' ORDER BY status) FROM (SELECT s.status, count(*) n FROM public.many_keys k, LATERAL keyhippo.verify_api_key_status(k.api_key) s GROUP BY s.status) x")
admitted=$(echo "$outcomes" | grep -oE 'VALID=[0-9]+' | cut -d= -f2)
check "counters full: at most 1,024 of 1,100 limited keys admitted, the rest RATE_LIMITED ($outcomes)" yes \
    "$([ "${admitted:-0}" -gt 0 ] && [ "${admitted:-0}" -le 1024 ] && echo "$outcomes" | grep -q 'RATE_LIMITED=' && echo yes || echo no)"
check "... the refusal names the full table" "the server's rate-limit and credit tables are full" \
    "$(q -c "BEGIN" -c "SELECT count(*) FROM public.many_keys k, LATERAL keyhippo.verify_api_key_status(k.api_key) s" -c "SELECT keyhippo_internal.rate_limit_refusal() ->> 'details'" -c "ROLLBACK" | tail -1)"
q -c "ALTER SYSTEM RESET keyhippo.rate_limit_counters" >/dev/null

# Without preloading: no shared memory to count in.
bin/cluster start rate_limits_plain $((PORT + 1)) >/dev/null || exit 1
PLAIN=$(bin/cluster port rate_limits_plain)
PGPORT=$PLAIN setup_kh
read -r key_p id_p <<<"$(PGPORT=$PLAIN new_key 'limited not preloaded')"
read -r key_u _ <<<"$(PGPORT=$PLAIN new_key 'unlimited not preloaded')"
PGPORT=$PLAIN q -c "SET ROLE service_role" -c "SELECT keyhippo.set_rate_limit('$id_p', 10, '1 hour')" >/dev/null
out=$(PGPORT=$PLAIN q -v VERBOSITY=verbose -c "SELECT status FROM keyhippo.verify_api_key_status('$key_p')" 2>&1)
check "not preloaded: a limited key is refused with 55000, saying why" "55000 shared_preload_libraries" \
    "$(echo "$out" | grep -oE '^ERROR:  [0-9A-Z]{5}' | awk '{print $2}') $(echo "$out" | grep -oE 'shared_preload_libraries' | head -1)"
check "not preloaded: an unlimited key is admitted, and verify_api_key accepts the limited one" "VALID 1" \
    "$(PGPORT=$PLAIN q -c "SELECT (SELECT status FROM keyhippo.verify_api_key_status('$key_u')) || ' ' || (SELECT count(*) FROM keyhippo.verify_api_key('$key_p'))")"

echo "rate_limits: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
