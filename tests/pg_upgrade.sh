#!/usr/bin/env bash
# pg_upgrade of a PostgreSQL cluster with keyhippo (preloaded, keys in use) from one major version
# to another (default 15 to 17, as Supabase upgrades projects), keyhippo installed into both
# private builds first (bin/install-private). Every key must verify afterwards as before. Part of
# make test-all (it needs two versions). Ends with "pg_upgrade: N passed, N failed".
#
#   tests/pg_upgrade.sh [OLD NEW]
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OLD=${1:-15} NEW=${2:-17}
PORT=${UPGRADE_PORT:-55449}
WORK="$ROOT/target/clusters/upgrade"
as_postgres() { runuser -u postgres -- "$@"; }

for v in "$OLD" "$NEW"; do
    PG=$v bin/install-private >"$ROOT/target/pg_upgrade-install-$v.log" 2>&1 ||
        { cat "$ROOT/target/pg_upgrade-install-$v.log"; echo "pg_upgrade: 0 passed, 1 failed"; exit 1; }
done
BIN_OLD=$(bin/pg "$OLD") BIN_NEW=$(bin/pg "$NEW")
# check(), as in the other suites.
PGBIN=$BIN_NEW
. tests/lib.sh
# Each build's programs find their own libpq first.
lib() { echo "$(dirname "$1")/lib"; }

rm -rf "$WORK"; mkdir -p "$WORK"
chown postgres: "$WORK"
p="$WORK"; while [ "$p" != / ]; do chmod o+x "$p" 2>/dev/null || true; p=$(dirname "$p"); done
stop_all() {
    for d in "$WORK/old" "$WORK/new"; do
        [ -f "$d/postmaster.pid" ] && as_postgres env LD_LIBRARY_PATH="$(lib "$BIN_NEW")" "$BIN_NEW/pg_ctl" -D "$d" -m fast -w stop >/dev/null 2>&1
        [ -f "$d/postmaster.pid" ] && as_postgres env LD_LIBRARY_PATH="$(lib "$BIN_OLD")" "$BIN_OLD/pg_ctl" -D "$d" -m fast -w stop >/dev/null 2>&1
    done
    true
}
trap 'stop_all; rm -rf "$WORK"' EXIT
conf() {
    cat >>"$1/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
unix_socket_directories = '$WORK'
port = $PORT
fsync = off
shared_preload_libraries = 'keyhippo'
CONF
}
for side in old new; do
    bin=$BIN_OLD; [ "$side" = new ] && bin=$BIN_NEW
    as_postgres env LD_LIBRARY_PATH="$(lib "$bin")" "$bin/initdb" -D "$WORK/$side" -U postgres -A trust -E UTF8 --locale=C.UTF-8 >"$WORK/initdb-$side.log" 2>&1 ||
        { cat "$WORK/initdb-$side.log"; exit 1; }
    conf "$WORK/$side"
done

psql_old() { LD_LIBRARY_PATH="$(lib "$BIN_OLD")" "$BIN_OLD/psql" -X -q -t -A -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }
psql_new() { LD_LIBRARY_PATH="$(lib "$BIN_NEW")" "$BIN_NEW/psql" -X -q -t -A -h 127.0.0.1 -p "$PORT" -U postgres -v ON_ERROR_STOP=1 "$@"; }

as_postgres env LD_LIBRARY_PATH="$(lib "$BIN_OLD")" "$BIN_OLD/pg_ctl" -D "$WORK/old" -l "$WORK/old.log" -w start >/dev/null ||
    { cat "$WORK/old.log"; exit 1; }
psql_old -d postgres -c "CREATE DATABASE app"
psql_old -d app -f tests/fixtures/supabase.sql -c "CREATE EXTENSION keyhippo" >/dev/null
psql_old -d app -c "INSERT INTO auth.users (id, email) VALUES ('$USER_A', 'a@example.com')"
keys=$(psql_old -d app -c "$as_a" -c "SELECT k.api_key FROM generate_series(1, 5) g, keyhippo.create_api_key('key ' || g) k")
revoked=$(psql_old -d app -c "$as_a" -c "SELECT api_key || ' ' || api_key_id FROM keyhippo.create_api_key('to revoke')" | tail -1)
psql_old -d app -c "$as_a" -c "SELECT keyhippo.revoke_api_key('${revoked#* }')" >/dev/null
# Keys in use: verified, and their uses written by the background workers.
for k in $keys; do psql_old -d app -c "SELECT count(*) FROM keyhippo.verify_api_key('$k')" >/dev/null; done
psql_old -d app -c "SELECT keyhippo.flush_key_usage()" >/dev/null
before=$(psql_old -d app -c "SELECT count(*) || ' ' || count(last_used_at) || ' ' || count(*) FILTER (WHERE is_revoked) FROM keyhippo.api_key_metadata")
check "PostgreSQL $OLD: keys made, used and revoked" "6 5 1" "$before"
as_postgres env LD_LIBRARY_PATH="$(lib "$BIN_OLD")" "$BIN_OLD/pg_ctl" -D "$WORK/old" -m fast -w stop >/dev/null

out=$(cd "$WORK" && as_postgres env LD_LIBRARY_PATH="$(lib "$BIN_NEW")" "$BIN_NEW/pg_upgrade" \
    -b "$BIN_OLD" -B "$BIN_NEW" -d "$WORK/old" -D "$WORK/new" -p "$PORT" -P "$((PORT + 1))" -U postgres 2>&1); rc=$?
check "pg_upgrade $OLD -> $NEW succeeds" 0 "$rc"
[ "$rc" -eq 0 ] || echo "$out" | tail -20

as_postgres env LD_LIBRARY_PATH="$(lib "$BIN_NEW")" "$BIN_NEW/pg_ctl" -D "$WORK/new" -l "$WORK/new.log" -w start >/dev/null ||
    { cat "$WORK/new.log"; }
check "PostgreSQL $NEW serves the upgraded cluster" "$NEW" "$(psql_new -d app -c "SHOW server_version_num" | cut -c1-2)"
check "the keys, their uses and revocations are there" "$before" \
    "$(psql_new -d app -c "SELECT count(*) || ' ' || count(last_used_at) || ' ' || count(*) FILTER (WHERE is_revoked) FROM keyhippo.api_key_metadata")"
ok=0
for k in $keys; do
    [ "$(psql_new -d app -c "SELECT user_id FROM keyhippo.verify_api_key('$k')")" = "$USER_A" ] && ok=$((ok + 1))
done
check "every key verifies for its owner" 5 "$ok"
check "the revoked key does not" 0 "$(psql_new -d app -c "SELECT count(*) FROM keyhippo.verify_api_key('${revoked% *}')")"
new_key=$(psql_new -d app -c "$as_a" -c "SELECT api_key FROM keyhippo.create_api_key('after upgrade')" | tail -1)
check "new keys are made and verify" "$USER_A" "$(psql_new -d app -c "SELECT user_id FROM keyhippo.verify_api_key('$new_key')")"
check "uses are recorded again (shared memory, written by the workers)" t \
    "$(psql_new -d app -c "SELECT keyhippo.flush_key_usage() >= 1" -c "SELECT last_used_at IS NOT NULL FROM keyhippo.api_key_metadata WHERE description = 'after upgrade'" | tail -1)"

echo "pg_upgrade: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
