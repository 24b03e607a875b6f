-- keyhippo finalize: runs after the Rust functions exist. Helpers written in SQL, triggers,
-- Row Level Security, grants, and the default data.
--
-- Every SECURITY DEFINER function pins search_path to pg_catalog, pg_temp and names every
-- object with its schema.

-- Who may manage every key and every RBAC object: keyhippo_internal.caller_is_admin() (in
-- Rust, src/caller.rs): service_role, a superuser, or a user holding an RBAC role of type
-- 'admin' through their JWT, an impersonation or an unscoped key of theirs, or a JWT whose own
-- sub is the identity and whose user_role claim is 'admin' (Supabase's custom access token
-- hook). Holding manage_api_keys is not enough (every default user holds it), a scoped key never
-- is an admin's, and a user_role claim never lends its rights to a key sent beside it.

-- Whether the role the request runs as may remove the last admin assignment: the database owner
-- (or a superuser) and service_role.
CREATE FUNCTION keyhippo_internal.caller_owns_database() RETURNS boolean
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_role name := keyhippo_internal.caller_role_name();
BEGIN
    RETURN v_role = 'service_role'
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles r WHERE r.rolname = v_role AND r.rolsuper)
        OR pg_catalog.pg_has_role(v_role, 'pg_database_owner', 'MEMBER');
END
$$;

-- Authorization ---------------------------------------------------------------------------------

-- Whether the current request holds a permission: through its API key's scope, the user's RBAC
-- roles, or the JWT's user_role claim.
CREATE FUNCTION keyhippo.authorize(requested_permission keyhippo.app_permission) RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN COALESCE(keyhippo_internal.has_permission(requested_permission::text), false);
END
$$;

-- KeyHippo's table-flavoured check: whether the current request holds the named permission.
-- An unknown permission name is never held. The resource must exist (it is a regclass) and is
-- otherwise not consulted: table privileges remain Postgres' own business.
CREATE FUNCTION keyhippo.is_authorized(target_resource regclass, required_permission text)
RETURNS boolean
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN target_resource IS NOT NULL
       AND required_permission IN (
               SELECT e::text
                 FROM pg_catalog.unnest(pg_catalog.enum_range(NULL::keyhippo.app_permission)) e)
       AND COALESCE(keyhippo_internal.has_permission(required_permission), false);
END
$$;

-- Raises 42501 unless the caller is an admin or holds the permission.
CREATE FUNCTION keyhippo_internal.require_permission(p_permission keyhippo.app_permission)
RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF keyhippo_internal.caller_is_admin() OR keyhippo.authorize(p_permission) THEN
        RETURN;
    END IF;
    RAISE EXCEPTION 'keyhippo: permission denied: this requires %', p_permission
        USING ERRCODE = '42501',
              HINT = 'Ask an administrator for a role that grants it.';
END
$$;

-- PostgREST's db-pre-request hook (switched on by keyhippo.enable_postgrest_check()). A request
-- that presents a key in x-api-key is admitted only if the key is VALID; otherwise HTTP 401
-- whose JSON body says why in "details": "expired", "disabled" or "invalid". A request without
-- a key passes as its role (anon, or the user of its JWT), unless keyhippo.require_api_key is on:
-- then an anonymous request without a key is refused ("missing"). A valid key whose rate limit
-- or credits are used up: HTTP 429 with a Retry-After header (up to the window's end, or the next
-- refill), the body naming the limit. A JWT API key (claim
-- type = 'api_key') that PostgREST accepted by its signature must still be live: known,
-- unrevoked, unexpired, enabled. The role is read with GetOuterUserId() (caller_role_name):
-- inside this SECURITY DEFINER function current_role is the owner, which is why KeyHippo 1.2.5's
-- hook never refused anything.
CREATE FUNCTION keyhippo.check_request() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_status text;
    v_reason text;
BEGIN
    -- A JWT API key first (NULL when the JWT is none); a key in x-api-key beside a live one
    -- must be valid too.
    v_status := keyhippo_internal.jwt_api_key_status();
    IF v_status IS NULL OR v_status = 'VALID' THEN
        v_status := COALESCE(keyhippo_internal.header_key_status(), v_status);
    END IF;
    BEGIN
        IF v_status = 'VALID' THEN
            RETURN;
        ELSIF v_status IN ('RATE_LIMITED', 'USAGE_EXCEEDED') THEN
            PERFORM keyhippo_internal.refuse_request(keyhippo_internal.rate_limit_refusal());
        ELSIF v_status IS NOT NULL THEN
            v_reason := CASE v_status WHEN 'EXPIRED' THEN 'expired'
                                      WHEN 'DISABLED' THEN 'disabled'
                                      ELSE 'invalid' END;
        ELSIF keyhippo_internal.caller_role_name() = 'anon'
              AND pg_catalog.current_setting('keyhippo.require_api_key', true) = 'on' THEN
            v_reason := 'missing';
        ELSE
            RETURN;
        END IF;
    END;
    RAISE SQLSTATE 'PGRST' USING
        MESSAGE = pg_catalog.jsonb_build_object(
            'code', 'KH401',
            'message', CASE v_reason WHEN 'missing' THEN 'missing API key'
                                     WHEN 'expired' THEN 'API key expired'
                                     WHEN 'disabled' THEN 'API key disabled'
                                     ELSE 'invalid API key' END,
            'details', v_reason,
            'hint', CASE v_reason WHEN 'expired' THEN 'The key has expired; use a current key.'
                                  WHEN 'disabled' THEN 'The key is disabled; its owner can enable it again.'
                                  ELSE 'Send a valid API key in the x-api-key header.' END)::text,
        DETAIL = '{"status":401,"headers":{"WWW-Authenticate":"ApiKey"}}';
END
$$;

-- Switching the hook on and off: for this database only, through a setting of PostgREST's login
-- role in this database (ALTER ROLE authenticator IN DATABASE ...), and PostgREST is told to
-- reload its configuration. CREATE EXTENSION changes no role; this is the one call that does.
CREATE FUNCTION keyhippo.enable_postgrest_check(require_api_key boolean DEFAULT false)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticator') THEN
        RAISE EXCEPTION 'keyhippo: there is no role "authenticator" (PostgREST''s login role)'
            USING ERRCODE = '42704',
                  HINT = 'Create the role PostgREST logs in as, or set db-pre-request = "keyhippo.check_request" in PostgREST''s own configuration.';
    END IF;
    EXECUTE pg_catalog.format('ALTER ROLE authenticator IN DATABASE %I SET pgrst.db_pre_request = %L',
                              pg_catalog.current_database(), 'keyhippo.check_request');
    IF COALESCE(require_api_key, false) THEN
        EXECUTE pg_catalog.format('ALTER ROLE authenticator IN DATABASE %I SET keyhippo.require_api_key = on',
                                  pg_catalog.current_database());
    ELSE
        EXECUTE pg_catalog.format('ALTER ROLE authenticator IN DATABASE %I RESET keyhippo.require_api_key',
                                  pg_catalog.current_database());
    END IF;
    NOTIFY pgrst, 'reload config';
END
$$;

CREATE FUNCTION keyhippo.disable_postgrest_check() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticator') THEN
        RETURN;
    END IF;
    EXECUTE pg_catalog.format('ALTER ROLE authenticator IN DATABASE %I RESET pgrst.db_pre_request',
                              pg_catalog.current_database());
    EXECUTE pg_catalog.format('ALTER ROLE authenticator IN DATABASE %I RESET keyhippo.require_api_key',
                              pg_catalog.current_database());
    -- A setting for every database (KeyHippo 1.2.5 ran ALTER ROLE authenticator SET ...) is not
    -- this database's to remove: say so.
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_db_role_setting s
                 JOIN pg_catalog.pg_roles r ON r.oid = s.setrole
                WHERE r.rolname = 'authenticator' AND s.setdatabase = 0
                  AND 'pgrst.db_pre_request=keyhippo.check_request' = ANY (s.setconfig)) THEN
        RAISE WARNING 'keyhippo: role authenticator still runs keyhippo.check_request in every database'
            USING HINT = 'That setting was made for the whole cluster (ALTER ROLE authenticator SET ...); remove it with ALTER ROLE authenticator RESET pgrst.db_pre_request.';
    END IF;
    NOTIFY pgrst, 'reload config';
END
$$;

-- RBAC management -------------------------------------------------------------------------------

CREATE FUNCTION keyhippo_rbac.create_group(p_name text, p_description text) RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET keyhippo_audit.function_name = 'create_group'
AS $$
DECLARE
    v_id uuid;
BEGIN
    PERFORM keyhippo_internal.require_permission('manage_groups');
    IF p_name IS NULL OR pg_catalog.btrim(p_name) = '' THEN
        RAISE EXCEPTION 'keyhippo: a group needs a name' USING ERRCODE = '22023';
    END IF;
    INSERT INTO keyhippo_rbac.groups (name, description) VALUES (p_name, p_description)
    ON CONFLICT (name) DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'keyhippo: a group named "%" already exists', pg_catalog.left(p_name, 64)
            USING ERRCODE = '23505';
    END IF;
    RETURN v_id;
END
$$;

CREATE FUNCTION keyhippo_rbac.create_role(p_name text, p_description text, p_group_id uuid,
                                          p_role_type keyhippo.app_role)
