#!/usr/bin/env bash
# last_used_at without a write on the verify path: the background workers (keyhippo preloaded)
# in every database, what a clean shutdown keeps, the synchronous fallback (not preloaded),
# READ ONLY transactions and a hot standby. Needs the extension installed into the private
# build. Ends with "last_used: N passed, N failed".
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. bin/env.sh
PORT=${LAST_USED_PORT:-55441}
STANDBY="$ROOT/target/clusters/last_used/standby"  # inside the primary's directory: owned by postgres
EXTRA_CONF="shared_preload_libraries = 'keyhippo'
keyhippo.last_used_flush_interval = 1
keyhippo.verified_key_cache = on" bin/cluster start last_used "$PORT" || exit 1
cleanup() {
    [ -f "$STANDBY/postmaster.pid" ] && runuser -u postgres -- "$PGBIN/pg_ctl" -D "$STANDBY" -m immediate stop >/dev/null 2>&1
    rm -rf "$STANDBY"
    cp "$ROOT/target/clusters/last_used/server.log" "$ROOT/target/last_used-server.log" 2>/dev/null
    bin/cluster stop last_used
}
trap cleanup EXIT

PORT=$(bin/cluster port last_used)  # the next free one when something else listens on 55441
export PGPORT=$PORT
. tests/lib.sh
setup_kh
last_used() { q -c "SELECT coalesce(last_used_at::text, 'null') FROM keyhippo.api_key_metadata WHERE id = '$1'"; }
# Waits up to $2 seconds for last_used_at of key $1 to be set; prints the seconds it took or "never".
wait_used() {
    for i in $(seq 1 $(($2 * 10))); do
        [ "$(last_used "$1")" != null ] && { echo "$((i / 10))"; return; }
        sleep 0.1
    done
    echo never
}

# 1. Preloaded: verify writes nothing itself, even read-only; a writer started for the database
#    writes within seconds. The launcher runs from server start, connected to no database.
launcher_up() { q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'keyhippo launcher' AND datname IS NULL"; }
for i in $(seq 1 100); do [ "$(launcher_up)" = 1 ] && break; sleep 0.2; done
check "launcher is running, connected to no database" 1 "$(launcher_up)"
read -r key id <<<"$(new_key worker)"
check "verify in a READ ONLY transaction" 1 \
    "$(q -c "BEGIN READ ONLY" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" -c "COMMIT" | grep -v '^$' | head -1)"
check "no synchronous write by verify (no transaction id taken)" none \
    "$(q -c "BEGIN" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" -c "SELECT coalesce(pg_current_xact_id_if_assigned()::text, 'none')" -c "COMMIT" | grep -v '^$' | tail -1)"
took=$(wait_used "$id" 5)
check "worker sets last_used_at within the flush interval (1 s) plus slack" yes \
    "$([ "$took" != never ] && [ "$took" -le 3 ] && echo yes || echo "no ($took)")"
# The worker reports its updates to the statistics system (else autovacuum never sees the dead
# row versions), and they are HOT updates (fillfactor leaves room on the page, no index changes).
sleep 1.5
check "worker's updates reach pg_stat_user_tables, as HOT updates" "t t" \
    "$(q -c "SELECT n_tup_upd > 0, n_tup_hot_upd > 0 FROM pg_stat_user_tables WHERE relid = 'keyhippo.api_key_metadata'::regclass" | tr '|' ' ')"

# 1b. The verified-key cache (preloaded servers) never admits a revoked key: a backend that has
#     verified (and cached) a key refuses it on its very next verify after another backend
#     commits the revocation; RBAC changes and expiry changes are seen at once too.
read -r key5 id5 <<<"$(new_key cached)"
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key5')" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key5')" \
  -c "SELECT array_to_string(permissions, ',') FROM keyhippo.verify_api_key('$key5')" \
  -c "SELECT pg_sleep(1.5)" \
  -c "SELECT array_to_string(permissions, ',') FROM keyhippo.verify_api_key('$key5')" \
  -c "SELECT pg_sleep(1.5)" \
  -c "SELECT count(*) FROM keyhippo.verify_api_key('$key5')" >"$ROOT/target/clusters/last_used/cached.out" 2>&1 &
