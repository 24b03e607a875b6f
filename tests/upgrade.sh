#!/usr/bin/env bash
# Updates between keyhippo versions (ALTER EXTENSION keyhippo UPDATE), on a preloaded server
# running this build's library, the order an operator follows: the new files installed
# (bin/install), the server (re)started, then the update.
#
#   - The install scripts of released versions are fixed: sql/keyhippo--<version>.sql for
#     every release; when the current version is released, the script the build generates
#     must hold the same statements. Every upgrade script sql/keyhippo--<from>--<to>.sql starts
#     from a released version and with keyhippo_internal.require_library('<to>').
#   - For every released version before the current one: CREATE EXTENSION keyhippo VERSION
#     '<it>', data of every kind made with this library on that version's SQL, ALTER EXTENSION
#     keyhippo UPDATE; then the catalogue (tests/catalogue.sql) and the rows CREATE EXTENSION
#     makes must equal a fresh install's, the data must be unchanged, and keys keep verifying.
#     With no earlier release, the same checks run from the current version to itself.
#   - An update whose script needs a newer library than the server runs (new files installed,
#     server not restarted) is refused with 55000 and changes nothing.
#   - The comparison itself finds a difference when there is one.
# Needs the extension installed into the private build (bin/install). Ends with
# "upgrade: N passed, N failed".
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PORT=${UPGRADE_PORT:-55451}
WORK="$ROOT/target/upgrade-test"
. bin/env.sh
EXTDIR="$("$PG_CONFIG" --sharedir)/extension"
CURRENT=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -1)
# A version no release will reach, for the refused update.
FUTURE=999.0.0
SCRATCH="$EXTDIR/keyhippo--$CURRENT--$FUTURE.sql"
EXTRA_CONF="shared_preload_libraries = 'keyhippo'" bin/cluster start upgrade "$PORT" || exit 1
trap 'rm -f "$SCRATCH"; bin/cluster stop upgrade' EXIT
PORT=$(bin/cluster port upgrade)
rm -rf "$WORK"; mkdir -p "$WORK"
export PGPORT=$PORT PGOPTIONS="-c client_min_messages=warning"
. tests/lib.sh

