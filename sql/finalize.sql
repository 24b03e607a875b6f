-- keyhippo finalize: runs after the Rust functions exist. Helpers written in SQL, triggers,
-- Row Level Security, grants, and the default data.
--
-- Every SECURITY DEFINER function pins search_path to pg_catalog, pg_temp and names every
-- object with its schema.

-- Who may manage every key: service_role, a superuser, or a user holding an RBAC role of type
-- 'admin'. (Holding manage_api_keys is not enough: every default user holds it.)
CREATE FUNCTION keyhippo_internal.caller_is_admin() RETURNS boolean
LANGUAGE sql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT keyhippo_internal.caller_role_name() = 'service_role'
        OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles r
                    WHERE r.rolname = keyhippo_internal.caller_role_name() AND r.rolsuper)
        OR EXISTS (SELECT 1
                     FROM keyhippo_rbac.user_group_roles ugr
                     JOIN keyhippo_rbac.roles r ON r.id = ugr.role_id
                    WHERE ugr.user_id = keyhippo_internal.current_user_id()
                      AND r.role_type = 'admin')
$$;

-- Revocation ------------------------------------------------------------------------------------

-- is_revoked (KeyHippo) and revoked_at (seed 000) always agree, whichever one a caller sets, and
-- a revoked key stays revoked.
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
    RETURN NEW;
END
$$;

CREATE TRIGGER keyhippo_sync_revocation
    BEFORE UPDATE OF is_revoked, revoked_at ON keyhippo.api_key_metadata
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.sync_revocation();

-- A revoked key's hash is deleted, so nothing can verify against it again.
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
    AFTER UPDATE OF is_revoked ON keyhippo.api_key_metadata
    FOR EACH ROW WHEN (NEW.is_revoked AND NOT OLD.is_revoked)
    EXECUTE FUNCTION keyhippo_internal.delete_revoked_secret();

-- Defaults --------------------------------------------------------------------------------------

-- Idempotent: creates whatever of the defaults is missing and leaves the rest alone.
CREATE FUNCTION keyhippo.initialize_keyhippo() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    admin_group_id uuid;
    user_group_id uuid;
    admin_role_id uuid;
    user_role_id uuid;
BEGIN
    INSERT INTO keyhippo_rbac.groups (name, description)
    VALUES ('Admin Group', 'Group for administrators'),
           ('User Group', 'Group for regular users')
    ON CONFLICT (name) DO NOTHING;
    SELECT g.id INTO admin_group_id FROM keyhippo_rbac.groups g WHERE g.name = 'Admin Group';
    SELECT g.id INTO user_group_id FROM keyhippo_rbac.groups g WHERE g.name = 'User Group';

    INSERT INTO keyhippo_rbac.roles (name, description, group_id, role_type)
    VALUES ('Admin', 'Administrator role', admin_group_id, 'admin'),
           ('User', 'Regular user role', user_group_id, 'user')
    ON CONFLICT (name, group_id) DO NOTHING;
    SELECT r.id INTO admin_role_id FROM keyhippo_rbac.roles r
     WHERE r.name = 'Admin' AND r.group_id = admin_group_id;
    SELECT r.id INTO user_role_id FROM keyhippo_rbac.roles r
     WHERE r.name = 'User' AND r.group_id = user_group_id;

    INSERT INTO keyhippo_rbac.permissions (name, description)
    SELECT p, 'Permission to ' || pg_catalog.replace(p::text, '_', ' ')
      FROM pg_catalog.unnest(pg_catalog.enum_range(NULL::keyhippo.app_permission)) AS p
    ON CONFLICT (name) DO NOTHING;

    INSERT INTO keyhippo_rbac.role_permissions (role_id, permission_id)
    SELECT admin_role_id, p.id FROM keyhippo_rbac.permissions p
    ON CONFLICT (role_id, permission_id) DO NOTHING;

    INSERT INTO keyhippo_rbac.role_permissions (role_id, permission_id)
    SELECT user_role_id, p.id FROM keyhippo_rbac.permissions p WHERE p.name = 'manage_api_keys'
    ON CONFLICT (role_id, permission_id) DO NOTHING;

    INSERT INTO keyhippo.scopes (name, description)
    VALUES ('default', 'Default scope')
    ON CONFLICT (name) DO NOTHING;

    INSERT INTO keyhippo_internal.config (key, value, description)
    VALUES ('enable_key_expiry_notifications', 'true',
            'Write an expiring_key audit row and send a notification when a key nears expiry'),
           ('key_expiry_notification_hours', '72',
            'How many hours before expiry a key counts as expiring')
    ON CONFLICT (key) DO NOTHING;