sleep 0.7
q -c "INSERT INTO keyhippo_rbac.user_group_roles (user_id, group_id, role_id) SELECT '$USER_A', r.group_id, r.id FROM keyhippo_rbac.roles r WHERE r.name = 'Admin'"
sleep 1.5
q -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$id5')" >/dev/null
wait
check "cached verify: permission change and revocation seen by the next verify" \
    "1 1 manage_api_keys manage_api_keys,manage_groups,manage_permissions,manage_roles,manage_scopes,manage_user_attributes 0" \
    "$(grep -v '^$' "$ROOT/target/clusters/last_used/cached.out" | tr '\n' ' ' | sed 's/ $//')"
read -r key6 id6 <<<"$(new_key expiry)"
check "cached verify: expiry moved into the past is seen at once" "1 0" \
    "$(q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key6')" \
         -c "SELECT count(*) FROM keyhippo.verify_api_key('$key6')" >/dev/null;
       q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key6')" \
         -c "UPDATE keyhippo.api_key_metadata SET expires_at = now() - interval '1 second' WHERE id = '$id6'" \
         -c "SELECT count(*) FROM keyhippo.verify_api_key('$key6')" | grep -v '^$' | tr '\n' ' ' | sed 's/ $//')"

# 1c. keyhippo.verified_key_cache: off by default (this cluster turns it on to test the cache
#     above), superuser-only; verify works with it off.
check "verified-key cache setting: off by default, on in this cluster" "off on" \
    "$(q -c "SELECT boot_val || ' ' || setting FROM pg_settings WHERE name = 'keyhippo.verified_key_cache'")"
check "verified-key cache setting: client roles may not change it" 42501 \
    "$(q -v ON_ERROR_STOP=0 -c "SET ROLE authenticated" -c "SET keyhippo.verified_key_cache = off" -c '\echo :LAST_ERROR_SQLSTATE' 2>/dev/null | tail -1)"
read -r key7 id7 <<<"$(new_key uncached)"
check "verify with the cache off" "1 1" \
    "$(q -c "SET keyhippo.verified_key_cache = off" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key7')" \
         -c "SELECT count(*) FROM keyhippo.verify_api_key('$key7')" | grep -v '^$' | tr '\n' ' ' | sed 's/ $//')"

# 1f. With the verified-key cache (on in this cluster), a cached verify records the key's use
#     once per keyhippo.last_used_interval, like the uncached one. One session: the first verify reads the row (and caches the
#     key), the second, 2.5 s later, is answered by the cache; each prints its transaction's
#     time, which is the use it records.
read -r key9 _ <<<"$(new_key "cached use")"
used9() { q -c "SELECT coalesce(last_used_at::text, 'null') FROM keyhippo.api_key_metadata WHERE description = 'cached use'"; }
sleep 1.5
times9=$(q -c "SET keyhippo.last_used_interval = 1" \
  -c "SELECT now()::text FROM keyhippo.verify_api_key('$key9')" \
  -c "SELECT pg_sleep(2.5)" \
  -c "SELECT now()::text FROM keyhippo.verify_api_key('$key9')" | grep -v '^$')
second9=$(echo "$times9" | tail -1)
for _ in $(seq 1 50); do [ "$(used9)" = "$second9" ] && break; sleep 0.1; done
check "cached verify records its use once the interval has passed" "$second9" "$(used9)"

# 1g. A use the worker writes while another transaction is updating the same key row: the
#     worker waits for it, and after its commit writes the use onto the row's new version (the
#     other transaction's change kept, the use not lost).
read -r key10 id10 <<<"$(new_key "held row")"
q -c "BEGIN" -c "UPDATE keyhippo.api_key_metadata SET description = 'changed meanwhile' WHERE id = '$id10'" \
  -c "SELECT pg_sleep(3)" -c "COMMIT" >/dev/null &
sleep 0.5
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key10')" >/dev/null
sleep 1.5
check "use not written while the row is being updated" null "$(last_used "$id10")"
wait
took=$(wait_used "$id10" 5)
check "use written after the other transaction's commit, its change kept" "yes changed meanwhile" \
    "$([ "$took" != never ] && echo yes || echo no) $(q -c "SELECT description FROM keyhippo.api_key_metadata WHERE id = '$id10'")"

