-- keyhippo bootstrap: every schema, type, table and index of the data model (SPEC 2).
-- Runs before the Rust functions are created. Policies, grants, triggers and defaults that call
-- those functions are in finalize.sql.

-- The schema `keyhippo` itself is created by CREATE EXTENSION (keyhippo.control: schema).
CREATE SCHEMA keyhippo_rbac;
CREATE SCHEMA keyhippo_internal;
CREATE SCHEMA keyhippo_impersonation;

COMMENT ON SCHEMA keyhippo IS 'keyhippo: API keys issued, verified, rotated and revoked in the database';
COMMENT ON SCHEMA keyhippo_rbac IS 'keyhippo: groups, roles and permissions';
COMMENT ON SCHEMA keyhippo_internal IS 'keyhippo: configuration and helpers, not a public API';
COMMENT ON SCHEMA keyhippo_impersonation IS 'keyhippo: impersonation state for the database owner';

-- The roles PostgREST and Supabase use. Supabase already has them; on a plain Postgres they are
-- created here, so grants and policies below always have someone to name.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'anon') THEN
        CREATE ROLE anon NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'authenticated') THEN
        CREATE ROLE authenticated NOLOGIN NOINHERIT;
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pg_catalog.pg_roles WHERE rolname = 'service_role') THEN
        CREATE ROLE service_role NOLOGIN NOINHERIT;
    END IF;
END
$roles$;

CREATE TYPE keyhippo.app_permission AS ENUM (
    'manage_groups',
    'manage_roles',
    'manage_permissions',
    'manage_scopes',
    'manage_user_attributes',
    'manage_api_keys'
);

CREATE TYPE keyhippo.app_role AS ENUM ('admin', 'user');

-- RBAC ---------------------------------------------------------------------------------------

CREATE TABLE keyhippo_rbac.groups (
    id uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid(),
    name text NOT NULL UNIQUE,
    description text
);

CREATE TABLE keyhippo_rbac.roles (
    id uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid(),
    name text NOT NULL,
    description text,
    group_id uuid NOT NULL REFERENCES keyhippo_rbac.groups (id) ON DELETE CASCADE,
    role_type keyhippo.app_role NOT NULL DEFAULT 'user',
    UNIQUE (name, group_id)
);

CREATE TABLE keyhippo_rbac.permissions (
    id uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid(),
    name keyhippo.app_permission NOT NULL UNIQUE,
    description text
);

CREATE TABLE keyhippo_rbac.role_permissions (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    role_id uuid NOT NULL REFERENCES keyhippo_rbac.roles (id) ON DELETE CASCADE,
    permission_id uuid NOT NULL REFERENCES keyhippo_rbac.permissions (id) ON DELETE CASCADE,
    UNIQUE (role_id, permission_id)
);

CREATE TABLE keyhippo_rbac.user_group_roles (
    user_id uuid NOT NULL,
    group_id uuid NOT NULL REFERENCES keyhippo_rbac.groups (id) ON DELETE CASCADE,
    role_id uuid NOT NULL REFERENCES keyhippo_rbac.roles (id) ON DELETE CASCADE,
    PRIMARY KEY (user_id, group_id, role_id)
);
CREATE INDEX user_group_roles_role_id_idx ON keyhippo_rbac.user_group_roles (role_id);

-- Scopes -------------------------------------------------------------------------------------

CREATE TABLE keyhippo.scopes (
    id uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid(),
    name text NOT NULL UNIQUE,
    description text
);

CREATE TABLE keyhippo.scope_permissions (
    id uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid(),
    scope_id uuid NOT NULL REFERENCES keyhippo.scopes (id) ON DELETE CASCADE,
    permission_id uuid NOT NULL REFERENCES keyhippo_rbac.permissions (id) ON DELETE CASCADE,
    UNIQUE (scope_id, permission_id)
);

-- Keys ---------------------------------------------------------------------------------------