# The released versions, oldest first: those with an install script kept under sql/.
released=$(for f in sql/keyhippo--*.sql; do
    n=$(basename "$f" .sql); n=${n#keyhippo--}
    [[ "$n" == *--* ]] || echo "$n"
done | sort -V)
earlier=$(echo "$released" | grep -vxF "$CURRENT" || true)
echo "# released: $(echo $released); current: $CURRENT"

# --- The scripts ------------------------------------------------------------------------------

# The statements of an install script pgrx generated, in a form that ignores what moves
# without changing the schema: comments (pgrx's source locations among them) and the order of
# the blocks of objects (pgrx orders them by a dependency graph, not stably).
blocks() {
    python3 - "$1" <<'PY'
import re, sys
text = re.sub(r'/\*.*?\*/', '\x00', open(sys.argv[1]).read(), flags=re.S)
blocks = []
for part in text.split('\x00'):
    lines = [l.rstrip() for l in part.splitlines()]
    lines = [l for l in lines if l.strip() and not l.lstrip().startswith('--')]
    if lines:
        blocks.append('\n'.join(lines))
print('\n\n'.join(sorted(blocks)))
PY
}
if echo "$released" | grep -qxF "$CURRENT"; then
    blocks "sql/keyhippo--$CURRENT.sql" >"$WORK/kept.sql"
    blocks "$EXTDIR/keyhippo--$CURRENT.sql" >"$WORK/generated.sql"
    diff -u "$WORK/kept.sql" "$WORK/generated.sql" >"$WORK/kept.diff"
    check "the schema of released $CURRENT is unchanged (else: a new version and an upgrade script)" "" \
        "$(head -40 "$WORK/kept.diff")"
    # ... and the comparison sees a change of one word.
    sed '0,/ STABLE/s// VOLATILE/' "sql/keyhippo--$CURRENT.sql" >"$WORK/changed.sql"
    check "... a comparison that sees one changed word among $(grep -c . "$WORK/kept.sql") lines" 2 \
        "$(diff <(blocks "$WORK/changed.sql") "$WORK/kept.sql" | grep -c '^[<>]')"
else
    check "version $CURRENT is new: an upgrade script leads to it from the last release" yes \
        "$([ -e "sql/keyhippo--$(echo "$earlier" | tail -1)--$CURRENT.sql" ] && echo yes || echo no)"
fi
bad=""
for f in sql/keyhippo--*--*.sql; do
    [ -e "$f" ] || continue
    n=$(basename "$f" .sql); n=${n#keyhippo--}; from=${n%%--*}; to=${n#*--}
    echo "$released" | grep -qxF "$from" || bad="$bad $n:from-unreleased"
    first=$(grep -vE '^\s*(--.*)?$' "$f" | head -1)
    [ "$first" = "SELECT keyhippo_internal.require_library('$to');" ] || bad="$bad $n:first-statement"
done
check "every upgrade script starts from a release and with require_library('<to>')" "" "$bad"
check "CREATE EXTENSION can install every released version and the current one" \
    "$(printf '%s\n' $released "$CURRENT" | sort -uV | tr '\n' ' ')" \
    "$(q -d postgres -c "SELECT version FROM pg_available_extension_versions WHERE name = 'keyhippo'" | sort -uV | tr '\n' ' ')"

# --- The comparison -------------------------------------------------------------------------

catalogue() { q -d "$1" -f tests/catalogue.sql; }
# The rows CREATE EXTENSION makes (settings, default RBAC, the default scope), without the
# times they were made.
made_rows() {
    printf '%s\n\\gexec\n' "
SELECT format('SELECT %L || '' '' || COALESCE(string_agg(r, '' '' ORDER BY r), ''-'')
                 FROM (SELECT (to_jsonb(t) - %L::text[])::text AS r FROM %s t) x',
              c.oid::regclass, ARRAY(SELECT attname::text FROM pg_attribute
                                      WHERE attrelid = c.oid AND attnum > 0
                                        AND atttypid IN ('timestamptz'::regtype, 'timestamp'::regtype)),
              c.oid::regclass)
  FROM pg_class c
 WHERE c.relkind IN ('r', 'p')
   AND c.relnamespace::regnamespace::text IN ('keyhippo', 'keyhippo_rbac', 'keyhippo_internal', 'keyhippo_impersonation')
 ORDER BY 1" | q -d "$1"
}
# A database with the Supabase-shaped fixture and keyhippo at version $2 (default: the
# current one, from its generated script).
new_database() {
    q -d postgres -c "DROP DATABASE IF EXISTS $1" -c "CREATE DATABASE $1"
    q -d "$1" -f tests/fixtures/supabase.sql \
      -c "CREATE EXTENSION keyhippo${2:+ VERSION '$2'}" >/dev/null
}

new_database fresh
catalogue fresh >"$WORK/fresh.catalogue"
made_rows fresh >"$WORK/fresh.rows"
check "the catalogue of a fresh install lists functions, policies and triggers" "yes yes yes" \
    "$(for kind in function policy trigger; do grep -q "^$kind " "$WORK/fresh.catalogue" && echo -n 'yes ' || echo -n 'no '; done | sed 's/ $//')"
new_database control
q -d control -c "GRANT EXECUTE ON FUNCTION keyhippo_internal.library_version() TO anon" \
    -c "ALTER FUNCTION keyhippo.verify_api_key(text) COST 7" \
    -c "UPDATE keyhippo_internal.config SET value = '31' WHERE key = 'audit_log_retention_days'"
catalogue control >"$WORK/control.catalogue"
made_rows control >"$WORK/control.rows"
check "the comparison sees a grant, a function's cost and a setting (and its audit row) differ" "2 2" \
    "$(diff "$WORK/control.catalogue" "$WORK/fresh.catalogue" | grep -c '^<') $(diff "$WORK/control.rows" "$WORK/fresh.rows" | grep -c '^<')"

# --- Each update path -----------------------------------------------------------------------

paths=${earlier:-$CURRENT}
[ -n "$earlier" ] || echo "# no release before $CURRENT: the update checks run from $CURRENT to itself"
for from in $paths; do
    db=v_${from//./_}
    new_database "$db" "$from"
    check "$from: installed" "$from" "$(q -d "$db" -c "SELECT extversion FROM pg_extension WHERE extname = 'keyhippo'")"
    # This library on the SQL of $from: data of every kind made through it, as in production
    # between the restart and the update.
    q -d postgres -c "DROP DATABASE IF EXISTS kh" -c "ALTER DATABASE $db RENAME TO kh"
    q -c "INSERT INTO auth.users (id, email) VALUES ('$USER_A', 'a@example.com')"
    sample_data
    check "$from: this library works on its SQL (keys verify before the update)" "$USER_A VALID" \
        "$(q -c "SELECT (SELECT user_id FROM keyhippo.verify_api_key('$key_a')) || ' ' || (SELECT status FROM keyhippo.verify_api_key_status('$key_s'))")"
    remember_columns kh
    before=$(snapshot kh)
    check "$from: the snapshot holds the data (five keys)" keyhippo.api_key_metadata=5 \
        "$(echo "$before" | grep -oE 'keyhippo.api_key_metadata=[0-9]+')"
    audit_rows=$(q -c "SELECT count(*) FROM keyhippo.audit_log")
    out=$(q -c "ALTER EXTENSION keyhippo UPDATE" 2>&1); rc=$?
    check "$from: ALTER EXTENSION keyhippo UPDATE succeeds" 0 "$rc${out:+ $out}"
    check "$from: now at $CURRENT" "$CURRENT" "$(q -c "SELECT extversion FROM pg_extension WHERE extname = 'keyhippo'")"
    catalogue kh >"$WORK/$db.catalogue"
    check "$from: the catalogue equals a fresh install's" "" \
        "$(diff "$WORK/$db.catalogue" "$WORK/fresh.catalogue" | head -20)"
    check "$from: every row the data had is still there, unchanged" "$before" "$(snapshot kh)"
    check "$from: the update wrote no audit rows" "$audit_rows" "$(q -c "SELECT count(*) FROM keyhippo.audit_log")"
    sample_checks kh "$from"
    # The same update without data: the rows CREATE EXTENSION makes must come out as a fresh
    # install's.
    q -d postgres -c "ALTER DATABASE kh RENAME TO $db"
    new_database "${db}_empty" "$from"
    q -d "${db}_empty" -c "ALTER EXTENSION keyhippo UPDATE"
    check "$from (no data): the rows CREATE EXTENSION makes equal a fresh install's" "" \
        "$(made_rows "${db}_empty" | diff - "$WORK/fresh.rows" | head -10)"
done

# --- A server still running an older library ------------------------------------------------

# What an upgrade script to a version beyond this library looks like when the new files are
# installed and the server was not restarted: its first statement refuses, nothing changes.
cat >"$SCRATCH" <<SQL
SELECT keyhippo_internal.require_library('$FUTURE');
CREATE TABLE keyhippo.created_by_the_refused_update ();
SQL
out=$(q -d fresh -v VERBOSITY=verbose -c "ALTER EXTENSION keyhippo UPDATE TO '$FUTURE'" 2>&1)
check "an update needing a newer library: 55000, saying which library runs and what to do" \
    "55000 library $CURRENT needs $FUTURE restart" \
    "$(echo "$out" | grep -oE '^ERROR:  [0-9A-Z]{5}' | awk '{print $2}') $(echo "$out" | grep -oE "library $CURRENT" | head -1) $(echo "$out" | grep -oE "needs $FUTURE" | head -1) $(echo "$out" | grep -oiE 'restart the server' | head -1 | awk '{print tolower($1)}')"
check "... and changed nothing" "$CURRENT 0" \
    "$(q -d fresh -c "SELECT extversion || ' ' || (SELECT count(*) FROM pg_class WHERE relname = 'created_by_the_refused_update') FROM pg_extension WHERE extname = 'keyhippo'")"
check "... while the library reports its own version" "$CURRENT" \
    "$(q -d fresh -c "SELECT keyhippo_internal.library_version()")"
rm -f "$SCRATCH"

echo "upgrade: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