# 1h. Under load the writer does not wait for its interval (an hour here): every 2,048th use
#     recorded wakes it (or the launcher, which starts one).
q -c "ALTER SYSTEM SET keyhippo.last_used_flush_interval = 3600" -c "SELECT pg_reload_conf()" >/dev/null
q -c "CREATE TABLE wake_keys (i int PRIMARY KEY, key text NOT NULL, id uuid NOT NULL)" \
  -c "GRANT ALL ON wake_keys TO authenticated"
q -c "$as_a" -c "INSERT INTO wake_keys SELECT i, k.api_key, k.api_key_id FROM generate_series(1, 2048) i, keyhippo.create_api_key('wake ' || i) k"
q -c "SELECT keyhippo.flush_key_usage()" >/dev/null
sleep 2
verify_wake() { q -c "SELECT count(*) FROM wake_keys w, keyhippo.verify_api_key(w.key) v WHERE w.i BETWEEN $1 AND $2" >/dev/null; }
written_wake() { q -c "SELECT count(*) FROM wake_keys w JOIN keyhippo.api_key_metadata m ON m.id = w.id WHERE m.last_used_at IS NOT NULL"; }
# Waits up to 10 s for $1 of the keys' uses to be written; prints how many were.
wait_wake() {
    local n=0
    for _ in $(seq 1 100); do n=$(written_wake); [ "$n" = "$1" ] && break; sleep 0.1; done
    echo "$n"
}
verify_wake 1 2047
sleep 2
check "2,047 uses buffered: not written yet (the writer waits)" 0 "$(written_wake)"
verify_wake 2048 2048
check "the 2,048th use wakes the writer: all written" 2048 "$(wait_wake 2048)"
q -c "DROP TABLE wake_keys" -c "ALTER SYSTEM RESET keyhippo.last_used_flush_interval" -c "SELECT pg_reload_conf()" >/dev/null

# 1i. Every database where keyhippo is installed is served with no configuration, one created
#     after the server started too; keyhippo.worker_status shows it.
other_key() { q -d "$1" -c "$as_a" -c "SELECT api_key || ' ' || api_key_id FROM keyhippo.create_api_key('$2')" | tail -1; }
used_in() { q -d "$1" -c "SELECT last_used_at IS NOT NULL FROM keyhippo.api_key_metadata WHERE id = '$2'"; }
q -d postgres -c 'CREATE DATABASE kh_other'
q -d kh_other -f tests/fixtures/supabase.sql -c 'CREATE EXTENSION keyhippo' >/dev/null
q -d kh_other -c "INSERT INTO auth.users (id, email) VALUES ('$USER_A', 'a@example.com')"
read -r keyo ido <<<"$(other_key kh_other other)"
q -d kh_other -c "SELECT count(*) FROM keyhippo.verify_api_key('$keyo')" >/dev/null
for i in $(seq 1 50); do [ "$(used_in kh_other "$ido")" = t ] && break; sleep 0.1; done
check "a database created after start: its uses written" t "$(used_in kh_other "$ido")"
check "worker_status there: served, nothing waiting, uses written, no error" "t|0|t|t" \
    "$(q -d kh_other -c "SELECT served, pending_uses, uses_written > 0, last_error IS NULL FROM keyhippo.worker_status WHERE database = 'kh_other'")"
check "worker_status: service_role may read it, authenticated may not" "t 42501" \
    "$(q -d kh_other -c "SET ROLE service_role" -c "SELECT count(*) > 0 FROM keyhippo.worker_status" | tail -1) $(q -d kh_other -v ON_ERROR_STOP=0 -c "SET ROLE authenticated" -c "SELECT 1 FROM keyhippo.worker_status" -c '\echo :LAST_ERROR_SQLSTATE' 2>/dev/null | tail -1)"

# 1j. A write that fails is logged with its reason, shown in worker_status, and its uses kept
#     for the next try. (A trigger that fires for the writer's replication role refuses it.)
q -d kh_other -c "CREATE FUNCTION refuse_use() RETURNS trigger LANGUAGE plpgsql AS \$\$ BEGIN RAISE EXCEPTION 'use refused by a test trigger'; END \$\$" \
  -c "CREATE TRIGGER refuse_use BEFORE UPDATE OF last_used_at ON keyhippo.api_key_metadata FOR EACH ROW EXECUTE FUNCTION refuse_use()" \
  -c "ALTER TABLE keyhippo.api_key_metadata ENABLE ALWAYS TRIGGER refuse_use"
