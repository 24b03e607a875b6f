#!/usr/bin/env bash
# last_used_at without a write on the verify path: the background worker (keyhippo preloaded),
# the flush at a clean shutdown, the synchronous fallback (not preloaded), READ ONLY
# transactions and a hot standby. Needs the extension installed. Ends with
# "last_used: N passed, N failed".
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

# 1. Preloaded: verify writes nothing itself, even read-only; the worker writes within seconds.
# (The worker retries every 5 s until its database exists.)
worker_up() { q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'keyhippo'"; }
for i in $(seq 1 100); do [ "$(worker_up)" = 1 ] && break; sleep 0.2; done
check "worker is running" 1 "$(worker_up)"
read -r key id <<<"$(new_key worker)"
check "verify in a READ ONLY transaction" 1 \
    "$(q -c "BEGIN READ ONLY" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" -c "COMMIT" | grep -v '^$' | head -1)"
check "no synchronous write by verify" null "$(last_used "$id")"
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

# 1d. The worker writes each row where verify read it (src/usage_writer.rs): it does not look
#     the keys up again, so the primary key it would otherwise probe is not scanned, and the
#     writes are HOT updates. Every psql below is a new backend: each verify reads the table.
pkey_scans() {
    q -c "SELECT pg_stat_clear_snapshot()" \
      -c "SELECT idx_scan FROM pg_stat_user_indexes WHERE indexrelid = 'keyhippo.api_key_metadata_pkey'::regclass" | tail -1
}
hot() {
    q -c "SELECT pg_stat_clear_snapshot()" \
      -c "SELECT n_tup_hot_upd FROM pg_stat_user_tables WHERE relid = 'keyhippo.api_key_metadata'::regclass" | tail -1
}
direct_keys=()
for n in 1 2 3; do
    read -r k _ <<<"$(new_key "direct $n")"
    direct_keys+=("$k")
done
sleep 1.5
scans_before=$(pkey_scans) hot_before=$(hot)
for k in "${direct_keys[@]}"; do q -c "SELECT count(*) FROM keyhippo.verify_api_key('$k')" >/dev/null; done
# Polled by a scan of the table (by id it would be a scan of the primary key).
written=0
for _ in $(seq 1 50); do
    written=$(q -c "SELECT count(*) FROM keyhippo.api_key_metadata WHERE description LIKE 'direct _' AND last_used_at IS NOT NULL")
    [ "$written" = 3 ] && break
    sleep 0.1
done
sleep 1.5
check "worker wrote the three keys' last_used_at" 3 "$written"
check "worker found the rows where verify read them (primary key not scanned)" "$scans_before" "$(pkey_scans)"
check "worker's writes were HOT updates" 3 "$(( $(hot) - hot_before ))"
# A key whose row moved since verify read it (an indexed column changed: not a HOT update) is
# written through the UPDATE statement instead.
read -r key8 id8 <<<"$(new_key moved)"
q -c "ALTER SYSTEM SET keyhippo.last_used_flush_interval = 3600" -c "SELECT pg_reload_conf()" >/dev/null
sleep 2
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key8')" >/dev/null
q -c "UPDATE keyhippo.api_key_metadata SET prefix = prefix || 'x' WHERE id = '$id8'" >/dev/null
q -c "ALTER SYSTEM RESET keyhippo.last_used_flush_interval" -c "SELECT pg_reload_conf()" >/dev/null
check "moved row: written by the statement" yes "$([ "$(wait_used "$id8" 5)" != never ] && echo yes || echo no)"

# 1e. The worker prunes the pages of its previous flush (the dead row versions its updates
#     left), so that the next verify reading such a page does not: the row of a key used in a
#     first flush is pruned by a second flush, of a key on another page. After the key rows are
#     found (before anything is updated), nothing here reads the table through PostgreSQL's
#     heap code (a read would prune the page itself): progress is followed in
#     pg_stat_user_tables, the page read with pageinspect.
q -c "CREATE EXTENSION IF NOT EXISTS pageinspect" >/dev/null
q -c "$as_a" -c "SELECT g || ' ' || api_key FROM generate_series(1, 120) g, keyhippo.create_api_key('prune ' || g)" \
    >"$ROOT/target/clusters/last_used/prune.keys"
