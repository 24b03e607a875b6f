# Shared by the shell test suites (tests/*.sh); source it after setting PGPORT.
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

# Load while the library is replaced under a running server: key $1 verified for $2 seconds
# by two connections, and by one opening a new connection (so loading the library) for each
# verify; pgbench's logs go to directory $3. Returns once it runs; check_verify_load waits
# for it.
start_verify_load() {
    load_dir=$3
    echo "SELECT count(*) FROM keyhippo.verify_api_key('$1');" >"$load_dir/verify.sql"
    "$PGBIN/pgbench" -n -M prepared -c 2 -j 1 -T "$2" -f "$load_dir/verify.sql" kh >"$load_dir/load.log" 2>&1 &
    load_pid=$!
    "$PGBIN/pgbench" -n -C -c 1 -j 1 -T "$2" -f "$load_dir/verify.sql" kh >"$load_dir/connect.log" 2>&1 &
    connect_pid=$!
    sleep 1
}
# Checks that load: both pgbench runs succeeded, the new connections ran transactions, and no
# server process crashed (server log $2). $1 says what happened meanwhile ("the installs").
check_verify_load() {
    local load_status connect_status
    wait "$load_pid"; load_status=$?
    wait "$connect_pid"; connect_status=$?
    check "verify load during $1: pgbench succeeded" 0 "$load_status"
    check "new connections during $1: pgbench succeeded" 0 "$connect_status"
    check "... and ran transactions" yes \
        "$(grep -qE '^number of transactions actually processed: [1-9]' "$load_dir/connect.log" && echo yes || echo no)"
    check "no server process crashed" 0 "$(grep -cE 'terminated by signal|was terminated|unrecognized function API version' "$2")"
}

USER_B=bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb
as_b="DO \$\$ BEGIN PERFORM set_config('request.jwt.claims', '{\"sub\":\"$USER_B\",\"role\":\"authenticated\"}', false); END \$\$; SET ROLE authenticated;"

# Data of every kind in database kh (made by setup_kh): keys plain, scoped with claims, revoked,
# disabled and imported from elsewhere (key_a, key_s, key_r, key_b, key_i), user B with a custom group, role and
# permission, a changed setting, an expiry report and a use in the audit log. Uses only SQL
# that every released keyhippo version has.
sample_data() {
    q -c "INSERT INTO auth.users (id, email) VALUES ('$USER_B', 'b@example.com')"
    read -r key_a id_a <<<"$(new_key 'A plain key')"
    key_s=$(q -c "$as_a" -c "SELECT api_key FROM keyhippo.create_api_key('A scoped key', 'default')" | tail -1)
    q -c "$as_a" -c "SELECT keyhippo.update_key_claims(id, '{\"plan\": \"pro\"}') FROM keyhippo.api_key_metadata WHERE description = 'A scoped key'" >/dev/null
    read -r key_r id_r <<<"$(new_key 'A revoked key')"
    q -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$id_r')" >/dev/null
    read -r key_b id_b <<<"$(q -c "$as_b" -c "SELECT api_key || ' ' || api_key_id FROM keyhippo.create_api_key('B disabled key')" | tail -1)"
    q -c "$as_b" -c "SELECT keyhippo.disable_api_key('$id_b')" >/dev/null
    key_i=ext_live_0123456789abcdef
    q -c "SELECT keyhippo.import_api_key('$USER_B', 'sha256\$' || encode(sha256('$key_i'), 'hex'), 'ext_live_', 'Imported key')" >/dev/null
    q -c "INSERT INTO keyhippo_rbac.groups (name, description) VALUES ('Support', 'Support staff')" \
      -c "INSERT INTO keyhippo_rbac.roles (name, description, group_id, role_type) SELECT 'Agent', 'Support agent', id, 'user' FROM keyhippo_rbac.groups WHERE name = 'Support'" \
      -c "INSERT INTO keyhippo_rbac.role_permissions (role_id, permission_id) SELECT r.id, p.id FROM keyhippo_rbac.roles r, keyhippo_rbac.permissions p WHERE r.name = 'Agent' AND p.name = 'manage_scopes'" \
      -c "INSERT INTO keyhippo_rbac.user_group_roles (user_id, group_id, role_id) SELECT '$USER_B', r.group_id, r.id FROM keyhippo_rbac.roles r WHERE r.name = 'Agent'" \
      -c "UPDATE keyhippo_internal.config SET value = '30' WHERE key = 'audit_log_retention_days'" \
      -c "UPDATE keyhippo.api_key_metadata SET expires_at = now() + interval '1 hour' WHERE id = '$id_a'" >/dev/null
    q -c "SELECT keyhippo.verify_api_key('$key_a')" -c "SELECT keyhippo.flush_key_usage()" >/dev/null
}