read -r keyf idf <<<"$(other_key kh_other failing)"
q -d kh_other -c "SELECT count(*) FROM keyhippo.verify_api_key('$keyf')" >/dev/null
status_error() { q -d kh_other -c "SELECT coalesce(last_error, '') FROM keyhippo.worker_status WHERE database = 'kh_other'"; }
for i in $(seq 1 50); do [ -n "$(status_error)" ] && break; sleep 0.1; done
check "failed write: its error in worker_status" yes "$(status_error | grep -q 'use refused by a test trigger' && echo yes || echo "no: $(status_error)")"
check "failed write: logged with its reason" yes \
    "$(grep -qE 'writing 1 key uses and [0-9]+ verification counts failed, kept for the next try: use refused by a test trigger' "$ROOT/target/clusters/last_used/server.log" && echo yes || echo no)"
check "failed write: not written, the use kept" "f 1" \
    "$(used_in kh_other "$idf") $(q -d kh_other -c "SELECT pending_uses FROM keyhippo.worker_status WHERE database = 'kh_other'")"
q -d kh_other -c "DROP TRIGGER refuse_use ON keyhippo.api_key_metadata"
for i in $(seq 1 60); do [ "$(used_in kh_other "$idf")" = t ] && break; sleep 0.1; done
check "... and written at the next try" "t" "$(used_in kh_other "$idf")"