RETURNS uuid
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET keyhippo_audit.function_name = 'create_role'
AS $$
DECLARE
    v_id uuid;
BEGIN
    PERFORM keyhippo_internal.require_permission('manage_roles');
    IF p_role_type = 'admin' AND NOT keyhippo_internal.caller_is_admin() THEN
        RAISE EXCEPTION 'keyhippo: only an administrator may create a role of type admin'
            USING ERRCODE = '42501';
    END IF;
    IF p_name IS NULL OR pg_catalog.btrim(p_name) = '' OR p_role_type IS NULL THEN
        RAISE EXCEPTION 'keyhippo: a role needs a name and a role type' USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM keyhippo_rbac.groups g WHERE g.id = p_group_id) THEN
        RAISE EXCEPTION 'keyhippo: group % does not exist', p_group_id USING ERRCODE = 'P0002';
    END IF;
    INSERT INTO keyhippo_rbac.roles (name, description, group_id, role_type)
    VALUES (p_name, p_description, p_group_id, p_role_type)
    ON CONFLICT (name, group_id) DO NOTHING
    RETURNING id INTO v_id;
    IF v_id IS NULL THEN
        RAISE EXCEPTION 'keyhippo: group % already has a role named "%"', p_group_id,
            pg_catalog.left(p_name, 64)
            USING ERRCODE = '23505';
    END IF;
    RETURN v_id;
END
$$;

CREATE FUNCTION keyhippo_rbac.assign_role_to_user(p_user_id uuid, p_group_id uuid, p_role_id uuid)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET keyhippo_audit.function_name = 'assign_role_to_user'
AS $$
DECLARE
    v_role_type keyhippo.app_role;
BEGIN
    PERFORM keyhippo_internal.require_permission('manage_roles');
    SELECT r.role_type INTO v_role_type
      FROM keyhippo_rbac.roles r WHERE r.id = p_role_id AND r.group_id = p_group_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'keyhippo: no such role in that group'
            USING ERRCODE = 'P0002', HINT = 'p_role_id must name a role whose group_id is p_group_id.';
    END IF;
    IF v_role_type = 'admin' AND NOT keyhippo_internal.caller_is_admin() THEN
        RAISE EXCEPTION 'keyhippo: only an administrator may assign a role of type admin'
            USING ERRCODE = '42501';
    END IF;
    IF NOT COALESCE(keyhippo_internal.user_exists(p_user_id), false) THEN
        RAISE EXCEPTION 'keyhippo: user % does not exist', p_user_id USING ERRCODE = 'P0002';
    END IF;
    INSERT INTO keyhippo_rbac.user_group_roles (user_id, group_id, role_id)
    VALUES (p_user_id, p_group_id, p_role_id)
    ON CONFLICT (user_id, group_id, role_id) DO NOTHING;
END
$$;

CREATE FUNCTION keyhippo_rbac.assign_permission_to_role(p_role_id uuid,
                                                        p_permission_name keyhippo.app_permission)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET keyhippo_audit.function_name = 'assign_permission_to_role'
AS $$
DECLARE
    v_permission_id uuid;
BEGIN
    PERFORM keyhippo_internal.require_permission('manage_permissions');
    IF NOT EXISTS (SELECT 1 FROM keyhippo_rbac.roles r WHERE r.id = p_role_id) THEN
        RAISE EXCEPTION 'keyhippo: role % does not exist', p_role_id USING ERRCODE = 'P0002';
    END IF;
    SELECT p.id INTO v_permission_id FROM keyhippo_rbac.permissions p WHERE p.name = p_permission_name;
    IF v_permission_id IS NULL THEN
        RAISE EXCEPTION 'keyhippo: permission % does not exist; run keyhippo.initialize_keyhippo()',
            p_permission_name USING ERRCODE = 'P0002';
    END IF;
    INSERT INTO keyhippo_rbac.role_permissions (role_id, permission_id)
    VALUES (p_role_id, v_permission_id)
    ON CONFLICT (role_id, permission_id) DO NOTHING;
END
$$;

-- New users get the default User role.
CREATE FUNCTION keyhippo_internal.assign_default_role() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- A dump being loaded brings the user's assignments with it.
    IF keyhippo_internal.restoring() THEN
        RETURN NULL;
    END IF;
    INSERT INTO keyhippo_rbac.user_group_roles (user_id, group_id, role_id)
    SELECT NEW.id, r.group_id, r.id
      FROM keyhippo_rbac.roles r
      JOIN keyhippo_rbac.groups g ON g.id = r.group_id
     WHERE r.name = 'User' AND g.name = 'User Group'
    ON CONFLICT (user_id, group_id, role_id) DO NOTHING;
    RETURN NULL;
END
$$;

DO $auth_trigger$
BEGIN
    IF pg_catalog.to_regclass('auth.users') IS NOT NULL THEN
        CREATE TRIGGER keyhippo_assign_default_role
            AFTER INSERT ON auth.users
            FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.assign_default_role();
    END IF;
END
$auth_trigger$;

-- Restoring a dump ---------------------------------------------------------------------------------

-- pg_dump keeps the rows of keyhippo's tables, and pg_restore loads them after CREATE EXTENSION
-- has made the defaults again (groups, roles, permissions, the default scope, role permissions,
-- configuration). The defaults have the same ids everywhere (initialize_keyhippo), so while a dump
-- is loaded (keyhippo_internal.restoring()) a row whose key is already there updates it instead
-- of failing: a changed setting or description comes back, and nothing is there twice. Outside
-- a restore this trigger does nothing, and an INSERT of an existing key fails as usual.
CREATE FUNCTION keyhippo_internal.merge_restored_row() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT keyhippo_internal.restoring() THEN
        RETURN NEW;
    END IF;
    CASE TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME
    WHEN 'keyhippo_rbac.groups' THEN
        UPDATE keyhippo_rbac.groups t SET name = NEW.name, description = NEW.description
         WHERE t.id = NEW.id;
    WHEN 'keyhippo_rbac.roles' THEN
        UPDATE keyhippo_rbac.roles t
           SET name = NEW.name, description = NEW.description, group_id = NEW.group_id,
               role_type = NEW.role_type
         WHERE t.id = NEW.id;
    WHEN 'keyhippo_rbac.permissions' THEN
        UPDATE keyhippo_rbac.permissions t SET name = NEW.name, description = NEW.description
         WHERE t.id = NEW.id;
    WHEN 'keyhippo.scopes' THEN
        UPDATE keyhippo.scopes t SET name = NEW.name, description = NEW.description
         WHERE t.id = NEW.id;
    WHEN 'keyhippo_internal.config' THEN
        UPDATE keyhippo_internal.config t SET value = NEW.value, description = NEW.description
         WHERE t.key = NEW.key;
    WHEN 'keyhippo_rbac.role_permissions' THEN
        -- Ids of this table come from a sequence, which the restored rows did not advance.
        PERFORM pg_catalog.setval(pg_catalog.pg_get_serial_sequence('keyhippo_rbac.role_permissions', 'id'),
                                  GREATEST(NEW.id, (SELECT max(t.id) FROM keyhippo_rbac.role_permissions t)));
        PERFORM 1 FROM keyhippo_rbac.role_permissions t
         WHERE t.role_id = NEW.role_id AND t.permission_id = NEW.permission_id;
        IF NOT FOUND AND EXISTS (SELECT 1 FROM keyhippo_rbac.role_permissions t WHERE t.id = NEW.id) THEN
            NEW.id := pg_catalog.nextval(pg_catalog.pg_get_serial_sequence('keyhippo_rbac.role_permissions', 'id'));
            RETURN NEW;
        END IF;
    END CASE;
    IF FOUND THEN
        RETURN NULL;
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER keyhippo_merge_restored_row BEFORE INSERT ON keyhippo_rbac.groups
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.merge_restored_row();
CREATE TRIGGER keyhippo_merge_restored_row BEFORE INSERT ON keyhippo_rbac.roles
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.merge_restored_row();
CREATE TRIGGER keyhippo_merge_restored_row BEFORE INSERT ON keyhippo_rbac.permissions
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.merge_restored_row();
CREATE TRIGGER keyhippo_merge_restored_row BEFORE INSERT ON keyhippo_rbac.role_permissions
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.merge_restored_row();
CREATE TRIGGER keyhippo_merge_restored_row BEFORE INSERT ON keyhippo.scopes
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.merge_restored_row();
CREATE TRIGGER keyhippo_merge_restored_row BEFORE INSERT ON keyhippo_internal.config
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.merge_restored_row();

-- A restore creates auth.users after CREATE EXTENSION, and its primary key after loading the
-- data: link keyhippo to it then (foreign keys, user_exists), as the original database was.
-- Checked at the end of every CREATE TABLE and ALTER TABLE until linked (one catalogue lookup);
-- never makes the command fail.
CREATE FUNCTION keyhippo_internal.link_auth_users_on_create() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_constraint
                WHERE conname = 'api_key_metadata_user_id_fkey'
                  AND conrelid = 'keyhippo.api_key_metadata'::pg_catalog.regclass)
       OR pg_catalog.to_regclass('auth.users') IS NULL THEN
        RETURN;
    END IF;
    -- Not before auth.users.id is unique: a foreign key needs that.
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_index i
                     JOIN pg_catalog.pg_attribute a
                       ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0]
                    WHERE i.indrelid = 'auth.users'::pg_catalog.regclass AND i.indisunique
                      AND i.indnatts = 1 AND i.indpred IS NULL AND a.attname = 'id') THEN
        RETURN;
    END IF;
    PERFORM keyhippo_internal.link_auth_users();