END
$$;

-- For a database that already has users: the defaults, then the User role for every user of
-- auth.users who has no role yet.
CREATE FUNCTION keyhippo.initialize_existing_project() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
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

CREATE POLICY scopes_read ON keyhippo.scopes FOR SELECT TO authenticated USING (true);
CREATE POLICY scopes_service_role ON keyhippo.scopes
    FOR ALL TO service_role USING (true) WITH CHECK (true);
CREATE POLICY scope_permissions_read ON keyhippo.scope_permissions
    FOR SELECT TO authenticated USING (true);
CREATE POLICY scope_permissions_service_role ON keyhippo.scope_permissions
    FOR ALL TO service_role USING (true) WITH CHECK (true);

CREATE POLICY groups_read ON keyhippo_rbac.groups FOR SELECT TO authenticated USING (true);
CREATE POLICY roles_read ON keyhippo_rbac.roles FOR SELECT TO authenticated USING (true);
CREATE POLICY permissions_read ON keyhippo_rbac.permissions
    FOR SELECT TO authenticated USING (true);
CREATE POLICY role_permissions_read ON keyhippo_rbac.role_permissions
    FOR SELECT TO authenticated USING (true);
CREATE POLICY user_group_roles_own ON keyhippo_rbac.user_group_roles
    FOR SELECT TO authenticated
    USING (user_id = (SELECT keyhippo_internal.current_user_id())
           OR (SELECT keyhippo_internal.caller_is_admin()));

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
CREATE POLICY config_service_role ON keyhippo_internal.config
    FOR ALL TO service_role USING (true) WITH CHECK (true);

-- Grants ----------------------------------------------------------------------------------------

-- Nothing is executable by PUBLIC unless granted below.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA keyhippo FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA keyhippo_rbac FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA keyhippo_internal FROM PUBLIC;
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA keyhippo_impersonation FROM PUBLIC;

GRANT USAGE ON SCHEMA keyhippo TO anon, authenticated, service_role;
GRANT USAGE ON SCHEMA keyhippo_rbac TO authenticated, service_role;
-- Policies call the keyhippo_internal helpers with the caller's rights.
GRANT USAGE ON SCHEMA keyhippo_internal TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.current_user_id() TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.caller_role_name() TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo_internal.caller_is_admin() TO anon, authenticated, service_role;

-- Verification is open to every request, including anonymous ones carrying a key.
GRANT EXECUTE ON FUNCTION keyhippo.verify_api_key(text) TO anon, authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.create_api_key(text, text) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.revoke_api_key(uuid) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.rotate_api_key(uuid) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.update_key_claims(uuid, jsonb) TO authenticated, service_role;
GRANT EXECUTE ON FUNCTION keyhippo.initialize_keyhippo() TO service_role;
GRANT EXECUTE ON FUNCTION keyhippo.initialize_existing_project() TO service_role;

-- Key metadata: owners read their rows, may rename, revoke or delete them; nothing else.
GRANT SELECT, DELETE ON keyhippo.api_key_metadata TO authenticated;
GRANT UPDATE (description, is_revoked, revoked_at) ON keyhippo.api_key_metadata TO authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON keyhippo.api_key_metadata TO service_role;
REVOKE ALL ON keyhippo.api_key_secrets FROM PUBLIC, anon, authenticated, service_role;

GRANT SELECT ON keyhippo.scopes, keyhippo.scope_permissions TO authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON keyhippo.scopes, keyhippo.scope_permissions TO service_role;

GRANT SELECT ON keyhippo_rbac.groups, keyhippo_rbac.roles, keyhippo_rbac.permissions,
    keyhippo_rbac.role_permissions, keyhippo_rbac.user_group_roles TO authenticated;
GRANT SELECT, INSERT, UPDATE, DELETE ON keyhippo_rbac.groups, keyhippo_rbac.roles,
    keyhippo_rbac.permissions, keyhippo_rbac.role_permissions, keyhippo_rbac.user_group_roles
    TO service_role;

GRANT SELECT ON keyhippo.audit_log TO service_role;
GRANT SELECT, INSERT, UPDATE, DELETE ON keyhippo_internal.config TO service_role;

-- The defaults, at install time.
SELECT keyhippo.initialize_keyhippo();