# 1k. Statements that need a database to themselves (no other session connected) are never
#     held up or failed by its writer: writers stay connected for an hour here, and each
#     statement below runs while one is.
q -c "ALTER SYSTEM SET keyhippo.last_used_flush_interval = 3600" -c "SELECT pg_reload_conf()" >/dev/null
sleep 1
writer_in() { q -d postgres -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'keyhippo writer' AND datname = '$1'"; }
# A use in database $1, and a writer connected to it (up to 5 s).
use_in() {
    local k i
    read -r k _ <<<"$(other_key "$1" "use in $1")"
    q -d "$1" -c "SELECT count(*) FROM keyhippo.verify_api_key('$k')" >/dev/null
    for i in $(seq 1 50); do [ "$(writer_in "$1")" = 1 ] && break; sleep 0.1; done
}
# Runs statement $1 in database postgres; prints "ok" or its error, and whether it took < 4 s
# (PostgreSQL waits up to 5 s for other sessions to leave before failing such a statement).
timed() {
    local start out ms
    start=$(date +%s%N)
    out=$(q -d postgres -c "$1" 2>&1 | tail -1)
    ms=$(( ($(date +%s%N) - start) / 1000000 ))
    echo "${out:-ok} $([ "$ms" -lt 4000 ] && echo fast || echo "slow ($ms ms)")"
}
mkdir -p "$ROOT/target/clusters/last_used/ts" && chown postgres: "$ROOT/target/clusters/last_used/ts"
q -d postgres -c "CREATE TABLESPACE kh_ts LOCATION '$ROOT/target/clusters/last_used/ts'"
use_in kh_other
check "a writer is connected to kh_other" 1 "$(writer_in kh_other)"
check "ALTER DATABASE ... RENAME with a writer connected" "ok fast" "$(timed 'ALTER DATABASE kh_other RENAME TO kh_renamed')"
use_in kh_renamed
check "... the renamed database is served again" 1 "$(writer_in kh_renamed)"
check "ALTER DATABASE ... SET TABLESPACE with a writer connected" "ok fast" "$(timed 'ALTER DATABASE kh_renamed SET TABLESPACE kh_ts')"
use_in kh_renamed
check "CREATE DATABASE ... TEMPLATE with a writer connected" "ok fast" "$(timed 'CREATE DATABASE kh_copy TEMPLATE kh_renamed')"
use_in kh_renamed
check "DROP DATABASE with a writer connected" "ok fast" "$(timed 'DROP DATABASE kh_renamed')"
check "... no writer left, and worker_status no longer lists it" "0 0" \
    "$(writer_in kh_renamed) $(q -c "SELECT count(*) FROM keyhippo.worker_status WHERE database = 'kh_renamed'")"
# DROP EXTENSION: the database's uses are no longer written, and nothing fails.
read -r keyc idc <<<"$(other_key kh_copy copied)"
q -d kh_copy -c "BEGIN" -c "SELECT count(*) FROM keyhippo.verify_api_key('$keyc')" -c "DROP EXTENSION keyhippo CASCADE" -c "COMMIT" >/dev/null 2>&1
# Back to a 1 s interval for a moment (the reload wakes the writers): a writer there finds
# keyhippo gone and drops the database's waiting use.
q -c "ALTER SYSTEM RESET keyhippo.last_used_flush_interval" -c "SELECT pg_reload_conf()" >/dev/null
# (A write that ran into the DROP failed: it is tried again within 10 s, and then dropped.)
for i in $(seq 1 150); do
    [ "$(q -c "SELECT coalesce(sum(pending_uses), 0) FROM keyhippo.worker_status WHERE database = 'kh_copy'")" = 0 ] && break
    sleep 0.1
done
check "DROP EXTENSION: nothing left waiting there, no error" "0 0" \
    "$(q -d kh_copy -c "SELECT count(*) FROM pg_extension WHERE extname = 'keyhippo'") $(q -c "SELECT coalesce(sum(pending_uses), 0) FROM keyhippo.worker_status WHERE database = 'kh_copy'")"
check "DROP DATABASE after DROP EXTENSION" "ok fast" "$(timed 'DROP DATABASE kh_copy')"
q -c "ALTER SYSTEM SET keyhippo.last_used_flush_interval = 3600" -c "SELECT pg_reload_conf()" >/dev/null
# A template database is never connected to: verify there records uses itself.
q -d postgres -c 'CREATE DATABASE kh_template' -c "ALTER DATABASE kh_template IS_TEMPLATE true"
q -d kh_template -f tests/fixtures/supabase.sql -c 'CREATE EXTENSION keyhippo' >/dev/null
q -d kh_template -c "INSERT INTO auth.users (id, email) VALUES ('$USER_A', 'a@example.com')"
read -r keyt idt <<<"$(other_key kh_template templ)"
q -d kh_template -c "SELECT count(*) FROM keyhippo.verify_api_key('$keyt')" >/dev/null
sleep 1
check "template database: no writer connects; verify wrote the use at commit" "0 t" \
    "$(writer_in kh_template) $(used_in kh_template "$idt")"
q -d postgres -c "ALTER DATABASE kh_template IS_TEMPLATE false" -c "DROP DATABASE kh_template" -c "DROP TABLESPACE kh_ts"
q -c "ALTER SYSTEM RESET keyhippo.last_used_flush_interval" -c "SELECT pg_reload_conf()" >/dev/null

# 2. A clean shutdown keeps what was recorded. In kh a writer is running (it wrote a first use
#    and waits for an hour): it writes the next use as it stops. In kh_saved no writer is (its
#    last write failed; the next try would be in an hour): the postmaster saves the use at
#    shutdown, reads it back at start, and a writer writes it then.
q -c "ALTER SYSTEM SET keyhippo.last_used_flush_interval = 3600" -c "SELECT pg_reload_conf()" >/dev/null
sleep 2
q -d postgres -c 'CREATE DATABASE kh_saved'
q -d kh_saved -f tests/fixtures/supabase.sql -c 'CREATE EXTENSION keyhippo' >/dev/null
q -d kh_saved -c "INSERT INTO auth.users (id, email) VALUES ('$USER_A', 'a@example.com')" \
  -c "CREATE FUNCTION refuse_use() RETURNS trigger LANGUAGE plpgsql AS \$\$ BEGIN RAISE EXCEPTION 'refused'; END \$\$" \
  -c "CREATE TRIGGER refuse_use BEFORE UPDATE OF last_used_at ON keyhippo.api_key_metadata FOR EACH ROW EXECUTE FUNCTION refuse_use()" \
  -c "ALTER TABLE keyhippo.api_key_metadata ENABLE ALWAYS TRIGGER refuse_use"
read -r key2b id2b <<<"$(other_key kh_saved saved)"
q -d kh_saved -c "SELECT count(*) FROM keyhippo.verify_api_key('$key2b')" >/dev/null
for i in $(seq 1 50); do [ -n "$(q -d kh_saved -c "SELECT coalesce(last_error, '') FROM keyhippo.worker_status WHERE database = 'kh_saved'")" ] && break; sleep 0.1; done
q -d kh_saved -c "DROP TRIGGER refuse_use ON keyhippo.api_key_metadata"
# (After CREATE DATABASE, which wakes every process, the writer of kh too; and with a writer
# started now: one that has run a minute leaves its place when another database waits.)
q -c "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type = 'keyhippo writer'" >/dev/null
sleep 0.5
read -r key2a id2a <<<"$(new_key "restart first")"
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key2a')" >/dev/null
wait_used "$id2a" 5 >/dev/null
read -r key2 id2 <<<"$(new_key restart)"
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key2')" >/dev/null
sleep 1
check "not yet written before shutdown (writer waiting; write failed)" "null f 1" \
    "$(last_used "$id2") $(used_in kh_saved "$id2b") $(q -d kh_saved -c "SELECT pending_uses FROM keyhippo.worker_status WHERE database = 'kh_saved'")"
bin/cluster restart last_used || exit 1
check "the running writer wrote its database's use as it stopped" yes "$([ "$(last_used "$id2")" != null ] && echo yes || echo no)"
for i in $(seq 1 50); do [ "$(used_in kh_saved "$id2b")" = t ] && break; sleep 0.1; done
check "the use saved at shutdown: written after the restart" t "$(used_in kh_saved "$id2b")"
q -c "ALTER SYSTEM RESET keyhippo.last_used_flush_interval" -c "SELECT pg_reload_conf()" >/dev/null
q -d postgres -c 'DROP DATABASE kh_saved'

# 3. A hot standby verifies keys (preloaded: uses are recorded and dropped; nothing is written).
runuser -u postgres -- "$PGBIN/pg_basebackup" -h 127.0.0.1 -p "$PORT" -U postgres -D "$STANDBY" -R -X stream \
    >"$ROOT/target/clusters/last_used/basebackup.log" 2>&1 || { echo "pg_basebackup failed:"; cat "$ROOT/target/clusters/last_used/basebackup.log"; }
cat >>"$STANDBY/postgresql.conf" <<CONF
unix_socket_directories = '$STANDBY'
hot_standby = on
CONF
# On the first free port after the primary's (something else may listen on the one after it).
STANDBY_PORT=$(bin/cluster serve "$STANDBY" $((PORT + 1))) || echo "standby did not start (its log above)"
read -r key3 id3 <<<"$(new_key standby)"
sleep 2  # replay
check "standby is in recovery" t "$(q -p "$STANDBY_PORT" -c "SELECT pg_is_in_recovery()")"
check "verify on the hot standby" 1 "$(q -p "$STANDBY_PORT" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key3')")"
# 3c. Replay fires no trigger, so nothing would tell a standby's caches of a change: a standby
#     backend that verified a key (twice, as a cache would fill) sees a removed role and then
#     the key's revocation at its next verify once the primary's commit is replayed.
wait_replay() {
    local lsn; lsn=$(q -c "SELECT pg_current_wal_insert_lsn()")
    for i in $(seq 1 100); do
        [ "$(q -p "$STANDBY_PORT" -c "SELECT pg_last_wal_replay_lsn() >= '$lsn'")" = t ] && return
        sleep 0.1
    done
}
read -r key12 id12 <<<"$(new_key "standby cache")"
wait_replay
perms12="SELECT array_to_string(permissions, ',') FROM keyhippo.verify_api_key('$key12')"
q -p "$STANDBY_PORT" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key12')" -c "$perms12" \
  -c "SELECT pg_sleep(3)" -c "$perms12" -c "SELECT pg_sleep(3)" \
  -c "SELECT count(*) FROM keyhippo.verify_api_key('$key12')" >"$ROOT/target/clusters/last_used/standby_cache.out" 2>&1 &