EXCEPTION WHEN OTHERS THEN
    RAISE WARNING 'keyhippo: could not link API keys to auth.users: %', SQLERRM
        USING HINT = 'Run SELECT keyhippo_internal.link_auth_users(); as a superuser once the key owners are users of auth.users.';
END
$$;

CREATE EVENT TRIGGER keyhippo_link_auth_users ON ddl_command_end
    WHEN TAG IN ('CREATE TABLE', 'ALTER TABLE')
    EXECUTE FUNCTION keyhippo_internal.link_auth_users_on_create();

-- JWT keys: a table-shaped interface --------------------------------------------------------------

-- One row per JWT key the caller may see: the rows of api_key_metadata its row level security
-- lets the caller see. From PostgreSQL 15 on the view runs with the caller's rights
-- (security_invoker), so the table's policies apply as they are. PostgreSQL 14 has no
-- security_invoker: there the view reads as its owner and applies the same rules itself (the
-- table owner and superusers see every row, service_role every row, authenticated its own
-- rows or, for an admin, every row; nobody else any).
-- token is NULL except in the RETURNING of the INSERT that minted it.
CREATE VIEW keyhippo.jwt_api_keys WITH (security_barrier = true) AS
SELECT m.id, m.id AS jti, m.user_id, m.description, m.created_at, m.expires_at, m.revoked_at,
       NULL::text AS token
  FROM keyhippo.api_key_metadata m
 WHERE m.prefix LIKE 'jwt\_%';
DO $jwt_view$
BEGIN
    IF pg_catalog.current_setting('server_version_num')::int >= 150000 THEN
        ALTER VIEW keyhippo.jwt_api_keys SET (security_invoker = true);
    ELSE
        CREATE OR REPLACE VIEW keyhippo.jwt_api_keys WITH (security_barrier = true) AS
        SELECT m.id, m.id AS jti, m.user_id, m.description, m.created_at, m.expires_at,
               m.revoked_at, NULL::text AS token
          FROM keyhippo.api_key_metadata m
         WHERE m.prefix LIKE 'jwt\_%'
           AND (pg_catalog.pg_has_role(CURRENT_USER,
                    (SELECT c.relowner FROM pg_catalog.pg_class c
                      WHERE c.oid = 'keyhippo.api_key_metadata'::pg_catalog.regclass), 'USAGE')
                OR (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = CURRENT_USER)
                OR pg_catalog.pg_has_role(CURRENT_USER, 'service_role', 'USAGE')
                OR (pg_catalog.pg_has_role(CURRENT_USER, 'authenticated', 'USAGE')
                    AND (m.user_id = (SELECT keyhippo_internal.current_user_id())
                         OR (SELECT keyhippo_internal.caller_is_admin()))));
    END IF;
END
$jwt_view$;

-- INSERT mints a token (description, and expires_at or one year); user_id may be omitted. A row
-- inserted with revoked_at set is revoked at once, and its RETURNING has no token.
CREATE FUNCTION keyhippo_internal.jwt_api_keys_insert() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_token text;
    v_id uuid;
BEGIN
    IF NEW.user_id IS NOT NULL AND NEW.user_id IS DISTINCT FROM keyhippo_internal.current_user_id() THEN
        RAISE EXCEPTION 'keyhippo: an API key can only be created for yourself'
            USING ERRCODE = '42501';
    END IF;
    SELECT k.api_key, k.api_key_id INTO v_token, v_id
      FROM keyhippo.create_jwt_api_key(COALESCE(NEW.description, ''),
                                       NEW.expires_at - pg_catalog.now()) k;
    -- A row inserted already revoked is minted and revoked at once: never a live key.
    IF NEW.revoked_at IS NOT NULL THEN
        PERFORM keyhippo.revoke_api_key(v_id);
        v_token := NULL;
    END IF;
    SELECT m.id, m.id, m.user_id, m.description, m.created_at, m.expires_at, m.revoked_at, v_token
      INTO NEW.id, NEW.jti, NEW.user_id, NEW.description, NEW.created_at, NEW.expires_at,
           NEW.revoked_at, NEW.token
      FROM keyhippo.api_key_metadata m WHERE m.id = v_id;
    RETURN NEW;
END
$$;

-- UPDATE may rename a key or revoke it (SET revoked_at = now()); nothing else.
CREATE FUNCTION keyhippo_internal.jwt_api_keys_update() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.id IS DISTINCT FROM OLD.id OR NEW.jti IS DISTINCT FROM OLD.jti
       OR NEW.user_id IS DISTINCT FROM OLD.user_id OR NEW.created_at IS DISTINCT FROM OLD.created_at
       OR NEW.expires_at IS DISTINCT FROM OLD.expires_at OR NEW.token IS NOT NULL THEN
        RAISE EXCEPTION 'keyhippo: only description and revoked_at of a JWT API key can be changed'
            USING ERRCODE = '42501';
    END IF;
    IF OLD.revoked_at IS NOT NULL AND NEW.revoked_at IS DISTINCT FROM OLD.revoked_at THEN
        RAISE EXCEPTION 'keyhippo: a revoked API key cannot be restored' USING ERRCODE = '55000';
    END IF;
    IF NEW.description IS DISTINCT FROM OLD.description THEN
        UPDATE keyhippo.api_key_metadata SET description = NEW.description WHERE id = OLD.id;
    END IF;
    IF OLD.revoked_at IS NULL AND NEW.revoked_at IS NOT NULL THEN
        PERFORM keyhippo.revoke_api_key(OLD.id);
    END IF;
    SELECT m.description, m.revoked_at INTO NEW.description, NEW.revoked_at
      FROM keyhippo.api_key_metadata m WHERE m.id = OLD.id;
    RETURN NEW;
END
$$;

CREATE FUNCTION keyhippo_internal.jwt_api_keys_delete() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM keyhippo.api_key_metadata WHERE id = OLD.id;
    RETURN OLD;
END
$$;

CREATE TRIGGER jwt_api_keys_insert INSTEAD OF INSERT ON keyhippo.jwt_api_keys
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.jwt_api_keys_insert();
CREATE TRIGGER jwt_api_keys_update INSTEAD OF UPDATE ON keyhippo.jwt_api_keys
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.jwt_api_keys_update();
CREATE TRIGGER jwt_api_keys_delete INSTEAD OF DELETE ON keyhippo.jwt_api_keys
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.jwt_api_keys_delete();

-- Claims ------------------------------------------------------------------------------------------

-- Replaces a key's claims (a JSON object) for its owner or an admin. The document is checked
-- here (22023: not an object, over 64 kB, nested more than 32 levels) before the Rust function
-- (keyhippo_internal.update_key_claims) reads it.
CREATE FUNCTION keyhippo.update_key_claims(key_id uuid, new_claims jsonb) RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF new_claims IS NOT NULL THEN
        IF pg_catalog.jsonb_typeof(new_claims) <> 'object' THEN
            RAISE EXCEPTION 'keyhippo: new_claims must be a JSON object' USING ERRCODE = '22023';
        END IF;
        IF pg_catalog.octet_length(new_claims::text) > 65536 THEN
            RAISE EXCEPTION 'keyhippo: new_claims is larger than 65536 bytes' USING ERRCODE = '22023';
        END IF;
        IF NOT keyhippo_internal.claims_ok(new_claims) THEN
            RAISE EXCEPTION 'keyhippo: new_claims is nested more than 32 levels deep'
                USING ERRCODE = '22023';
        END IF;
    END IF;
    PERFORM keyhippo_internal.update_key_claims(key_id, new_claims);
END
$$;

-- Impersonation (database owner only) ------------------------------------------------------------

-- Act as a user of auth.users (or any user id on plain Postgres) for up to one hour: the
-- session switches to role authenticated and keyhippo's context resolves to that user.
CREATE PROCEDURE keyhippo_impersonation.login_as_user(user_id uuid)
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM keyhippo_impersonation.begin_impersonation(user_id);
    SET ROLE authenticated;
END
$$;

-- Act as an anonymous request.
CREATE PROCEDURE keyhippo_impersonation.login_as_anon()
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM keyhippo_impersonation.begin_impersonation(NULL);
    SET ROLE anon;
END
$$;

-- End the impersonation and return to the original role.
CREATE PROCEDURE keyhippo_impersonation.logout()
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM keyhippo_impersonation.end_impersonation();
    RESET ROLE;
END
$$;

-- Row rules -------------------------------------------------------------------------------------

-- The description and claims rules hold on every write path, not only in create_api_key and
-- update_key_claims: the expiry notification and the audit trail rely on them. In Rust (a
-- function call each, no regular expression or JSON path to set up for every INSERT): at most
-- 255 characters of [a-zA-Z0-9_ -]; a JSON object holding no value more than 31 levels below it.
ALTER TABLE keyhippo.api_key_metadata
    ADD CONSTRAINT api_key_metadata_description_check
        CHECK (keyhippo_internal.description_ok(description)),
    ADD CONSTRAINT api_key_metadata_claims_check
        CHECK (keyhippo_internal.claims_ok(claims));