block_of() { q -c "SELECT (ctid::text::point)[0]::int FROM keyhippo.api_key_metadata WHERE description = 'prune $1'"; }
key_of() { awk -v g="$1" '$1 == g {print $2}' "$ROOT/target/clusters/last_used/prune.keys"; }
first_block=$(block_of 60) last_block=$(block_of 120)
first_key=$(key_of 60) last_key=$(key_of 120)
check "the two keys' rows are on different pages" yes "$([ "$first_block" != "$last_block" ] && echo yes || echo no)"
updates() {
    q -c "SELECT pg_stat_clear_snapshot()" \
      -c "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'keyhippo.api_key_metadata'::regclass" | tail -1
}
wait_updates() { # until n_tup_upd > $1, up to 5 s
    for _ in $(seq 1 50); do [ "$(updates)" -gt "$1" ] && return; sleep 0.1; done
}
# Redirect line pointers (what pruning a HOT chain leaves) and HOT-updated row versions.
first_page() {
    q -c "SELECT count(*) FILTER (WHERE lp_flags = 2) || ' ' || count(*) FILTER (WHERE lp_flags = 1 AND (t_infomask2 & 16384) <> 0)
          FROM heap_page_items(get_raw_page('keyhippo.api_key_metadata', $first_block))"
}
sleep 1.5
u=$(updates)
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$first_key')" >/dev/null
wait_updates "$u"
check "first flush: the key's old row version is on its page (HOT-updated, not pruned)" "0 1" "$(first_page)"
u=$(updates)
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$last_key')" >/dev/null
wait_updates "$u"
check "second flush pruned that page (old version gone: a redirect to the new one)" "1 0" "$(first_page)"

# 1f. With the verified-key cache (on in this cluster), a cached verify records the key's use
#     once per keyhippo.last_used_interval, like the uncached one, and where its row is (no
#     scan of the primary key). One session: the first verify reads the row (and caches the
#     key), the second, 2.5 s later, is answered by the cache; each prints its transaction's
#     time, which is the use it records.
read -r key9 _ <<<"$(new_key "cached use")"
used9() { q -c "SELECT coalesce(last_used_at::text, 'null') FROM keyhippo.api_key_metadata WHERE description = 'cached use'"; }
sleep 1.5
scans_before=$(pkey_scans)
times9=$(q -c "SET keyhippo.last_used_interval = 1" \
  -c "SELECT now()::text FROM keyhippo.verify_api_key('$key9')" \
  -c "SELECT pg_sleep(2.5)" \
  -c "SELECT now()::text FROM keyhippo.verify_api_key('$key9')" | grep -v '^$')
second9=$(echo "$times9" | tail -1)
for _ in $(seq 1 50); do [ "$(used9)" = "$second9" ] && break; sleep 0.1; done
check "cached verify records its use once the interval has passed" "$second9" "$(used9)"
check "cached verify's use written where the row is (primary key not scanned)" "$scans_before" "$(pkey_scans)"

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

# 1h. Under load the worker does not wait for its interval (an hour here): the 2,048th use to be
#     written as a new row version (a key's first use) wakes it, and so does the 65,536th use of
#     any kind (keys used before, overwritten in place: large batches share page visits).
q -c "ALTER SYSTEM SET keyhippo.last_used_flush_interval = 3600" -c "SELECT pg_reload_conf()" >/dev/null
q -c "CREATE TABLE wake_keys (i int PRIMARY KEY, key text NOT NULL, id uuid NOT NULL)" \
  -c "GRANT ALL ON wake_keys TO authenticated"
q -c "$as_a" -c "INSERT INTO wake_keys SELECT i, k.api_key, k.api_key_id FROM generate_series(1, 65536) i, keyhippo.create_api_key('wake ' || i) k"
q -c "SELECT keyhippo.flush_key_usage()" >/dev/null
sleep 2
verify_wake() { q -c "SELECT count(*) FROM wake_keys w, keyhippo.verify_api_key(w.key) v WHERE w.i BETWEEN $1 AND $2" >/dev/null; }
written_wake() { q -c "SELECT count(*) FROM wake_keys w JOIN keyhippo.api_key_metadata m ON m.id = w.id WHERE m.last_used_at > now() - interval '1 hour'"; }
# Waits up to 10 s for $1 of the keys' uses to be written; prints how many were.
wait_wake() {
    local n=0
    for _ in $(seq 1 100); do n=$(written_wake); [ "$n" = "$1" ] && break; sleep 0.1; done
    echo "$n"
}
verify_wake 1 2047
sleep 2
check "2,047 first uses: not written yet (the worker waits)" 0 "$(written_wake)"
verify_wake 2048 2048
check "the 2,048th first use wakes the worker: all written" 2048 "$(wait_wake 2048)"
q -c "SET session_replication_role = replica" \
  -c "UPDATE keyhippo.api_key_metadata m SET last_used_at = now() - interval '1 day' FROM wake_keys w WHERE m.id = w.id" >/dev/null
verify_wake 1 65535
sleep 2
check "65,535 uses of keys used before: not written yet" 0 "$(written_wake)"
verify_wake 65536 65536
check "the 65,536th wakes the worker: all written" 65536 "$(wait_wake 65536)"
q -c "DROP TABLE wake_keys" -c "ALTER SYSTEM RESET keyhippo.last_used_flush_interval" -c "SELECT pg_reload_conf()" >/dev/null

