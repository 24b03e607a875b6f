#!/usr/bin/env bash
# The migration from KeyHippo 1.2.5 (sql/migrate_from_keyhippo_1.2.5.sql) on a database built
# from tests/fixtures/keyhippo_1.2.5.sql, with keys made the 1.2.5 way, custom RBAC, an
# application policy and view that call 1.2.5's functions, and descriptions 1.2.5 never checked.
# Needs the extension installed into the private build (bin/install). Ends with
# "migrate: N passed, N failed".
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PORT=${MIGRATE_PORT:-55448}
. bin/env.sh
EXTRA_CONF="shared_preload_libraries = 'keyhippo'" bin/cluster start migrate "$PORT" || exit 1
trap 'bin/cluster stop migrate' EXIT
PORT=$(bin/cluster port migrate)
export PGPORT=$PORT
. tests/lib.sh

USER_B=bbbbbbbb-bbbb-4bbb-8bbb-bbbbbbbbbbbb
as_b="DO \$\$ BEGIN PERFORM set_config('request.jwt.claims', '{\"sub\":\"$USER_B\",\"role\":\"authenticated\"}', false); END \$\$; SET ROLE authenticated;"
with_key() { echo "DO \$\$ BEGIN PERFORM set_config('request.jwt.claims', '{\"role\":\"anon\"}', false); PERFORM set_config('request.headers', json_build_object('x-api-key', '$1')::text, false); END \$\$; SET ROLE anon;"; }
# Every permission and whether the current request holds it.
answers="SELECT string_agg(p::text || '=' || keyhippo.authorize(p), ',' ORDER BY p) FROM unnest(enum_range(NULL::keyhippo.app_permission)) p"

# A database as 1.2.5 left it. $1: its name.
legacy_db() {
    q -d postgres -c "CREATE DATABASE $1"
    q -d "$1" -f tests/fixtures/supabase.sql -f tests/fixtures/keyhippo_1.2.5.sql >/dev/null 2>&1
    q -d "$1" -c "INSERT INTO auth.users (id, email) VALUES ('$USER_A', 'a@example.com'), ('$USER_B', 'b@example.com')" \
      -c "INSERT INTO keyhippo_rbac.groups (name, description) VALUES ('Support', 'Support staff')" \
      -c "INSERT INTO keyhippo_rbac.roles (name, description, group_id) SELECT 'Agent', 'Support agent', id FROM keyhippo_rbac.groups WHERE name = 'Support'" \
      -c "INSERT INTO keyhippo_rbac.role_permissions (role_id, permission_id) SELECT r.id, p.id FROM keyhippo_rbac.roles r, keyhippo_rbac.permissions p WHERE r.name = 'Agent' AND p.name = 'manage_scopes'" \
      -c "INSERT INTO keyhippo_rbac.user_group_roles (user_id, group_id, role_id) SELECT '$USER_B', group_id, id FROM keyhippo_rbac.roles WHERE name = 'Agent'" \
      -c "INSERT INTO keyhippo.audit_log (action, table_name, data) VALUES ('INSERT', 'groups', '{\"new_data\": {\"name\": \"Support\"}}'), ('expiring_key', 'api_key_metadata', '{\"event\": \"expiring_key\"}')" \
      -c "UPDATE keyhippo_internal.config SET value = '48' WHERE key = 'key_expiry_notification_hours'" \
      -c "CREATE TABLE public.notes (id int PRIMARY KEY, owner uuid NOT NULL, body text)" \
      -c "INSERT INTO public.notes VALUES (1, '$USER_A', 'A one'), (2, '$USER_B', 'B one')" \
      -c "ALTER TABLE public.notes ENABLE ROW LEVEL SECURITY" \
      -c "GRANT SELECT ON public.notes TO anon, authenticated" \
      -c "CREATE POLICY notes_owner ON public.notes FOR SELECT TO anon, authenticated USING (owner = (SELECT user_id FROM keyhippo.current_user_context()))" \
      -c "CREATE VIEW public.key_count AS SELECT count(*) AS keys FROM keyhippo.api_key_metadata" \
      -c "GRANT SELECT ON public.key_count TO service_role" >/dev/null
}

legacy_db legacy
# 1.2.5's one line for PostgREST, for the whole cluster.
q -d legacy -c "ALTER ROLE authenticator SET pgrst.db_pre_request = 'keyhippo.check_request'"
key1=$(q -d legacy -c "SELECT keyhippo.create_api_key_125('$USER_A', 'plain key')")
key2=$(q -d legacy -c "SELECT keyhippo.create_api_key_125('$USER_A', 'scoped key', 'default')")
q -d legacy -c "UPDATE keyhippo.api_key_metadata SET claims = '{\"plan\": \"pro\"}' WHERE description = 'scoped key'"
key3=$(q -d legacy -c "SELECT keyhippo.create_api_key_125('$USER_A', 'revoked key')")
q -d legacy -c "UPDATE keyhippo.api_key_metadata SET is_revoked = true WHERE description = 'revoked key'" \
  -c "DELETE FROM keyhippo.api_key_secrets WHERE key_metadata_id = (SELECT id FROM keyhippo.api_key_metadata WHERE description = 'revoked key')"