-- Revocation ------------------------------------------------------------------------------------

-- is_revoked (KeyHippo 1.2.5) and revoked_at always agree, whichever one a caller sets, a
-- revoked key stays revoked, and revoked_reason says why.
CREATE FUNCTION keyhippo_internal.sync_revocation() RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF OLD.is_revoked AND (NOT NEW.is_revoked OR NEW.revoked_at IS NULL) THEN
        RAISE EXCEPTION 'keyhippo: a revoked API key cannot be restored'
            USING ERRCODE = '55000', HINT = 'Create a new key instead.';
    END IF;
    IF NEW.revoked_at IS NOT NULL AND NOT NEW.is_revoked THEN
        NEW.is_revoked := true;
    ELSIF NEW.is_revoked AND NEW.revoked_at IS NULL THEN
        NEW.revoked_at := pg_catalog.now();
    END IF;
    -- Every revocation records why; a plain UPDATE revokes for the reason 'revoked'.
    IF NEW.is_revoked AND NOT OLD.is_revoked THEN
        NEW.revoked_reason := COALESCE(NEW.revoked_reason, 'revoked');
    END IF;
    RETURN NEW;
END
$$;

CREATE TRIGGER keyhippo_sync_revocation
    BEFORE UPDATE OF is_revoked, revoked_at ON keyhippo.api_key_metadata
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.sync_revocation();
-- Also for writes made with session_replication_role = replica (a logical replication
-- subscriber, a superuser's session): a revocation is a revocation however it arrives. (This
-- trigger, keyhippo_delete_revoked_secret and keyhippo_cache_update do nothing when only
-- last_used_at changes, so recording a use costs no more than the row update.)
ALTER TABLE keyhippo.api_key_metadata ENABLE ALWAYS TRIGGER keyhippo_sync_revocation;

-- A revoked key's hash is deleted, so nothing can verify against it again: whichever of
-- is_revoked and revoked_at an UPDATE sets (or both), in every replication role.
CREATE FUNCTION keyhippo_internal.delete_revoked_secret() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    DELETE FROM keyhippo.api_key_secrets s WHERE s.key_metadata_id = NEW.id;
    RETURN NULL;
END
$$;

CREATE TRIGGER keyhippo_delete_revoked_secret
    AFTER UPDATE ON keyhippo.api_key_metadata
    FOR EACH ROW
    WHEN ((NEW.is_revoked OR NEW.revoked_at IS NOT NULL)
          AND NOT (OLD.is_revoked AND OLD.revoked_at IS NOT NULL))
    EXECUTE FUNCTION keyhippo_internal.delete_revoked_secret();
ALTER TABLE keyhippo.api_key_metadata ENABLE ALWAYS TRIGGER keyhippo_delete_revoked_secret;

-- Verified-key caches ---------------------------------------------------------------------------

-- Every change verify depends on makes the per-backend caches of verified keys stale (see
-- src/cache.rs): key rows (but not a mere use recorded in last_used_at), hashes, scopes, RBAC.
CREATE TRIGGER keyhippo_cache_update AFTER UPDATE ON keyhippo.api_key_metadata
    FOR EACH ROW
    WHEN (OLD.is_revoked IS DISTINCT FROM NEW.is_revoked OR OLD.revoked_at IS DISTINCT FROM NEW.revoked_at
          OR OLD.expires_at IS DISTINCT FROM NEW.expires_at OR OLD.user_id IS DISTINCT FROM NEW.user_id
          OR OLD.scope_id IS DISTINCT FROM NEW.scope_id OR OLD.prefix IS DISTINCT FROM NEW.prefix
          OR OLD.disabled_at IS DISTINCT FROM NEW.disabled_at)
    EXECUTE FUNCTION keyhippo_internal.note_key_change();
CREATE TRIGGER keyhippo_cache_delete AFTER DELETE OR TRUNCATE ON keyhippo.api_key_metadata
    FOR EACH STATEMENT EXECUTE FUNCTION keyhippo_internal.note_key_change();
CREATE TRIGGER keyhippo_cache AFTER UPDATE OR DELETE OR TRUNCATE ON keyhippo.api_key_secrets
    FOR EACH STATEMENT EXECUTE FUNCTION keyhippo_internal.note_key_change();
-- A key imported from elsewhere is found by a lookup that backends skip while they know the
-- database holds none (src/imported_keys.rs): its arrival must make that knowledge stale too.
-- (A key made here needs nothing: no cache holds a prefix that did not exist.)
CREATE TRIGGER keyhippo_cache_imported AFTER INSERT ON keyhippo.api_key_secrets
    FOR EACH ROW WHEN (NEW.key_hash LIKE 'imported-%')
    EXECUTE FUNCTION keyhippo_internal.note_key_change();
CREATE TRIGGER keyhippo_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keyhippo.scope_permissions
    FOR EACH STATEMENT EXECUTE FUNCTION keyhippo_internal.note_key_change();
CREATE TRIGGER keyhippo_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keyhippo_rbac.user_group_roles
    FOR EACH STATEMENT EXECUTE FUNCTION keyhippo_internal.note_key_change();
CREATE TRIGGER keyhippo_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keyhippo_rbac.role_permissions
    FOR EACH STATEMENT EXECUTE FUNCTION keyhippo_internal.note_key_change();
CREATE TRIGGER keyhippo_cache AFTER UPDATE OR DELETE OR TRUNCATE ON keyhippo_rbac.permissions
    FOR EACH STATEMENT EXECUTE FUNCTION keyhippo_internal.note_key_change();
-- In every replication role: a change applied by a logical replication subscriber, or written
-- with session_replication_role = replica, makes the caches stale like any other.
ALTER TABLE keyhippo.api_key_metadata ENABLE ALWAYS TRIGGER keyhippo_cache_update;
ALTER TABLE keyhippo.api_key_metadata ENABLE ALWAYS TRIGGER keyhippo_cache_delete;
ALTER TABLE keyhippo.api_key_secrets ENABLE ALWAYS TRIGGER keyhippo_cache;
ALTER TABLE keyhippo.api_key_secrets ENABLE ALWAYS TRIGGER keyhippo_cache_imported;
ALTER TABLE keyhippo.scope_permissions ENABLE ALWAYS TRIGGER keyhippo_cache;
ALTER TABLE keyhippo_rbac.user_group_roles ENABLE ALWAYS TRIGGER keyhippo_cache;
ALTER TABLE keyhippo_rbac.role_permissions ENABLE ALWAYS TRIGGER keyhippo_cache;
ALTER TABLE keyhippo_rbac.permissions ENABLE ALWAYS TRIGGER keyhippo_cache;

-- Admin-type RBAC objects -------------------------------------------------------------------------

-- Groups holding a role of type admin, roles of type admin, their permissions and their
-- assignments are changed or deleted by admins only (42501), whatever the path: a direct write,
-- a keyhippo_rbac function, or a cascade from deleting a group or a role. The last admin
-- assignment is removed by nobody but the database owner or service_role (55000). Deleting a
-- user (from auth.users, which cascades to their assignments) always works, admins included.
CREATE FUNCTION keyhippo_internal.guard_admin_objects() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_admin boolean;
    v_role_ids uuid[];
    v_old_role uuid;
    v_old_user uuid;
    v_old_group uuid;
    v_moved boolean := true;