# 2. A clean shutdown flushes what was recorded: no periodic flush for an hour, then restart.
q -c "ALTER SYSTEM SET keyhippo.last_used_flush_interval = 3600" -c "SELECT pg_reload_conf()" >/dev/null
sleep 2
read -r key2 id2 <<<"$(new_key restart)"
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key2')" >/dev/null
sleep 1
check "not yet written before shutdown" null "$(last_used "$id2")"
bin/cluster restart last_used || exit 1
check "written at shutdown, there after restart" yes "$([ "$(last_used "$id2")" != null ] && echo yes || echo no)"

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
# 3b. A key used again (last_used_at already set) has it overwritten where the row is: no new
#     row version. The overwrite is WAL-logged (the record heap_inplace_update writes), so the
#     standby replays it. (The worker flushes hourly since section 2: flush_key_usage() here.)
#     Its claims are stored out of line (TOAST) and stay as they were.
read -r key11 id11 <<<"$(new_key "used again")"
q -c "UPDATE keyhippo.api_key_metadata SET claims = jsonb_build_object('blob', (SELECT string_agg(md5(i::text), '') FROM generate_series(1, 2000) i)) WHERE id = '$id11'" >/dev/null
claims11() { q -c "SELECT md5(claims::text) FROM keyhippo.api_key_metadata WHERE id = '$id11'"; }
claims_before=$(claims11)
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key11')" -c "SELECT keyhippo.flush_key_usage()" >/dev/null
first=$(last_used "$id11")
where() { q -c "SELECT ctid FROM keyhippo.api_key_metadata WHERE id = '$id11'"; }
tid11=$(where)
upd() { q -c "SELECT pg_stat_force_next_flush()" -c "SELECT n_tup_upd FROM pg_stat_user_tables WHERE relid = 'keyhippo.api_key_metadata'::regclass" | tail -1; }
upd_before=$(upd)
sleep 1.1
# In one transaction: the overwrite needs no transaction id (so logical decoding skips it).
xid11=$(q -c "SET keyhippo.last_used_interval = 1" -c "BEGIN" \
  -c "SELECT count(*) FROM keyhippo.verify_api_key('$key11')" -c "SELECT keyhippo.flush_key_usage()" \
  -c "SELECT coalesce(pg_current_xact_id_if_assigned()::text, 'none')" -c "COMMIT" | grep -v '^$' | tail -1)
second=$(last_used "$id11")
check "used again: last_used_at moved on, same row version, no row update, claims kept, no xid" "yes $tid11 0 $claims_before none" \
    "$([ "$first" != null ] && [[ "$second" > "$first" ]] && echo yes || echo "no ($first -> $second)") $(where) $(( $(upd) - upd_before )) $(claims11) $xid11"
# The insert position, not pg_current_wal_lsn() (the write position): the flush's transaction has
# no xid, so its commit leaves the record for the WAL writer to write (XLogSetAsyncXactLSN), and
# a write position read before that would let the wait below end before the record is sent.
lsn=$(q -c "SELECT pg_current_wal_insert_lsn()")
for i in $(seq 1 100); do
    [ "$(q -p "$STANDBY_PORT" -c "SELECT pg_last_wal_replay_lsn() >= '$lsn'")" = t ] && break
    sleep 0.1
done
check "the overwrite replayed on the standby" "$second" \
    "$(q -p "$STANDBY_PORT" -c "SELECT coalesce(last_used_at::text, 'null') FROM keyhippo.api_key_metadata WHERE id = '$id11'")"
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
check "revoked key refused on the primary right after commit" 0 \
    "$(q -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$id')" -c "RESET ROLE" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')" | tail -1)"

# 4. Not preloaded: the throttled synchronous update, skipped in READ ONLY transactions.
sed -i "/^shared_preload_libraries/d" "$ROOT/target/clusters/last_used/data/postgresql.conf"
bin/cluster restart last_used || exit 1
check "no worker without preloading" 0 "$(q -c "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'keyhippo'")"
read -r key4 id4 <<<"$(new_key fallback-ro)"
check "fallback: verify in READ ONLY" 1 \
    "$(q -c "BEGIN READ ONLY" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key4')" -c "COMMIT" | grep -v '^$' | head -1)"
check "fallback: nothing written read-only" null "$(last_used "$id4")"
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key4')" >/dev/null
check "fallback: written by the verify itself" yes "$([ "$(last_used "$id4")" != null ] && echo yes || echo no)"
first=$(last_used "$id4")
q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key4')" >/dev/null
check "fallback: throttled (second verify within the interval writes nothing)" "$first" "$(last_used "$id4")"

echo "last_used: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