key4=$(q -d legacy -c "SELECT keyhippo.create_api_key_125('$USER_A', 'Ünïcode & symbols! ' || repeat('x', 300))")
key5=$(q -d legacy -c "SELECT keyhippo.create_api_key_125('$USER_B', 'B key')")
check "1.2.5 keys have 1.2.5's shape" "160 160" "${#key1} ${#key5}"
check "1.2.5: its own verify accepts the key" "$USER_A" "$(q -d legacy -c "SELECT user_id FROM keyhippo.verify_api_key('$key1')")"
before_b=$(q -d legacy -c "$as_b" -c "$answers" | tail -1)
before_counts=$(q -d legacy -c "SELECT (SELECT count(*) FROM keyhippo.api_key_metadata) || ' ' || (SELECT count(*) FROM keyhippo.scopes) || ' ' || (SELECT count(*) FROM keyhippo_rbac.groups) || ' ' || (SELECT count(*) FROM keyhippo_rbac.roles) || ' ' || (SELECT count(*) FROM keyhippo_rbac.role_permissions) || ' ' || (SELECT count(*) FROM keyhippo_rbac.user_group_roles)")
before_rows=$(q -d legacy -c "SELECT md5(string_agg(id::text || user_id::text || prefix || created_at || expires_at || is_revoked || coalesce(scope_id::text, ''), '|' ORDER BY id)) FROM keyhippo.api_key_metadata")
before_audit=$(q -d legacy -c "SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM keyhippo.audit_log t")

# A database whose application uses 1.2.5 in a way the migration cannot carry over: it stops,
# says what, and changes nothing.
legacy_db blocked
q -d blocked -c "ALTER TABLE public.notes ADD COLUMN may_manage boolean DEFAULT keyhippo.authorize('manage_api_keys')"
out=$(q -d blocked -v ON_ERROR_STOP=1 -f sql/migrate_from_keyhippo_1.2.5.sql 2>&1); rc=$?
check "an unsupported dependency stops the migration, naming it" "yes" \
    "$([ "$rc" -ne 0 ] && grep -q 'default value for column may_manage' <<<"$out" && echo yes || echo "no (rc $rc: $out)")"
check "... and leaves the database as it was" "1.2.5 0" \
    "$(q -d blocked -c "SELECT (SELECT CASE WHEN to_regclass('keyhippo.api_key_secrets') IS NOT NULL AND to_regnamespace('keyhippo_1_2_5') IS NULL THEN '1.2.5' END) || ' ' || (SELECT count(*) FROM pg_extension WHERE extname = 'keyhippo')")"

out=$(q -d legacy -v ON_ERROR_STOP=1 -f sql/migrate_from_keyhippo_1.2.5.sql 2>&1); rc=$?
check "the migration runs" "0" "$rc${out:+ $out}"
check "keyhippo installed, 1.2.5's schemas gone" "1 0" \
    "$(q -d legacy -c "SELECT (SELECT count(*) FROM pg_extension WHERE extname = 'keyhippo') || ' ' || (SELECT count(*) FROM pg_namespace WHERE nspname LIKE '%1_2_5')")"
check "every key, scope, group, role and assignment carried over" "$before_counts" \
    "$(q -d legacy -c "SELECT (SELECT count(*) FROM keyhippo.api_key_metadata) || ' ' || (SELECT count(*) FROM keyhippo.scopes) || ' ' || (SELECT count(*) FROM keyhippo_rbac.groups) || ' ' || (SELECT count(*) FROM keyhippo_rbac.roles) || ' ' || (SELECT count(*) FROM keyhippo_rbac.role_permissions) || ' ' || (SELECT count(*) FROM keyhippo_rbac.user_group_roles)")"
check "... with their ids, owners, prefixes, times, scopes and revoked state" "$before_rows" \
    "$(q -d legacy -c "SELECT md5(string_agg(id::text || user_id::text || prefix || created_at || expires_at || is_revoked || coalesce(scope_id::text, ''), '|' ORDER BY id)) FROM keyhippo.api_key_metadata")"