-- Exactly the columns of KeyHippo 1.2.5, plus revoked_at (the seed-000 model).
CREATE TABLE keyhippo.api_key_metadata (
    id uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid(),
    user_id uuid NOT NULL,
    scope_id uuid REFERENCES keyhippo.scopes (id),
    description text,
    prefix text NOT NULL UNIQUE,
    created_at timestamptz NOT NULL DEFAULT pg_catalog.now(),
    last_used_at timestamptz,
    expires_at timestamptz NOT NULL DEFAULT (pg_catalog.now() + interval '100 years'),
    is_revoked boolean NOT NULL DEFAULT false,
    claims jsonb DEFAULT '{}'::jsonb,
    revoked_at timestamptz
);
CREATE INDEX api_key_metadata_user_id_idx ON keyhippo.api_key_metadata (user_id);
CREATE INDEX api_key_metadata_scope_id_idx ON keyhippo.api_key_metadata (scope_id);

COMMENT ON COLUMN keyhippo.api_key_metadata.prefix IS
    'Public part of the key (kh_ + 16 characters): shown to users, used to find the key';
COMMENT ON COLUMN keyhippo.api_key_metadata.revoked_at IS
    'When the key was revoked; set together with is_revoked';

-- The only place a key's hash lives. No grants to anon, authenticated or service_role.
CREATE TABLE keyhippo.api_key_secrets (
    key_metadata_id uuid PRIMARY KEY
        REFERENCES keyhippo.api_key_metadata (id) ON DELETE CASCADE,
    key_hash text NOT NULL
);
COMMENT ON COLUMN keyhippo.api_key_secrets.key_hash IS
    '<algorithm>$<hex digest> of the whole key, e.g. sha256$...';

-- Audit, configuration, impersonation ---------------------------------------------------------

CREATE TABLE keyhippo.audit_log (
    id uuid PRIMARY KEY DEFAULT pg_catalog.gen_random_uuid(),
    "timestamp" timestamptz NOT NULL DEFAULT pg_catalog.now(),
    action text NOT NULL,
    table_name text,
    data jsonb,
    user_id uuid,
    function_name text
);
CREATE INDEX audit_log_timestamp_idx ON keyhippo.audit_log ("timestamp");

CREATE TABLE keyhippo_internal.config (
    key text PRIMARY KEY,
    value text NOT NULL,
    description text
);

CREATE TABLE keyhippo_impersonation.impersonation_state (
    impersonated_user_id uuid PRIMARY KEY,
    original_role name NOT NULL,
    impersonation_time timestamptz NOT NULL DEFAULT pg_catalog.now()
);

-- Links to Supabase's auth.users, when this database has it ------------------------------------

DO $auth$
BEGIN
    IF pg_catalog.to_regclass('auth.users') IS NOT NULL THEN
        ALTER TABLE keyhippo.api_key_metadata
            ADD CONSTRAINT api_key_metadata_user_id_fkey
            FOREIGN KEY (user_id) REFERENCES auth.users (id) ON DELETE CASCADE;
        ALTER TABLE keyhippo_rbac.user_group_roles
            ADD CONSTRAINT user_group_roles_user_id_fkey
            FOREIGN KEY (user_id) REFERENCES auth.users (id) ON DELETE CASCADE;
        -- Whether a JWT's subject is a real user. Without auth.users every subject is taken as
        -- it comes (plain Postgres + PostgREST: identities live elsewhere).
        EXECUTE $fn$
            CREATE FUNCTION keyhippo_internal.user_exists(p_user_id uuid) RETURNS boolean
            LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
            AS 'SELECT EXISTS (SELECT 1 FROM auth.users u WHERE u.id = p_user_id)'
        $fn$;
    ELSE
        EXECUTE $fn$
            CREATE FUNCTION keyhippo_internal.user_exists(p_user_id uuid) RETURNS boolean
            LANGUAGE sql IMMUTABLE SET search_path = pg_catalog, pg_temp
            AS 'SELECT p_user_id IS NOT NULL'
        $fn$;
    END IF;
END
$auth$;

-- pg_dump must keep the rows of these tables (they are data, not extension objects).
SELECT pg_catalog.pg_extension_config_dump('keyhippo.api_key_metadata', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo.api_key_secrets', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo.scopes', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo.scope_permissions', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo.audit_log', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo_rbac.groups', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo_rbac.roles', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo_rbac.permissions', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo_rbac.role_permissions', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo_rbac.user_group_roles', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo_internal.config', '');
