# Shared by the shell test suites (tests/concurrency.sh, tests/last_used.sh); source it after
# setting PGPORT.
[ -n "${PGBIN:-}" ] || . "$ROOT/bin/env.sh"
export PGHOST=127.0.0.1 PGUSER=postgres PGDATABASE=kh

q() { "$PGBIN/psql" -X -q -t -A -v ON_ERROR_STOP=1 "$@"; }

# Database kh with the Supabase-shaped fixture, any extra extensions named, then keyhippo, and
# user A.
setup_kh() {
    q -d postgres -c 'CREATE DATABASE kh'
    for ext in "$@"; do q -c "CREATE EXTENSION $ext"; done
    q -f tests/fixtures/supabase.sql -c 'CREATE EXTENSION keyhippo' >/dev/null
    q -c "INSERT INTO auth.users (id, email) VALUES ('$USER_A', 'a@example.com')"
}

USER_A=aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa
# A request of user A, as PostgREST runs it: claims, then the role.
as_a="DO \$\$ BEGIN PERFORM set_config('request.jwt.claims', '{\"sub\":\"$USER_A\",\"role\":\"authenticated\"}', false); END \$\$; SET ROLE authenticated;"
# Creates a key for user A; prints "key id".
new_key() { q -c "$as_a" -c "SELECT api_key || ' ' || api_key_id FROM keyhippo.create_api_key('$1')" | tail -1; }

# psql before 15 shows only the last result of a -c holding several statements.
SET_CONFIG_SHOWN=""
[ "$("$PGBIN/psql" --version | sed -E 's/.* ([0-9]+)\..*/\1/')" -ge 15 ] && SET_CONFIG_SHOWN="f "
# The failed transactions pgbench reports in log $1 (pgbench 15 and later count them; before,
# a failing transaction aborts its client, which the log says).
failed_transactions() {
    if grep -qE '^number of failed transactions' "$1"; then
        grep -E '^number of failed transactions' "$1" | sed -E 's/[^:]*: ([0-9]+).*/\1/'
    else
        grep -c 'aborted in command' "$1"
    fi
}

passed=0 failed=0
check() { # name expected actual
    if [ "$2" = "$3" ]; then passed=$((passed + 1)); echo "ok   - $1"
    else failed=$((failed + 1)); echo "FAIL - $1: expected '$2', got '$3'"; fi
}