BEGIN
    -- Which admin-type role rows this write touches (before and after), per table.
    IF TG_TABLE_NAME = 'groups' THEN
        SELECT pg_catalog.array_agg(r.id) INTO v_role_ids
          FROM keyhippo_rbac.roles r
         WHERE r.group_id = OLD.id AND r.role_type = 'admin';
        v_admin := v_role_ids IS NOT NULL;
    ELSIF TG_TABLE_NAME = 'roles' THEN
        v_admin := (TG_OP <> 'INSERT' AND OLD.role_type = 'admin')
                OR (TG_OP <> 'DELETE' AND NEW.role_type = 'admin');
        IF TG_OP <> 'INSERT' AND OLD.role_type = 'admin'
           AND (TG_OP = 'DELETE' OR NEW.role_type <> 'admin') THEN
            v_role_ids := ARRAY[OLD.id];
        END IF;
    ELSE
        v_admin := (TG_OP <> 'INSERT' AND EXISTS (SELECT 1 FROM keyhippo_rbac.roles r
                                                   WHERE r.id = OLD.role_id AND r.role_type = 'admin'))
                OR (TG_OP <> 'DELETE' AND EXISTS (SELECT 1 FROM keyhippo_rbac.roles r
                                                   WHERE r.id = NEW.role_id AND r.role_type = 'admin'));
        IF TG_TABLE_NAME = 'user_group_roles' AND TG_OP <> 'INSERT' THEN
            v_old_role := OLD.role_id;
            v_old_user := OLD.user_id;
            v_old_group := OLD.group_id;
            IF TG_OP = 'UPDATE' THEN
                v_moved := NEW.role_id IS DISTINCT FROM OLD.role_id
                        OR NEW.user_id IS DISTINCT FROM OLD.user_id;
            END IF;
        END IF;
    END IF;
    IF NOT v_admin THEN
        RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
    END IF;
    -- A user deleted from auth.users takes their assignments along: always allowed.
    IF v_old_user IS NOT NULL AND TG_OP = 'DELETE'
       AND NOT COALESCE(keyhippo_internal.user_exists(v_old_user), false) THEN
        RETURN OLD;
    END IF;
    IF NOT keyhippo_internal.caller_is_admin() THEN
        RAISE EXCEPTION 'keyhippo: only an administrator may change or delete admin-type groups, roles, their permissions or assignments'
            USING ERRCODE = '42501';
    END IF;
    -- Would this write leave no admin assignment at all?
    IF v_moved
       AND EXISTS (SELECT 1 FROM keyhippo_rbac.user_group_roles ugr
                    WHERE ugr.role_id = ANY (COALESCE(v_role_ids, '{}'))
                       OR (ugr.role_id = v_old_role AND ugr.user_id = v_old_user
                           AND ugr.group_id = v_old_group))
       AND NOT EXISTS (SELECT 1
                         FROM keyhippo_rbac.user_group_roles ugr
                         JOIN keyhippo_rbac.roles r ON r.id = ugr.role_id
                        WHERE r.role_type = 'admin'
                          AND ugr.role_id <> ALL (COALESCE(v_role_ids, '{}'))
                          AND (ugr.role_id, ugr.user_id, ugr.group_id)
                              IS DISTINCT FROM (v_old_role, v_old_user, v_old_group))
       AND NOT keyhippo_internal.caller_owns_database() THEN
        RAISE EXCEPTION 'keyhippo: this would remove the last admin assignment'
            USING ERRCODE = '55000',
                  HINT = 'Assign a role of type admin to another user first; only the database owner or service_role may remove the last one.';
    END IF;
    RETURN CASE WHEN TG_OP = 'DELETE' THEN OLD ELSE NEW END;
END
$$;

CREATE TRIGGER keyhippo_guard_admin BEFORE UPDATE OR DELETE ON keyhippo_rbac.groups
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.guard_admin_objects();
CREATE TRIGGER keyhippo_guard_admin BEFORE INSERT OR UPDATE OR DELETE ON keyhippo_rbac.roles
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.guard_admin_objects();
CREATE TRIGGER keyhippo_guard_admin BEFORE INSERT OR UPDATE OR DELETE ON keyhippo_rbac.role_permissions
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.guard_admin_objects();
CREATE TRIGGER keyhippo_guard_admin BEFORE INSERT OR UPDATE OR DELETE ON keyhippo_rbac.user_group_roles
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.guard_admin_objects();

-- Defaults --------------------------------------------------------------------------------------

-- Idempotent: creates whatever of the defaults is missing and leaves the rest alone.
CREATE FUNCTION keyhippo.initialize_keyhippo() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET keyhippo_audit.function_name = 'initialize_keyhippo'
AS $$
DECLARE
    admin_group_id uuid;
    user_group_id uuid;
    admin_role_id uuid;
    user_role_id uuid;
BEGIN
    -- The default rows have the same ids in every database (derived from their names), so
    -- that a dump restored into a database where CREATE EXTENSION made them anew merges with
    -- them (see keyhippo_internal.merge_restored_row).
    INSERT INTO keyhippo_rbac.groups (id, name, description)
    VALUES (pg_catalog.md5('keyhippo group Admin Group')::uuid, 'Admin Group', 'Group for administrators'),
           (pg_catalog.md5('keyhippo group User Group')::uuid, 'User Group', 'Group for regular users')
    ON CONFLICT (name) DO NOTHING;
    SELECT g.id INTO admin_group_id FROM keyhippo_rbac.groups g WHERE g.name = 'Admin Group';
    SELECT g.id INTO user_group_id FROM keyhippo_rbac.groups g WHERE g.name = 'User Group';

    INSERT INTO keyhippo_rbac.roles (id, name, description, group_id, role_type)
    VALUES (pg_catalog.md5('keyhippo role Admin')::uuid, 'Admin', 'Administrator role', admin_group_id, 'admin'),
           (pg_catalog.md5('keyhippo role User')::uuid, 'User', 'Regular user role', user_group_id, 'user')
    ON CONFLICT DO NOTHING;
    SELECT r.id INTO admin_role_id FROM keyhippo_rbac.roles r
     WHERE r.name = 'Admin' AND r.group_id = admin_group_id;
    SELECT r.id INTO user_role_id FROM keyhippo_rbac.roles r
     WHERE r.name = 'User' AND r.group_id = user_group_id;

    INSERT INTO keyhippo_rbac.permissions (id, name, description)
    SELECT pg_catalog.md5('keyhippo permission ' || p::text)::uuid, p,
           'Permission to ' || pg_catalog.replace(p::text, '_', ' ')
      FROM pg_catalog.unnest(pg_catalog.enum_range(NULL::keyhippo.app_permission)) AS p
    ON CONFLICT DO NOTHING;

    INSERT INTO keyhippo_rbac.role_permissions (role_id, permission_id)
    SELECT admin_role_id, p.id FROM keyhippo_rbac.permissions p
    ON CONFLICT (role_id, permission_id) DO NOTHING;

    INSERT INTO keyhippo_rbac.role_permissions (role_id, permission_id)
    SELECT user_role_id, p.id FROM keyhippo_rbac.permissions p WHERE p.name = 'manage_api_keys'
    ON CONFLICT (role_id, permission_id) DO NOTHING;

    INSERT INTO keyhippo.scopes (id, name, description)
    VALUES (pg_catalog.md5('keyhippo scope default')::uuid, 'default', 'Default scope')
    ON CONFLICT (name) DO NOTHING;

    INSERT INTO keyhippo_internal.config (key, value, description)
    VALUES ('enable_key_expiry_notifications', 'true',
            'Write an expiring_key audit row and send a notification when a key nears expiry'),
           ('key_expiry_notification_hours', '72',
            'How many hours before expiry a key counts as expiring'),
           ('audit_log_retention_days', '90',
            'keyhippo.purge_audit_log() deletes audit rows older than this; 0 keeps everything'),
           ('enable_http_logging', 'false',
            'Deliver audit events to audit_log_endpoint through pg_net (see enable_audit_log_notify)')
    ON CONFLICT (key) DO NOTHING;
END
$$;

-- For a database that already has users: the defaults, then the User role for every user of
-- auth.users who has no role yet.
CREATE FUNCTION keyhippo.initialize_existing_project() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET keyhippo_audit.function_name = 'initialize_existing_project'
AS $$
BEGIN
    PERFORM keyhippo.initialize_keyhippo();
    IF pg_catalog.to_regclass('auth.users') IS NOT NULL THEN
        EXECUTE $q$
            INSERT INTO keyhippo_rbac.user_group_roles (user_id, group_id, role_id)
            SELECT u.id, r.group_id, r.id
              FROM auth.users u
              CROSS JOIN keyhippo_rbac.roles r
              JOIN keyhippo_rbac.groups g ON g.id = r.group_id
             WHERE r.name = 'User' AND g.name = 'User Group'
               AND NOT EXISTS (SELECT 1 FROM keyhippo_rbac.user_group_roles ugr
                                WHERE ugr.user_id = u.id)
            ON CONFLICT DO NOTHING
        $q$;
    END IF;
END
$$;

-- Row Level Security ----------------------------------------------------------------------------

ALTER TABLE keyhippo.api_key_metadata ENABLE ROW LEVEL SECURITY;
ALTER TABLE keyhippo.api_key_secrets ENABLE ROW LEVEL SECURITY;
ALTER TABLE keyhippo.scopes ENABLE ROW LEVEL SECURITY;
ALTER TABLE keyhippo.scope_permissions ENABLE ROW LEVEL SECURITY;
ALTER TABLE keyhippo.audit_log ENABLE ROW LEVEL SECURITY;
ALTER TABLE keyhippo_rbac.groups ENABLE ROW LEVEL SECURITY;
ALTER TABLE keyhippo_rbac.roles ENABLE ROW LEVEL SECURITY;
ALTER TABLE keyhippo_rbac.permissions ENABLE ROW LEVEL SECURITY;
ALTER TABLE keyhippo_rbac.role_permissions ENABLE ROW LEVEL SECURITY;
ALTER TABLE keyhippo_rbac.user_group_roles ENABLE ROW LEVEL SECURITY;
ALTER TABLE keyhippo_internal.config ENABLE ROW LEVEL SECURITY;
ALTER TABLE keyhippo_impersonation.impersonation_state ENABLE ROW LEVEL SECURITY;

-- Users see and change only their own keys; admins see all. (KeyHippo 1.2.5 let every holder of
-- manage_api_keys, i.e. every default user, see every key.) The sub-selects are evaluated once
-- per statement, not once per row.
CREATE POLICY api_key_metadata_owner ON keyhippo.api_key_metadata
    FOR ALL TO authenticated
    USING (user_id = (SELECT keyhippo_internal.current_user_id())
           OR (SELECT keyhippo_internal.caller_is_admin()))
    WITH CHECK (user_id = (SELECT keyhippo_internal.current_user_id())
                OR (SELECT keyhippo_internal.caller_is_admin()));