# Records, in table public.kh_columns of database $1, the columns every table of auth and of
# keyhippo's schemas has now: snapshot compares those columns only (an update may add some).
remember_columns() {
    q -d "$1" -c "SET client_min_messages = warning" -c "DROP TABLE IF EXISTS public.kh_columns" -c "
CREATE TABLE public.kh_columns AS
SELECT c.oid::regclass::text AS tbl, array_agg(a.attname::text ORDER BY a.attnum) AS cols
  FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped
 WHERE c.relkind IN ('r', 'p')
   AND c.relnamespace::regnamespace::text IN ('auth', 'keyhippo', 'keyhippo_rbac', 'keyhippo_internal', 'keyhippo_impersonation')
 GROUP BY c.oid"
}

# Every row of the tables remember_columns listed, in database $1: "table=rows:digest ...".
snapshot() {
    printf '%s\n\\gexec\n' "
SELECT format('SELECT %L || ''='' || count(*) || '':'' || COALESCE(md5(string_agg(r, ''|'' ORDER BY r)), ''-'')
                 FROM (SELECT (SELECT jsonb_object_agg(k, v) FROM jsonb_each(to_jsonb(t)) AS e(k, v) WHERE k = ANY (%L::text[]))::text AS r
                         FROM %s t) x', tbl, cols, tbl)
  FROM public.kh_columns ORDER BY tbl" | q -d "$1" | tr '\n' ' ' | sed 's/ $//'
}

# What a database holding sample_data's data must answer (after a restore, after an update):
# database $1, checks named after $2.
sample_checks() {
    local db=$1 label=$2
    check "$label: keys verify for their owners" "$USER_A|$USER_A|{\"plan\": \"pro\"}" \
        "$(q -d "$db" -c "SELECT (SELECT user_id FROM keyhippo.verify_api_key('$key_a')) || '|' || (SELECT user_id FROM keyhippo.verify_api_key('$key_s')) || '|' || (SELECT m.claims FROM keyhippo.api_key_metadata m JOIN keyhippo.verify_api_key_status('$key_s') s ON s.api_key_id = m.id)")"
    check "$label: the revoked key stays revoked, the disabled one disabled; the imported one verifies" \
        "NOT_FOUND DISABLED $USER_B" \
        "$(q -d "$db" -c "SELECT (SELECT status FROM keyhippo.verify_api_key_status('$key_r')) || ' ' || (SELECT status FROM keyhippo.verify_api_key_status('$key_b')) || ' ' || (SELECT user_id FROM keyhippo.verify_api_key('$key_i'))")"
    check "$label: B's custom role gives the same answer" "t f" \
        "$(q -d "$db" -c "$as_b" -c "SELECT keyhippo.authorize('manage_scopes') || ' ' || keyhippo.authorize('manage_groups')" | tail -1 | sed 's/true/t/; s/false/f/g')"
    check "$label: linked to auth.users (foreign keys, user check)" "2 plpgsql" \
        "$(q -d "$db" -c "SELECT (SELECT count(*) FROM pg_constraint WHERE conname IN ('api_key_metadata_user_id_fkey', 'user_group_roles_user_id_fkey')) || ' ' || (SELECT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE p.oid = 'keyhippo_internal.user_exists(uuid)'::regprocedure)")"
    check "$label: a new user gets the default role once" 1 \
        "$(q -d "$db" -c "INSERT INTO auth.users (id) VALUES ('cccccccc-cccc-4ccc-8ccc-cccccccccccc')" -c "SELECT count(*) FROM keyhippo_rbac.user_group_roles WHERE user_id = 'cccccccc-cccc-4ccc-8ccc-cccccccccccc'")"
    check "$label: RBAC rows can be added" 1 \
        "$(q -d "$db" -c "INSERT INTO keyhippo_rbac.role_permissions (role_id, permission_id) SELECT r.id, p.id FROM keyhippo_rbac.roles r, keyhippo_rbac.permissions p WHERE r.name = 'Agent' AND p.name = 'manage_groups' RETURNING 1")"
    check "$label: new keys can be made, and deleting a user deletes their keys" "1 0" \
        "$(q -d "$db" -c "$as_a" -c "SELECT count(*) FROM keyhippo.create_api_key('after')" -c "RESET ROLE" -c "DELETE FROM auth.users WHERE id = '$USER_A'" -c "SELECT count(*) FROM keyhippo.api_key_metadata WHERE user_id = '$USER_A'" | tr '\n' ' ' | sed 's/ $//')"
}
