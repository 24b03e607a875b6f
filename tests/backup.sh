#!/usr/bin/env bash
# Backups: pg_dump of a keyhippo database (keys of every kind, scopes, claims, custom RBAC, a
# changed setting, the audit log) restored with pg_restore (custom format) and with psql (plain
# format) into new databases. Every keyhippo table and auth.users must come back exactly, keys
# must verify as before, and the restored database must be linked to auth.users as the original
# was. Needs the extension installed into the private build (bin/install). Ends with
# "backup: N passed, N failed".
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PORT=${BACKUP_PORT:-55447}
WORK="$ROOT/target/backup-test"
. bin/env.sh
EXTRA_CONF="shared_preload_libraries = 'keyhippo'" bin/cluster start backup "$PORT" || exit 1
trap 'bin/cluster stop backup' EXIT
PORT=$(bin/cluster port backup)
rm -rf "$WORK"; mkdir -p "$WORK"
chmod 777 "$WORK"
export PGPORT=$PORT
. tests/lib.sh
setup_kh

sample_data
remember_columns kh
original=$(snapshot kh)
tables=$(q -c "SELECT count(*) FROM public.kh_columns")
check "the snapshot holds every table ($tables), the five keys among them" "$tables keyhippo.api_key_metadata=5" \
    "$(echo "$original" | wc -w) $(echo "$original" | grep -oE 'keyhippo.api_key_metadata=[0-9]+')"
check "the original holds an expiry report" 1 \
    "$(q -c "SELECT count(*) FROM keyhippo.audit_log WHERE action = 'expiring_key'")"

# What a restored database must answer as the original does.
restored_checks() { # database format
    check "$2: every keyhippo table and auth.users exactly as in the original" "$original" "$(snapshot "$1")"
    sample_checks "$1" "$2"
}

"$PGBIN/pg_dump" -Fc -d kh -f "$WORK/kh.dump"
q -d postgres -c "CREATE DATABASE restored_custom"
out=$("$PGBIN/pg_restore" --exit-on-error -d restored_custom "$WORK/kh.dump" 2>&1); rc=$?
check "custom format: pg_restore succeeds" "0" "$rc${out:+ $out}"
restored_checks restored_custom "custom format"

"$PGBIN/pg_dump" -d kh -f "$WORK/kh.sql"
q -d postgres -c "CREATE DATABASE restored_plain"
out=$(q -d restored_plain -f "$WORK/kh.sql" 2>&1 >/dev/null); rc=$?
check "plain format: psql restores it" "0" "$rc${out:+ $out}"
restored_checks restored_plain "plain format"

echo "backup: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