CREATE POLICY api_key_metadata_service_role ON keyhippo.api_key_metadata
    FOR ALL TO service_role USING (true) WITH CHECK (true);

-- api_key_secrets: no policy at all, so nobody but the table owner (the definer of keyhippo's
-- functions) reads a row, even if a grant is added by mistake.

-- Scopes and RBAC objects: readable by signed-in users. Groups and scopes may be written by admins
-- and holders of manage_groups / manage_scopes. Roles, role permissions and role assignments are
-- written directly only by admins; holders of manage_roles / manage_permissions go through the
-- keyhippo_rbac functions, which also keep admin-type roles for admins.
CREATE POLICY scopes_read ON keyhippo.scopes FOR SELECT TO authenticated USING (true);
CREATE POLICY scopes_write ON keyhippo.scopes FOR ALL TO authenticated
    USING ((SELECT keyhippo_internal.caller_is_admin()) OR (SELECT keyhippo.authorize('manage_scopes')))
    WITH CHECK ((SELECT keyhippo_internal.caller_is_admin()) OR (SELECT keyhippo.authorize('manage_scopes')));
CREATE POLICY scope_permissions_read ON keyhippo.scope_permissions
    FOR SELECT TO authenticated USING (true);
CREATE POLICY scope_permissions_write ON keyhippo.scope_permissions FOR ALL TO authenticated
    USING ((SELECT keyhippo_internal.caller_is_admin()) OR (SELECT keyhippo.authorize('manage_scopes')))
    WITH CHECK ((SELECT keyhippo_internal.caller_is_admin()) OR (SELECT keyhippo.authorize('manage_scopes')));

CREATE POLICY groups_read ON keyhippo_rbac.groups FOR SELECT TO authenticated USING (true);
CREATE POLICY groups_write ON keyhippo_rbac.groups FOR ALL TO authenticated
    USING ((SELECT keyhippo_internal.caller_is_admin()) OR (SELECT keyhippo.authorize('manage_groups')))
    WITH CHECK ((SELECT keyhippo_internal.caller_is_admin()) OR (SELECT keyhippo.authorize('manage_groups')));
CREATE POLICY roles_read ON keyhippo_rbac.roles FOR SELECT TO authenticated USING (true);
CREATE POLICY roles_write ON keyhippo_rbac.roles FOR ALL TO authenticated
    USING ((SELECT keyhippo_internal.caller_is_admin()))
    WITH CHECK ((SELECT keyhippo_internal.caller_is_admin()));
CREATE POLICY permissions_read ON keyhippo_rbac.permissions
    FOR SELECT TO authenticated USING (true);
CREATE POLICY permissions_write ON keyhippo_rbac.permissions FOR ALL TO authenticated
    USING ((SELECT keyhippo_internal.caller_is_admin()))
    WITH CHECK ((SELECT keyhippo_internal.caller_is_admin()));
CREATE POLICY role_permissions_read ON keyhippo_rbac.role_permissions
    FOR SELECT TO authenticated USING (true);
CREATE POLICY role_permissions_write ON keyhippo_rbac.role_permissions FOR ALL TO authenticated
    USING ((SELECT keyhippo_internal.caller_is_admin()))
    WITH CHECK ((SELECT keyhippo_internal.caller_is_admin()));
CREATE POLICY user_group_roles_read ON keyhippo_rbac.user_group_roles
    FOR SELECT TO authenticated
    USING (user_id = (SELECT keyhippo_internal.current_user_id())
           OR (SELECT keyhippo_internal.caller_is_admin())
           OR (SELECT keyhippo.authorize('manage_roles')));
CREATE POLICY user_group_roles_write ON keyhippo_rbac.user_group_roles FOR ALL TO authenticated
    USING ((SELECT keyhippo_internal.caller_is_admin()))
    WITH CHECK ((SELECT keyhippo_internal.caller_is_admin()));

CREATE POLICY scopes_service_role ON keyhippo.scopes
    FOR ALL TO service_role USING (true) WITH CHECK (true);
CREATE POLICY scope_permissions_service_role ON keyhippo.scope_permissions
    FOR ALL TO service_role USING (true) WITH CHECK (true);
CREATE POLICY groups_service_role ON keyhippo_rbac.groups
    FOR ALL TO service_role USING (true) WITH CHECK (true);
CREATE POLICY roles_service_role ON keyhippo_rbac.roles
    FOR ALL TO service_role USING (true) WITH CHECK (true);
CREATE POLICY permissions_service_role ON keyhippo_rbac.permissions
    FOR ALL TO service_role USING (true) WITH CHECK (true);
CREATE POLICY role_permissions_service_role ON keyhippo_rbac.role_permissions
    FOR ALL TO service_role USING (true) WITH CHECK (true);
CREATE POLICY user_group_roles_service_role ON keyhippo_rbac.user_group_roles
    FOR ALL TO service_role USING (true) WITH CHECK (true);

CREATE POLICY audit_log_service_role ON keyhippo.audit_log
    FOR SELECT TO service_role USING (true);
CREATE POLICY audit_log_admin ON keyhippo.audit_log
    FOR SELECT TO authenticated USING ((SELECT keyhippo_internal.caller_is_admin()));
CREATE POLICY config_service_role ON keyhippo_internal.config
    FOR ALL TO service_role USING (true) WITH CHECK (true);

-- What the background workers that write key uses are doing, per database (server-wide: the
-- workers serve every database). For operators: the database owner and service_role.
CREATE VIEW keyhippo.worker_status AS
    SELECT database, served, pending_uses, writer_pid, last_write, uses_written, last_error
      FROM keyhippo_internal.worker_status();
COMMENT ON VIEW keyhippo.worker_status IS
    'keyhippo''s background writing of last_used_at, per database: served (uses written by the workers), uses waiting, the writer connected now, the last write, uses written since the server started, the last error.';

-- Versions: the library a backend runs can be newer than the extension's SQL in a database
-- (until ALTER EXTENSION keyhippo UPDATE), never older (every upgrade script starts with
-- require_library).
COMMENT ON FUNCTION keyhippo_internal.library_version() IS
    'The version of the keyhippo library this backend runs';
COMMENT ON FUNCTION keyhippo_internal.require_library(text) IS
    'Raises 55000 unless the keyhippo library this backend runs is the given version or newer: the first statement of every upgrade script';

-- Grants ----------------------------------------------------------------------------------------

-- Nothing is executable by PUBLIC unless granted below.
REVOKE ALL ON ALL ROUTINES IN SCHEMA keyhippo FROM PUBLIC;
REVOKE ALL ON ALL ROUTINES IN SCHEMA keyhippo_rbac FROM PUBLIC;
REVOKE ALL ON ALL ROUTINES IN SCHEMA keyhippo_internal FROM PUBLIC;
REVOKE ALL ON ALL ROUTINES IN SCHEMA keyhippo_impersonation FROM PUBLIC;

GRANT USAGE ON SCHEMA keyhippo TO anon, authenticated, service_role;
GRANT USAGE ON SCHEMA keyhippo_rbac TO authenticated, service_role;
-- Policies call the keyhippo_internal helpers with the caller's rights.
GRANT USAGE ON SCHEMA keyhippo_internal TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.current_user_id() TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.caller_role_name() TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.caller_is_admin() TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.has_permission(text) TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.jwt_user_role() TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.header_key_status() TO anon, authenticated, service_role;
-- The restore trigger on the RBAC tables asks it, with the writer's rights.
GRANT EXECUTE ON FUNCTION keyhippo_internal.restoring() TO anon, authenticated, service_role;
-- The CHECK constraints of api_key_metadata call these with the writer's rights.
GRANT EXECUTE ON FUNCTION keyhippo_internal.description_ok(text) TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.claims_ok(jsonb) TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.require_permission(keyhippo.app_permission)
    TO authenticated, service_role;

-- Who is calling, and what may they do: every request may ask.
GRANT EXECUTE ON FUNCTION keyhippo.current_user_context() TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.authorize(keyhippo.app_permission) TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.is_authorized(regclass, text) TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.key_data() TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.check_request() TO anon, authenticated, service_role;

GRANT EXECUTE ON FUNCTION keyhippo_rbac.create_group(text, text) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_rbac.create_role(text, text, uuid, keyhippo.app_role)
    TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_rbac.assign_role_to_user(uuid, uuid, uuid) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_rbac.assign_permission_to_role(uuid, keyhippo.app_permission)
    TO authenticated, service_role;

-- Impersonation: the database owner (pg_database_owner) starts it; whoever the session became
-- may end it.
GRANT USAGE ON SCHEMA keyhippo_impersonation TO anon, authenticated, pg_database_owner;
GRANT EXECUTE ON PROCEDURE keyhippo_impersonation.login_as_user(uuid) TO pg_database_owner;
GRANT EXECUTE ON PROCEDURE keyhippo_impersonation.login_as_anon() TO pg_database_owner;
GRANT EXECUTE ON FUNCTION keyhippo_impersonation.begin_impersonation(uuid) TO pg_database_owner;
GRANT EXECUTE ON PROCEDURE keyhippo_impersonation.logout() TO anon, authenticated, pg_database_owner;
GRANT EXECUTE ON FUNCTION keyhippo_impersonation.end_impersonation() TO anon, authenticated, pg_database_owner;