check "1.2.5's audit rows are all there" "$before_audit" \
    "$(q -d legacy -c "SELECT md5(string_agg(t::text, '|' ORDER BY id)) FROM keyhippo.audit_log t WHERE function_name IS DISTINCT FROM 'migrate_from_keyhippo_1.2.5'")"
check "the old plaintext keys verify for their owners" "$USER_A $USER_A $USER_B" \
    "$(q -d legacy -c "SELECT (SELECT user_id FROM keyhippo.verify_api_key('$key1')) || ' ' || (SELECT user_id FROM keyhippo.verify_api_key('$key2')) || ' ' || (SELECT user_id FROM keyhippo.verify_api_key('$key5'))")"
check "the scoped key keeps its scope and claims" "default {\"plan\": \"pro\"}" \
    "$(q -d legacy -c "SELECT s.name || ' ' || m.claims FROM keyhippo.verify_api_key_status('$key2') v JOIN keyhippo.api_key_metadata m ON m.id = v.api_key_id JOIN keyhippo.scopes s ON s.id = m.scope_id")"
check "the revoked key stays revoked" "NOT_FOUND true revoked" \
    "$(q -d legacy -c "SELECT (SELECT status FROM keyhippo.verify_api_key_status('$key3')) || ' ' || is_revoked || ' ' || revoked_reason FROM keyhippo.api_key_metadata WHERE description = 'revoked key'")"
check "a description 1.2.5 never checked: rewritten to fit, audited, the key verifies" "255 1 $USER_A" \
    "$(q -d legacy -c "SELECT length(m.description) || ' ' || (SELECT count(*) FROM keyhippo.audit_log a WHERE a.action = 'migrated_description' AND a.data ->> 'id' = m.id::text) || ' ' || (SELECT user_id FROM keyhippo.verify_api_key('$key4')) FROM keyhippo.api_key_metadata m WHERE m.description LIKE '_n_code _ symbols_ %'")"
check "the hashes are stored under 1.2.5's algorithm name" "4" \
    "$(q -d legacy -c "SELECT count(*) FROM keyhippo.api_key_secrets WHERE key_hash LIKE 'keyhippo125\$%'")"
check "B's roles give the same authorize answers as before" "$before_b" "$(q -d legacy -c "$as_b" -c "$answers" | tail -1)"
check "the application's policy now calls keyhippo: a key's request sees its owner's rows" "A one" \
    "$(q -d legacy -c "$(with_key "$key1")" -c "SELECT body FROM public.notes ORDER BY id" | tail -1)"
check "the application's view is back, with its grants" "5 true" \
    "$(q -d legacy -c "SELECT (SELECT keys FROM public.key_count) || ' ' || has_table_privilege('service_role', 'public.key_count', 'SELECT')")"
check "PostgREST's hook (kept from 1.2.5) admits anonymous requests without a key, as before" "admitted" \
    "$(q -d legacy -c "SET ROLE anon" -c "SELECT keyhippo.check_request()" -c "SELECT 'admitted'" | tail -1)"
check "settings: kept, the vendor's endpoint and installation id dropped" "48 0" \
    "$(q -d legacy -c "SELECT (SELECT value FROM keyhippo_internal.config WHERE key = 'key_expiry_notification_hours') || ' ' || (SELECT count(*) FROM keyhippo_internal.config WHERE key IN ('installation_uuid', 'send_installation_notification', 'audit_log_endpoint'))")"
check "a new user still gets the default role, once" 1 \
    "$(q -d legacy -c "INSERT INTO auth.users (id) VALUES ('cccccccc-cccc-4ccc-8ccc-cccccccccccc')" -c "SELECT count(*) FROM keyhippo_rbac.user_group_roles WHERE user_id = 'cccccccc-cccc-4ccc-8ccc-cccccccccccc'")"
check "rotating a 1.2.5 key issues a keyhippo key; the old one stops" "kh_ 0" \
    "$(q -d legacy -c "$as_a" -c "SELECT left(new_api_key, 3) FROM keyhippo.rotate_api_key((SELECT api_key_id FROM keyhippo.verify_api_key_status('$key1')))" -c "RESET ROLE" -c "SELECT count(*) FROM keyhippo.verify_api_key('$key1')" | tr '\n' ' ' | sed 's/ $//')"
out=$(q -d legacy -v ON_ERROR_STOP=1 -f sql/migrate_from_keyhippo_1.2.5.sql 2>&1); rc=$?
check "a second run stops with a clear error" "yes" \
    "$([ "$rc" -ne 0 ] && grep -q 'already has the keyhippo extension' <<<"$out" && echo yes || echo "no (rc $rc)")"
check "... and changes nothing" "$USER_A" "$(q -d legacy -c "SELECT user_id FROM keyhippo.verify_api_key('$key2')")"

echo "migrate: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
