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

USER_B=bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb
as_b="DO \$\$ BEGIN PERFORM set_config('request.jwt.claims', '{\"sub\":\"$USER_B\",\"role\":\"authenticated\"}', false); END \$\$; SET ROLE authenticated;"
q -c "INSERT INTO auth.users (id, email) VALUES ('$USER_B', 'b@example.com')"
read -r key_a id_a <<<"$(new_key 'A plain key')"
key_s=$(q -c "$as_a" -c "SELECT api_key FROM keyhippo.create_api_key('A scoped key', 'default')" | tail -1)
q -c "$as_a" -c "SELECT keyhippo.update_key_claims(api_key_id, '{\"plan\": \"pro\"}') FROM (SELECT id AS api_key_id FROM keyhippo.api_key_metadata WHERE description = 'A scoped key') k" >/dev/null
read -r key_r id_r <<<"$(new_key 'A revoked key')"
q -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$id_r')" >/dev/null
read -r key_b id_b <<<"$(q -c "$as_b" -c "SELECT api_key || ' ' || api_key_id FROM keyhippo.create_api_key('B disabled key')" | tail -1)"
q -c "$as_b" -c "SELECT keyhippo.disable_api_key('$id_b')" >/dev/null
# Custom RBAC: a group and role of their own, a permission on it, B assigned; a setting changed;
# a key about to expire (an expiry report in the audit log).
q -c "INSERT INTO keyhippo_rbac.groups (name, description) VALUES ('Support', 'Support staff')" \
  -c "INSERT INTO keyhippo_rbac.roles (name, description, group_id, role_type) SELECT 'Agent', 'Support agent', id, 'user' FROM keyhippo_rbac.groups WHERE name = 'Support'" \
  -c "INSERT INTO keyhippo_rbac.role_permissions (role_id, permission_id) SELECT r.id, p.id FROM keyhippo_rbac.roles r, keyhippo_rbac.permissions p WHERE r.name = 'Agent' AND p.name = 'manage_scopes'" \
  -c "INSERT INTO keyhippo_rbac.user_group_roles (user_id, group_id, role_id) SELECT '$USER_B', r.group_id, r.id FROM keyhippo_rbac.roles r WHERE r.name = 'Agent'" \
  -c "UPDATE keyhippo_internal.config SET value = '30' WHERE key = 'audit_log_retention_days'" \
  -c "UPDATE keyhippo.api_key_metadata SET expires_at = now() + interval '1 hour' WHERE id = '$id_a'" >/dev/null
q -c "SELECT keyhippo.flush_key_usage()" >/dev/null

# Every row of keyhippo's tables and of auth.users, one digest per table.
snapshot() {
    q -d "$1" -c "
SELECT string_agg(tbl || '=' || n || ':' || digest, ' ' ORDER BY tbl) FROM (
  SELECT 'auth.users' tbl, count(*) n, md5(string_agg(t::text, '|' ORDER BY t::text)) digest FROM auth.users t
  UNION ALL SELECT 'api_key_metadata', count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM keyhippo.api_key_metadata t
  UNION ALL SELECT 'api_key_secrets', count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM keyhippo.api_key_secrets t
  UNION ALL SELECT 'scopes', count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM keyhippo.scopes t
  UNION ALL SELECT 'scope_permissions', count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM keyhippo.scope_permissions t
  UNION ALL SELECT 'audit_log', count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM keyhippo.audit_log t
  UNION ALL SELECT 'groups', count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM keyhippo_rbac.groups t
  UNION ALL SELECT 'roles', count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM keyhippo_rbac.roles t
  UNION ALL SELECT 'permissions', count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM keyhippo_rbac.permissions t
  UNION ALL SELECT 'role_permissions', count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM keyhippo_rbac.role_permissions t
  UNION ALL SELECT 'user_group_roles', count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM keyhippo_rbac.user_group_roles t
  UNION ALL SELECT 'config', count(*), md5(string_agg(t::text, '|' ORDER BY t::text)) FROM keyhippo_internal.config t
) s"
}
original=$(snapshot kh)
check "the original holds an expiry report" 1 \
    "$(q -c "SELECT count(*) FROM keyhippo.audit_log WHERE action = 'expiring_key'")"

# What a restored database must answer as the original does.
restored_checks() { # database format
    local db=$1 fmt=$2
    check "$fmt: every keyhippo table and auth.users exactly as in the original" "$original" "$(snapshot "$db")"
    check "$fmt: keys verify for their owners" "$USER_A|$USER_A|{\"plan\": \"pro\"}" \
        "$(q -d "$db" -c "SELECT (SELECT user_id FROM keyhippo.verify_api_key('$key_a')) || '|' || (SELECT user_id FROM keyhippo.verify_api_key('$key_s')) || '|' || (SELECT m.claims FROM keyhippo.api_key_metadata m JOIN keyhippo.verify_api_key_status('$key_s') s ON s.api_key_id = m.id)")"
    check "$fmt: the revoked key stays revoked, the disabled one disabled" "NOT_FOUND DISABLED" \
        "$(q -d "$db" -c "SELECT (SELECT status FROM keyhippo.verify_api_key_status('$key_r')) || ' ' || (SELECT status FROM keyhippo.verify_api_key_status('$key_b'))")"
    check "$fmt: B's custom role gives the same answer" "t f" \
        "$(q -d "$db" -c "$as_b" -c "SELECT keyhippo.authorize('manage_scopes') || ' ' || keyhippo.authorize('manage_groups')" | tail -1 | sed 's/true/t/; s/false/f/g')"
    check "$fmt: linked to auth.users (foreign keys, user check)" "2 plpgsql" \
        "$(q -d "$db" -c "SELECT (SELECT count(*) FROM pg_constraint WHERE conname IN ('api_key_metadata_user_id_fkey', 'user_group_roles_user_id_fkey')) || ' ' || (SELECT l.lanname FROM pg_proc p JOIN pg_language l ON l.oid = p.prolang WHERE p.oid = 'keyhippo_internal.user_exists(uuid)'::regprocedure)")"
    check "$fmt: a new user gets the default role once" 1 \
        "$(q -d "$db" -c "INSERT INTO auth.users (id) VALUES ('cccccccc-cccc-4ccc-8ccc-cccccccccccc')" -c "SELECT count(*) FROM keyhippo_rbac.user_group_roles WHERE user_id = 'cccccccc-cccc-4ccc-8ccc-cccccccccccc'")"
    check "$fmt: RBAC rows can be added after the restore" 1 \
        "$(q -d "$db" -c "INSERT INTO keyhippo_rbac.role_permissions (role_id, permission_id) SELECT r.id, p.id FROM keyhippo_rbac.roles r, keyhippo_rbac.permissions p WHERE r.name = 'Agent' AND p.name = 'manage_groups' RETURNING 1")"
    check "$fmt: new keys can be made, and deleting a user deletes their keys" "1 0" \
        "$(q -d "$db" -c "$as_a" -c "SELECT count(*) FROM keyhippo.create_api_key('after restore')" -c "RESET ROLE" -c "DELETE FROM auth.users WHERE id = '$USER_A'" -c "SELECT count(*) FROM keyhippo.api_key_metadata WHERE user_id = '$USER_A'" | tr '\n' ' ' | sed 's/ $//')"
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