-- Verification is open to every request, including anonymous ones carrying a key.
GRANT EXECUTE ON FUNCTION keyhippo.verify_api_key(text) TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.verify_api_key_status(text) TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.report_leaked_keys(text[]) TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.create_api_key(text, text, interval) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.create_jwt_api_key(text, interval, text) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.jwt_api_key_active() TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.jwt_api_key_status() TO anon, authenticated, service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON keyhippo.jwt_api_keys TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.revoke_api_key(uuid) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.rotate_api_key(uuid, interval) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.disable_api_key(uuid) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.enable_api_key(uuid) TO authenticated, service_role;
-- Importing keys from another system: service_role and admins (checked inside).
GRANT EXECUTE ON FUNCTION keyhippo.import_api_key(uuid, text, text, text, timestamptz, text, jsonb)
    TO authenticated, service_role;
-- Switching PostgREST's hook changes a setting of its login role: the database owner's call.
GRANT EXECUTE ON FUNCTION keyhippo.enable_postgrest_check(boolean) TO pg_database_owner;
GRANT EXECUTE ON FUNCTION keyhippo.disable_postgrest_check() TO pg_database_owner;
GRANT EXECUTE ON FUNCTION keyhippo.update_key_claims(uuid, jsonb) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.initialize_keyhippo() TO service_role;
GRANT EXECUTE ON FUNCTION keyhippo.initialize_existing_project() TO service_role;

-- Key metadata: owners read their rows, may rename, revoke or delete them; nothing else.
GRANT SELECT, DELETE ON keyhippo.api_key_metadata TO authenticated;
GRANT UPDATE (description, is_revoked, revoked_at) ON keyhippo.api_key_metadata TO authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON keyhippo.api_key_metadata TO service_role;
REVOKE ALL ON keyhippo.api_key_secrets FROM PUBLIC, anon, authenticated, service_role;

GRANT SELECT, INSERT, UPDATE, DELETE ON keyhippo.scopes, keyhippo.scope_permissions TO authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON keyhippo.scopes, keyhippo.scope_permissions TO service_role;

GRANT SELECT, INSERT, UPDATE, DELETE ON keyhippo_rbac.groups, keyhippo_rbac.roles,
    keyhippo_rbac.permissions, keyhippo_rbac.role_permissions, keyhippo_rbac.user_group_roles
    TO authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON keyhippo_rbac.groups, keyhippo_rbac.roles,
    keyhippo_rbac.permissions, keyhippo_rbac.role_permissions, keyhippo_rbac.user_group_roles
    TO service_role;

GRANT SELECT ON keyhippo.audit_log TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.update_expiring_keys() TO service_role;
GRANT EXECUTE ON FUNCTION keyhippo.purge_audit_log() TO service_role;
GRANT EXECUTE ON FUNCTION keyhippo.flush_key_usage() TO service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.worker_status() TO service_role;
GRANT SELECT ON keyhippo.worker_status TO service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.enable_audit_log_notify() TO service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.disable_audit_log_notify() TO service_role;
-- The audit trigger runs keyhippo_internal.calling_function() as the definer; nobody else needs it.
GRANT SELECT, INSERT, UPDATE, DELETE ON keyhippo_internal.config TO service_role;

-- Rate limits ----------------------------------------------------------------------------------

-- Limits are set by service_role and admins (the party that issues keys to customers) and read
-- by the keys' owners. Counting happens in shared memory (src/limits.rs); these tables only
-- hold the limits. A change applies from the next statement in every backend (the cache
-- triggers below).

-- 22023 unless (p_max_requests, p_per) is a limit; a NULL p_max_requests (removing the limit)
-- passes.
CREATE FUNCTION keyhippo_internal.check_rate_limit(p_max_requests integer, p_per interval)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_max_requests IS NULL THEN
        RETURN;
    END IF;
    IF p_max_requests <= 0 THEN
        RAISE EXCEPTION 'keyhippo: p_max_requests must be positive (NULL removes the limit)'
            USING ERRCODE = '22023';
    END IF;
    IF p_per IS NULL OR p_per <= interval '0' OR p_per > interval '366 days'
       OR pg_catalog.date_part('month', p_per) <> 0 OR pg_catalog.date_part('year', p_per) <> 0 THEN
        RAISE EXCEPTION 'keyhippo: p_per must be a positive interval of at most 366 days, without months or years'
            USING ERRCODE = '22023', HINT = 'A month is not of fixed length: write ''30 days''.';
    END IF;
END
$$;

-- Sets (or, with p_max_requests NULL, removes) the rate limit of one key: at most p_max_requests
-- admitted requests per window of p_per.
CREATE FUNCTION keyhippo.set_rate_limit(p_api_key_id uuid, p_max_requests integer, p_per interval)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT keyhippo_internal.caller_is_admin() THEN
        RAISE EXCEPTION 'keyhippo: permission denied: only service_role and admins set rate limits'
            USING ERRCODE = '42501';
    END IF;
    IF p_api_key_id IS NULL THEN
        RAISE EXCEPTION 'keyhippo: p_api_key_id must not be NULL' USING ERRCODE = '22023';
    END IF;
    PERFORM keyhippo_internal.check_rate_limit(p_max_requests, p_per);
    IF NOT EXISTS (SELECT 1 FROM keyhippo.api_key_metadata m WHERE m.id = p_api_key_id) THEN
        RAISE EXCEPTION 'keyhippo: API key % does not exist', p_api_key_id USING ERRCODE = 'P0002';
    END IF;
    IF p_max_requests IS NULL THEN
        DELETE FROM keyhippo.api_key_rate_limits l WHERE l.api_key_id = p_api_key_id;
    ELSE
        INSERT INTO keyhippo.api_key_rate_limits AS l (api_key_id, max_requests, per)
        VALUES (p_api_key_id, p_max_requests, p_per)
        ON CONFLICT (api_key_id) DO UPDATE
            SET max_requests = EXCLUDED.max_requests, per = EXCLUDED.per, updated_at = pg_catalog.now()
            WHERE (l.max_requests, l.per) IS DISTINCT FROM (EXCLUDED.max_requests, EXCLUDED.per);
    END IF;
END
$$;

-- The same for all keys of one user together.
CREATE FUNCTION keyhippo.set_owner_rate_limit(p_user_id uuid, p_max_requests integer, p_per interval)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT keyhippo_internal.caller_is_admin() THEN
        RAISE EXCEPTION 'keyhippo: permission denied: only service_role and admins set rate limits'
            USING ERRCODE = '42501';
    END IF;
    IF p_user_id IS NULL THEN
        RAISE EXCEPTION 'keyhippo: p_user_id must not be NULL' USING ERRCODE = '22023';
    END IF;
    PERFORM keyhippo_internal.check_rate_limit(p_max_requests, p_per);
    IF p_max_requests IS NULL THEN
        DELETE FROM keyhippo.owner_rate_limits l WHERE l.user_id = p_user_id;
        RETURN;
    END IF;
    IF NOT COALESCE(keyhippo_internal.user_exists(p_user_id), false) THEN
        RAISE EXCEPTION 'keyhippo: user % does not exist', p_user_id USING ERRCODE = 'P0002';
    END IF;
    INSERT INTO keyhippo.owner_rate_limits AS l (user_id, max_requests, per)
    VALUES (p_user_id, p_max_requests, p_per)
    ON CONFLICT (user_id) DO UPDATE
        SET max_requests = EXCLUDED.max_requests, per = EXCLUDED.per, updated_at = pg_catalog.now()
        WHERE (l.max_requests, l.per) IS DISTINCT FROM (EXCLUDED.max_requests, EXCLUDED.per);
END
$$;

COMMENT ON FUNCTION keyhippo.set_rate_limit(uuid, integer, interval) IS
    'Sets the rate limit of one key (service_role, admins): at most p_max_requests requests admitted by verify_api_key_status or check_request per window of p_per; NULL p_max_requests removes it';
COMMENT ON FUNCTION keyhippo.set_owner_rate_limit(uuid, integer, interval) IS
    'Sets a rate limit shared by all keys of one user (service_role, admins); NULL p_max_requests removes it';

ALTER TABLE keyhippo.api_key_rate_limits ENABLE ROW LEVEL SECURITY;
ALTER TABLE keyhippo.owner_rate_limits ENABLE ROW LEVEL SECURITY;
-- Owners read their keys' limits (api_key_metadata's own policy decides which keys they see);
-- admins and service_role read all. Nobody writes but the functions above.
CREATE POLICY api_key_rate_limits_read ON keyhippo.api_key_rate_limits
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT m.id FROM keyhippo.api_key_metadata m));
CREATE POLICY api_key_rate_limits_service_role ON keyhippo.api_key_rate_limits
    FOR SELECT TO service_role USING (true);
CREATE POLICY owner_rate_limits_read ON keyhippo.owner_rate_limits
    FOR SELECT TO authenticated
    USING (user_id = (SELECT keyhippo_internal.current_user_id())
           OR (SELECT keyhippo_internal.caller_is_admin()));
CREATE POLICY owner_rate_limits_service_role ON keyhippo.owner_rate_limits
    FOR SELECT TO service_role USING (true);
GRANT SELECT ON keyhippo.api_key_rate_limits, keyhippo.owner_rate_limits TO authenticated, service_role;