sleep 0.5
q -c "DELETE FROM keyhippo_rbac.user_group_roles ugr USING keyhippo_rbac.roles r WHERE r.id = ugr.role_id AND ugr.user_id = '$USER_A' AND r.name = 'Admin'"
wait_replay
sleep 3
q -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$id12')" >/dev/null
wait_replay
wait "$!"
check "standby: a removed role, then a revocation, seen by the next verify after replay" \
    "1 manage_api_keys,manage_groups,manage_permissions,manage_roles,manage_scopes,manage_user_attributes manage_api_keys 0" \
    "$(grep -v '^$' "$ROOT/target/clusters/last_used/standby_cache.out" | tr '\n' ' ' | sed 's/ $//')"
# 3d. Rate limits on a standby: counted in its own shared memory (nothing is written), apart
#     from the primary's count; a limit set on the primary applies once replayed.
left=$(q -c "SELECT (3600 - extract(epoch FROM clock_timestamp())::numeric % 3600)::int")
[ "$left" -gt 20 ] || sleep $((left + 1))
read -r key13 id13 <<<"$(new_key "standby limited")"
q -c "SET ROLE service_role" -c "SELECT keyhippo.set_rate_limit('$id13', 2, '1 hour')" >/dev/null
q -c "SELECT status FROM keyhippo.verify_api_key_status('$key13')" >/dev/null
wait_replay
standby_statuses=""
for i in 1 2 3; do
    standby_statuses="$standby_statuses $(q -p "$STANDBY_PORT" -c "SELECT status FROM keyhippo.verify_api_key_status('$key13')")"
done
check "standby: a key limited to 2 an hour (1 used on the primary) admits 2 there, then refuses" \
    "VALID VALID RATE_LIMITED" "$(echo $standby_statuses)"
check "... while the primary counts its own: 1 used, 1 left" "VALID RATE_LIMITED" \
    "$(q -c "SELECT status FROM keyhippo.verify_api_key_status('$key13')") $(q -c "SELECT status FROM keyhippo.verify_api_key_status('$key13')")"
# 3e. Credits on a standby: loaded from the replicated grant, spent in the standby's own shared
#     memory (a read-only server), never written; the primary's balance is its own.
read -r key14 id14 <<<"$(new_key "standby credits")"
q -c "SET ROLE service_role" -c "SELECT keyhippo.set_credits('$id14', 2)" >/dev/null
wait_replay
standby_statuses=""
for i in 1 2 3; do
    standby_statuses="$standby_statuses $(q -p "$STANDBY_PORT" -c "SELECT status FROM keyhippo.verify_api_key_status('$key14')")"
done
check "standby: a key with 2 credits admits 2 there, then USAGE_EXCEEDED" \
    "VALID VALID USAGE_EXCEEDED" "$(echo $standby_statuses)"
check "... while the primary still has both" "VALID VALID USAGE_EXCEEDED" \
    "$(for i in 1 2 3; do q -c "SELECT status FROM keyhippo.verify_api_key_status('$key14')"; done | tr '\n' ' ' | sed 's/ $//')"
check "revoked key refused on the primary right after commit" 0 \
    "$(q -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$id')" -c "RESET ROLE" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" | tail -1)"

# 4. Not preloaded: the throttled synchronous update, skipped in READ ONLY transactions.
sed -i "/^shared_preload_libraries/d" "$ROOT/target/clusters/last_used/data/postgresql.conf"
bin/cluster restart last_used || exit 1
check "no worker without preloading" 0 "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'keyhippo%'")"
read -r key4 id4 <<<"$(new_key fallback-ro)"
check "fallback: verify in READ ONLY" 1 \
    "$(q -c "BEGIN READ ONLY" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key4')" -c "COMMIT" | grep -v '^$' | head -1)"
check "fallback: nothing written read-only" null "$(last_used "$id4")"
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key4')" >/dev/null
check "fallback: written by the verify itself" yes "$([ "$(last_used "$id4")" != null ] && echo yes || echo no)"
first=$(last_used "$id4")
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key4')" >/dev/null
check "fallback: throttled (second verify within the interval writes nothing)" "$first" "$(last_used "$id4")"

# 5. During pg_upgrade (the server started in binary-upgrade mode, -b) nothing of keyhippo's
#    starts, preloaded or not.
echo "shared_preload_libraries = 'keyhippo'" >>"$ROOT/target/clusters/last_used/data/postgresql.conf"
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$ROOT/target/clusters/last_used/data" -m fast -w stop >/dev/null
runuser -u postgres -- "$PGBIN/pg_ctl" -D "$ROOT/target/clusters/last_used/data" -l "$ROOT/target/clusters/last_used/server.log" \
    -o "-b" -w start >/dev/null || echo "binary-upgrade start failed"
check "binary-upgrade mode: no keyhippo worker" "0 t" \
    "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type LIKE 'keyhippo%'") $(q -c "SELECT current_setting('shared_preload_libraries') = 'keyhippo'")"

echo "last_used: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