REVOKE ALL ON FUNCTION keyhippo_internal.check_rate_limit(integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION keyhippo.set_rate_limit(uuid, integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION keyhippo.set_owner_rate_limit(uuid, integer, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION keyhippo_internal.rate_limit_refusal() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keyhippo.set_rate_limit(uuid, integer, interval) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.set_owner_rate_limit(uuid, integer, interval) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.rate_limit_refusal() TO anon, authenticated, service_role;

-- PostgREST's 429 for a request refused by a rate limit or for want of credits: refusal is
-- what keyhippo_internal.rate_limit_refusal() says (message, details, retry_after).
CREATE FUNCTION keyhippo_internal.refuse_request(refusal jsonb) RETURNS void
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE SQLSTATE 'PGRST' USING
        MESSAGE = pg_catalog.jsonb_build_object(
            'code', 'KH429',
            'message', refusal->>'message',
            'details', refusal->>'details',
            'hint', CASE WHEN refusal->>'retry_after' IS NULL
                         THEN 'No credits are left and none will be refilled: the key''s issuer can grant more.'
                         ELSE pg_catalog.format('Retry after %s seconds.', refusal->>'retry_after') END)::text,
        DETAIL = pg_catalog.jsonb_build_object(
            'status', 429,
            'headers', CASE WHEN refusal->>'retry_after' IS NULL THEN '{}'::jsonb
                            ELSE pg_catalog.jsonb_build_object('Retry-After', refusal->>'retry_after') END)::text;
END
$$;

-- Credits: granted by service_role and admins; NULL p_remaining removes them (unlimited).
-- p_refill_amount every p_refill_interval (windows aligned to the clock) sets the balance back
-- to that amount.
CREATE FUNCTION keyhippo.set_credits(p_api_key_id uuid, p_remaining bigint,
                                     p_refill_amount bigint DEFAULT NULL,
                                     p_refill_interval interval DEFAULT NULL)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NOT keyhippo_internal.caller_is_admin() THEN
        RAISE EXCEPTION 'keyhippo: permission denied: only service_role and admins grant credits'
            USING ERRCODE = '42501';
    END IF;
    IF p_api_key_id IS NULL THEN
        RAISE EXCEPTION 'keyhippo: p_api_key_id must not be NULL' USING ERRCODE = '22023';
    END IF;
    IF p_remaining < 0 THEN
        RAISE EXCEPTION 'keyhippo: p_remaining must not be negative (NULL removes the credits)'
            USING ERRCODE = '22023';
    END IF;
    IF (p_refill_amount IS NULL) <> (p_refill_interval IS NULL) THEN
        RAISE EXCEPTION 'keyhippo: p_refill_amount and p_refill_interval go together'
            USING ERRCODE = '22023';
    END IF;
    IF p_refill_amount <= 0 THEN
        RAISE EXCEPTION 'keyhippo: p_refill_amount must be positive' USING ERRCODE = '22023';
    END IF;
    IF p_refill_interval IS NOT NULL THEN
        PERFORM keyhippo_internal.check_rate_limit(1, p_refill_interval);
    END IF;
    IF NOT EXISTS (SELECT 1 FROM keyhippo.api_key_metadata m WHERE m.id = p_api_key_id) THEN
        RAISE EXCEPTION 'keyhippo: API key % does not exist', p_api_key_id USING ERRCODE = 'P0002';
    END IF;
    IF p_remaining IS NULL THEN
        DELETE FROM keyhippo.api_key_credits c WHERE c.api_key_id = p_api_key_id;
    ELSE
        INSERT INTO keyhippo.api_key_credits AS c
               (api_key_id, remaining, refill_amount, refill_interval, granted_at, refilled_at)
        VALUES (p_api_key_id, p_remaining, p_refill_amount, p_refill_interval,
                pg_catalog.clock_timestamp(), pg_catalog.clock_timestamp())
        ON CONFLICT (api_key_id) DO UPDATE
            SET remaining = EXCLUDED.remaining, refill_amount = EXCLUDED.refill_amount,
                refill_interval = EXCLUDED.refill_interval, granted_at = EXCLUDED.granted_at,
                refilled_at = EXCLUDED.refilled_at;
    END IF;
END
$$;
COMMENT ON FUNCTION keyhippo.set_credits(uuid, bigint, bigint, interval) IS
    'Grants a key credits (service_role, admins): each admitted request costs 1, spend_credits more; the refill sets the balance back to p_refill_amount every p_refill_interval; NULL p_remaining removes them';

-- Charges p_cost credits more to the key admitted last in this transaction, on top of the 1 its
-- admission cost; returns what is left (NULL for a key without credits). 429 when not enough.
CREATE FUNCTION keyhippo.spend_credits(p_cost integer DEFAULT 1) RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_spent jsonb;
BEGIN
    v_spent := keyhippo_internal.spend_credits_now(p_cost);
    IF v_spent ? 'refused' THEN
        PERFORM keyhippo_internal.refuse_request(v_spent->'refused');
    END IF;
    RETURN (v_spent->>'remaining')::bigint;
END
$$;
COMMENT ON FUNCTION keyhippo.spend_credits(integer) IS
    'Charges p_cost credits more to the key admitted last in this transaction; returns what is left (NULL: no credits set); HTTP 429 (PGRST) when not enough; given back if the transaction or savepoint rolls back';

ALTER TABLE keyhippo.api_key_credits ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_key_credits_read ON keyhippo.api_key_credits
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT m.id FROM keyhippo.api_key_metadata m));
CREATE POLICY api_key_credits_service_role ON keyhippo.api_key_credits
    FOR SELECT TO service_role USING (true);
GRANT SELECT ON keyhippo.api_key_credits TO authenticated, service_role;
REVOKE ALL ON FUNCTION keyhippo.set_credits(uuid, bigint, bigint, interval) FROM PUBLIC;
REVOKE ALL ON FUNCTION keyhippo.spend_credits(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION keyhippo_internal.spend_credits_now(integer) FROM PUBLIC;
REVOKE ALL ON FUNCTION keyhippo_internal.refuse_request(jsonb) FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keyhippo.set_credits(uuid, bigint, bigint, interval) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.spend_credits(integer) TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.spend_credits_now(integer) TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.refuse_request(jsonb) TO anon, authenticated, service_role;
-- A new grant (not the workers writing a balance back) makes the backends' copies stale.
CREATE TRIGGER keyhippo_cache AFTER INSERT OR DELETE OR TRUNCATE ON keyhippo.api_key_credits
    FOR EACH STATEMENT EXECUTE FUNCTION keyhippo_internal.note_key_change();
CREATE TRIGGER keyhippo_cache_grant AFTER UPDATE ON keyhippo.api_key_credits
    FOR EACH ROW WHEN (OLD.granted_at IS DISTINCT FROM NEW.granted_at)
    EXECUTE FUNCTION keyhippo_internal.note_key_change();
ALTER TABLE keyhippo.api_key_credits ENABLE ALWAYS TRIGGER keyhippo_cache;
ALTER TABLE keyhippo.api_key_credits ENABLE ALWAYS TRIGGER keyhippo_cache_grant;

-- Usage counts: owners read their keys' rows (api_key_metadata's policy decides which keys they
-- see), admins and service_role all. Only keyhippo's background workers write them.
ALTER TABLE keyhippo.api_key_usage ENABLE ROW LEVEL SECURITY;
CREATE POLICY api_key_usage_read ON keyhippo.api_key_usage
    FOR SELECT TO authenticated
    USING (api_key_id IN (SELECT m.id FROM keyhippo.api_key_metadata m));
CREATE POLICY api_key_usage_service_role ON keyhippo.api_key_usage
    FOR SELECT TO service_role USING (true);
GRANT SELECT ON keyhippo.api_key_usage TO authenticated, service_role;

CREATE TRIGGER keyhippo_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keyhippo.api_key_rate_limits
    FOR EACH STATEMENT EXECUTE FUNCTION keyhippo_internal.note_key_change();
CREATE TRIGGER keyhippo_cache AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON keyhippo.owner_rate_limits
    FOR EACH STATEMENT EXECUTE FUNCTION keyhippo_internal.note_key_change();
ALTER TABLE keyhippo.api_key_rate_limits ENABLE ALWAYS TRIGGER keyhippo_cache;
ALTER TABLE keyhippo.owner_rate_limits ENABLE ALWAYS TRIGGER keyhippo_cache;

-- The defaults, at install time.
SELECT keyhippo.initialize_keyhippo();

-- pg_cron, when installed: report expiring keys hourly and purge old audit rows daily. Without
-- pg_cron, call both from any scheduler (see README).
DO $cron$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'pg_cron') THEN
        EXECUTE $q$SELECT cron.schedule('keyhippo_update_expiring_keys', '0 * * * *',
                                        'SELECT keyhippo.update_expiring_keys()')$q$;
        EXECUTE $q$SELECT cron.schedule('keyhippo_purge_audit_log', '17 3 * * *',
                                        'SELECT keyhippo.purge_audit_log()')$q$;
    END IF;
END
$cron$;

-- PostgREST: nothing here. The pre-request hook is switched on for this database with
-- SELECT keyhippo.enable_postgrest_check(); (see above).
