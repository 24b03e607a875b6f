-- Turns a database where KeyHippo 1.2.5's SQL was applied (plain objects in the schemas keyhippo,
-- keyhippo_rbac, keyhippo_internal and keyhippo_impersonation) into a keyhippo database, keeping
-- every key working with the plaintext its holder has.
--
--   psql -v ON_ERROR_STOP=1 -d <database> -f sql/migrate_from_keyhippo_1.2.5.sql
--
-- Run it as a superuser, on a server where keyhippo's files are installed (make install) and,
-- ideally, preloaded. It runs in one transaction: if anything fails, the database is left
-- exactly as it was. Run a second time, it stops with an error and changes nothing.
--
-- What it does: moves 1.2.5's schemas aside, runs CREATE EXTENSION keyhippo, copies every key
-- (id, owner, description, prefix, scope, claims, times, revoked state), its hash (as
-- keyhippo125$<hex>, which verify checks against the key's 128-character secret), the scopes,
-- the RBAC groups, roles, permissions and assignments, the audit log and the settings that still
-- mean something, re-creates the application's policies and views that called 1.2.5's functions
-- so that they call keyhippo's, and drops 1.2.5's objects. Descriptions that keyhippo's rule
-- (at most 255 characters of letters, digits, spaces, '_' and '-') refuses are rewritten to fit,
-- and each rewrite is written to the audit log. docs/migrating.md has the details.

\set ON_ERROR_STOP 1
BEGIN;

DO $check$
BEGIN
    IF EXISTS (SELECT 1 FROM pg_catalog.pg_extension WHERE extname = 'keyhippo') THEN
        RAISE EXCEPTION 'keyhippo: this database already has the keyhippo extension; there is nothing to migrate'
            USING ERRCODE = '55000',
                  HINT = 'The migration from KeyHippo 1.2.5 has run here already (or keyhippo was installed afresh).';
    END IF;
    IF pg_catalog.to_regclass('keyhippo.api_key_metadata') IS NULL
       OR pg_catalog.to_regclass('keyhippo.api_key_secrets') IS NULL
       OR pg_catalog.to_regclass('keyhippo_rbac.user_group_roles') IS NULL THEN
        RAISE EXCEPTION 'keyhippo: this database has no KeyHippo 1.2.5 tables (keyhippo.api_key_metadata, keyhippo.api_key_secrets, keyhippo_rbac.user_group_roles)'
            USING ERRCODE = '55000', HINT = 'Run CREATE EXTENSION keyhippo; instead.';
    END IF;
    IF NOT (SELECT r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) THEN
        RAISE EXCEPTION 'keyhippo: the migration must run as a superuser' USING ERRCODE = '42501';
    END IF;
    IF pg_catalog.to_regnamespace('keyhippo_1_2_5') IS NOT NULL THEN
        RAISE EXCEPTION 'keyhippo: a schema keyhippo_1_2_5 exists already; rename or drop it first'
            USING ERRCODE = '42P06';
    END IF;
END
$check$;

-- 1.2.5's schemas, moved aside (and dropped at the end).
ALTER SCHEMA keyhippo RENAME TO keyhippo_1_2_5;
ALTER SCHEMA keyhippo_rbac RENAME TO keyhippo_rbac_1_2_5;
ALTER SCHEMA keyhippo_internal RENAME TO keyhippo_internal_1_2_5;
ALTER SCHEMA keyhippo_impersonation RENAME TO keyhippo_impersonation_1_2_5;

-- The application's objects that use 1.2.5's objects. Policies and views are re-created below
-- from their definitions, naming keyhippo's objects instead; anything else would be dropped
-- with 1.2.5's schemas, so the migration stops and names it.
CREATE TEMP TABLE kh_old_schemas ON COMMIT DROP AS
SELECT n.oid FROM pg_catalog.pg_namespace n
 WHERE n.nspname IN ('keyhippo_1_2_5', 'keyhippo_rbac_1_2_5', 'keyhippo_internal_1_2_5',
                     'keyhippo_impersonation_1_2_5');

CREATE TEMP TABLE kh_dependents ON COMMIT DROP AS
SELECT DISTINCT d.classid, d.objid,
       pg_catalog.pg_describe_object(d.classid, d.objid, d.objsubid) AS what
  FROM pg_catalog.pg_depend d
 WHERE d.deptype = 'n'
   AND (d.refclassid, d.refobjid) IN (
        SELECT 'pg_catalog.pg_proc'::pg_catalog.regclass, p.oid FROM pg_catalog.pg_proc p
         WHERE p.pronamespace IN (SELECT oid FROM kh_old_schemas)
        UNION ALL
        SELECT 'pg_catalog.pg_class'::pg_catalog.regclass, c.oid FROM pg_catalog.pg_class c
         WHERE c.relnamespace IN (SELECT oid FROM kh_old_schemas)
        UNION ALL
        SELECT 'pg_catalog.pg_type'::pg_catalog.regclass, t.oid FROM pg_catalog.pg_type t
         WHERE t.typnamespace IN (SELECT oid FROM kh_old_schemas))
   AND NOT EXISTS (
        -- 1.2.5's own objects: in its schemas, or its trigger on auth.users.
        SELECT 1 FROM pg_catalog.pg_proc p
         WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND p.oid = d.objid
           AND p.pronamespace IN (SELECT oid FROM kh_old_schemas)
        UNION ALL
        SELECT 1 FROM pg_catalog.pg_class c
         WHERE d.classid = 'pg_catalog.pg_class'::pg_catalog.regclass AND c.oid = d.objid
           AND c.relnamespace IN (SELECT oid FROM kh_old_schemas)
        UNION ALL
        SELECT 1 FROM pg_catalog.pg_type t
         WHERE d.classid = 'pg_catalog.pg_type'::pg_catalog.regclass AND t.oid = d.objid
           AND t.typnamespace IN (SELECT oid FROM kh_old_schemas)
        UNION ALL
        SELECT 1 FROM pg_catalog.pg_constraint k
         WHERE d.classid = 'pg_catalog.pg_constraint'::pg_catalog.regclass AND k.oid = d.objid
           AND k.connamespace IN (SELECT oid FROM kh_old_schemas)
        UNION ALL
        SELECT 1 FROM pg_catalog.pg_policy pol JOIN pg_catalog.pg_class c ON c.oid = pol.polrelid
         WHERE d.classid = 'pg_catalog.pg_policy'::pg_catalog.regclass AND pol.oid = d.objid
           AND c.relnamespace IN (SELECT oid FROM kh_old_schemas)
        UNION ALL
        SELECT 1 FROM pg_catalog.pg_trigger tg JOIN pg_catalog.pg_class c ON c.oid = tg.tgrelid
         WHERE d.classid = 'pg_catalog.pg_trigger'::pg_catalog.regclass AND tg.oid = d.objid
           AND (c.relnamespace IN (SELECT oid FROM kh_old_schemas)
                OR (c.oid = pg_catalog.to_regclass('auth.users')
                    AND tg.tgfoid IN (SELECT p.oid FROM pg_catalog.pg_proc p
                                       WHERE p.pronamespace IN (SELECT oid FROM kh_old_schemas))))
        UNION ALL
        SELECT 1 FROM pg_catalog.pg_rewrite rw JOIN pg_catalog.pg_class c ON c.oid = rw.ev_class
         WHERE d.classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass AND rw.oid = d.objid
           AND c.relnamespace IN (SELECT oid FROM kh_old_schemas)
        UNION ALL
        SELECT 1 FROM pg_catalog.pg_attrdef ad JOIN pg_catalog.pg_class c ON c.oid = ad.adrelid
         WHERE d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND ad.oid = d.objid
           AND c.relnamespace IN (SELECT oid FROM kh_old_schemas));

-- The application's policies and views, as they are defined now (naming the moved schemas).
CREATE TEMP TABLE kh_policies ON COMMIT DROP AS
SELECT pol.polname, pol.polrelid::pg_catalog.regclass::text AS tbl,
       pg_catalog.format('CREATE POLICY %I ON %s AS %s FOR %s TO %s%s%s', pol.polname,
           pol.polrelid::pg_catalog.regclass,
           CASE WHEN pol.polpermissive THEN 'PERMISSIVE' ELSE 'RESTRICTIVE' END,
           CASE pol.polcmd WHEN 'r' THEN 'SELECT' WHEN 'a' THEN 'INSERT' WHEN 'w' THEN 'UPDATE'
                           WHEN 'd' THEN 'DELETE' ELSE 'ALL' END,
           CASE WHEN pol.polroles = '{0}' THEN 'PUBLIC'
                ELSE (SELECT pg_catalog.string_agg(pg_catalog.quote_ident(r.rolname), ', ')
                        FROM pg_catalog.pg_roles r WHERE r.oid = ANY (pol.polroles)) END,
           ' USING (' || pg_catalog.pg_get_expr(pol.polqual, pol.polrelid) || ')',
           ' WITH CHECK (' || pg_catalog.pg_get_expr(pol.polwithcheck, pol.polrelid) || ')') AS definition
  FROM pg_catalog.pg_policy pol
 WHERE pol.oid IN (SELECT objid FROM kh_dependents
                    WHERE classid = 'pg_catalog.pg_policy'::pg_catalog.regclass);

CREATE TEMP TABLE kh_views ON COMMIT DROP AS
SELECT c.oid AS view_oid,
       pg_catalog.format('%I.%I', n.nspname, c.relname) AS view,
       pg_catalog.pg_get_viewdef(c.oid) AS definition,
       c.reloptions, c.relowner::pg_catalog.regrole AS owner,
       (SELECT pg_catalog.array_agg(pg_catalog.format('GRANT %s ON %s TO %s', a.privilege_type,
                   c.oid::pg_catalog.regclass,
                   CASE WHEN a.grantee = 0 THEN 'PUBLIC'
                        ELSE pg_catalog.quote_ident(a.grantee::pg_catalog.regrole::text) END))
          FROM pg_catalog.aclexplode(c.relacl) a WHERE a.grantee <> c.relowner) AS grants
  FROM pg_catalog.pg_rewrite rw JOIN pg_catalog.pg_class c ON c.oid = rw.ev_class
  JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE rw.oid IN (SELECT objid FROM kh_dependents
                   WHERE classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass)
   AND c.relkind = 'v';

DO $dependents$
DECLARE
    v_other text;
BEGIN
    SELECT pg_catalog.string_agg(what, '; ' ORDER BY what) INTO v_other
      FROM kh_dependents
     WHERE classid NOT IN ('pg_catalog.pg_policy'::pg_catalog.regclass,
                           'pg_catalog.pg_rewrite'::pg_catalog.regclass)
        OR (classid = 'pg_catalog.pg_rewrite'::pg_catalog.regclass
            AND objid NOT IN (SELECT rw.oid FROM pg_catalog.pg_rewrite rw
                               WHERE rw.ev_class IN (SELECT view_oid FROM kh_views)));
    IF v_other IS NOT NULL THEN
        RAISE EXCEPTION 'keyhippo: these objects of the application use KeyHippo 1.2.5''s objects and would be lost: %', v_other
            USING ERRCODE = '2BP01',
                  HINT = 'Drop them (and re-create them after the migration), then run the migration again. Nothing was changed.';
    END IF;
END
$dependents$;

DO $drop_dependents$
DECLARE
    r record;
BEGIN
    FOR r IN SELECT polname, tbl FROM kh_policies LOOP
        EXECUTE pg_catalog.format('DROP POLICY %I ON %s', r.polname, r.tbl);
    END LOOP;
    FOR r IN SELECT view FROM kh_views LOOP
        EXECUTE pg_catalog.format('DROP VIEW %s', r.view);
    END LOOP;
END
$drop_dependents$;

CREATE EXTENSION keyhippo;

-- Copying. Triggers off (superuser): the rows are copied as they are, with their ids, and the
-- audit log gets 1.2.5's rows, not new ones.
SET LOCAL session_replication_role = replica;

-- The defaults CREATE EXTENSION made give way to 1.2.5's rows.
DELETE FROM keyhippo_rbac.user_group_roles;
DELETE FROM keyhippo_rbac.role_permissions;
DELETE FROM keyhippo.scope_permissions;
DELETE FROM keyhippo.scopes;
DELETE FROM keyhippo_rbac.roles;
DELETE FROM keyhippo_rbac.groups;
DELETE FROM keyhippo_rbac.permissions;

INSERT INTO keyhippo_rbac.permissions (id, name, description)
SELECT p.id, p.name::text::keyhippo.app_permission, p.description
  FROM keyhippo_rbac_1_2_5.permissions p;
-- Every permission keyhippo knows exists, also where 1.2.5's table lacked one.
INSERT INTO keyhippo_rbac.permissions (id, name, description)
SELECT pg_catalog.md5('keyhippo permission ' || e::text)::uuid, e,
       'Permission to ' || pg_catalog.replace(e::text, '_', ' ')
  FROM pg_catalog.unnest(pg_catalog.enum_range(NULL::keyhippo.app_permission)) AS e
 WHERE NOT EXISTS (SELECT 1 FROM keyhippo_rbac.permissions p WHERE p.name = e);
INSERT INTO keyhippo_rbac.groups (id, name, description)
SELECT g.id, g.name, g.description FROM keyhippo_rbac_1_2_5.groups g;
INSERT INTO keyhippo_rbac.roles (id, name, description, group_id, role_type)
SELECT r.id, r.name, r.description, r.group_id, r.role_type::text::keyhippo.app_role
  FROM keyhippo_rbac_1_2_5.roles r;
INSERT INTO keyhippo_rbac.role_permissions (id, role_id, permission_id)
SELECT rp.id, rp.role_id, rp.permission_id FROM keyhippo_rbac_1_2_5.role_permissions rp;
DO $sequence$
BEGIN
    PERFORM pg_catalog.setval(pg_catalog.pg_get_serial_sequence('keyhippo_rbac.role_permissions', 'id'),
                              COALESCE((SELECT max(id) FROM keyhippo_rbac.role_permissions), 0) + 1, false);
END
$sequence$;
INSERT INTO keyhippo_rbac.user_group_roles (user_id, group_id, role_id)
SELECT u.user_id, u.group_id, u.role_id FROM keyhippo_rbac_1_2_5.user_group_roles u;
INSERT INTO keyhippo.scopes (id, name, description)
SELECT s.id, s.name, s.description FROM keyhippo_1_2_5.scopes s;
INSERT INTO keyhippo.scope_permissions (id, scope_id, permission_id)
SELECT sp.id, sp.scope_id, sp.permission_id FROM keyhippo_1_2_5.scope_permissions sp;

INSERT INTO keyhippo.audit_log (id, "timestamp", action, table_name, data, user_id, function_name)
SELECT a.id, a."timestamp", a.action, a.table_name, a.data, a.user_id, a.function_name
  FROM keyhippo_1_2_5.audit_log a;

-- Keys. 1.2.5 checked neither descriptions nor claims: a description keyhippo's rule refuses is
-- rewritten to fit (other characters become '_', cut to 255), claims that are not a JSON object
-- (or nest deeper than 32 levels) become {"value": <them>} or {}; each change is audited.
CREATE TEMP TABLE kh_keys ON COMMIT DROP AS
SELECT m.*,
       CASE WHEN m.description IS NULL OR keyhippo_internal.description_ok(m.description)
            THEN m.description
            ELSE pg_catalog.left(pg_catalog.regexp_replace(m.description, '[^a-zA-Z0-9_ -]', '_', 'g'), 255)
       END AS new_description,
       CASE WHEN m.claims IS NULL OR keyhippo_internal.claims_ok(m.claims) THEN m.claims
            WHEN keyhippo_internal.claims_ok(pg_catalog.jsonb_build_object('value', m.claims))
            THEN pg_catalog.jsonb_build_object('value', m.claims)
            ELSE '{}'::jsonb
       END AS new_claims
  FROM keyhippo_1_2_5.api_key_metadata m;

INSERT INTO keyhippo.api_key_metadata (id, user_id, scope_id, description, prefix, created_at,
                                       last_used_at, expires_at, is_revoked, claims, revoked_at,
                                       revoked_reason)
SELECT k.id, k.user_id, k.scope_id, k.new_description, k.prefix, k.created_at, k.last_used_at,
       k.expires_at, k.is_revoked, k.new_claims,
       -- 1.2.5 did not record when a key was revoked: the migration's time stands in.
       CASE WHEN k.is_revoked THEN pg_catalog.now() END,
       CASE WHEN k.is_revoked THEN 'revoked' END
  FROM kh_keys k;

-- The hashes of live keys, under the algorithm name verify checks 1.2.5's keys with. (1.2.5
-- deleted a revoked key's hash; one left behind is not copied.)
INSERT INTO keyhippo.api_key_secrets (key_metadata_id, key_hash)
SELECT s.key_metadata_id, 'keyhippo125$' || pg_catalog.lower(s.key_hash)
  FROM keyhippo_1_2_5.api_key_secrets s
  JOIN kh_keys k ON k.id = s.key_metadata_id
 WHERE NOT k.is_revoked;

INSERT INTO keyhippo.audit_log (action, table_name, data, function_name)
SELECT 'migrated_description', 'api_key_metadata',
       pg_catalog.jsonb_build_object('id', k.id, 'from', k.description, 'to', k.new_description),
       'migrate_from_keyhippo_1.2.5'
  FROM kh_keys k WHERE k.new_description IS DISTINCT FROM k.description;
INSERT INTO keyhippo.audit_log (action, table_name, data, function_name)
SELECT 'migrated_claims', 'api_key_metadata',
       pg_catalog.jsonb_build_object('id', k.id, 'from', k.claims, 'to', k.new_claims),
       'migrate_from_keyhippo_1.2.5'
  FROM kh_keys k WHERE k.new_claims IS DISTINCT FROM k.claims;

-- Settings that still mean something. Not 1.2.5's installation id or ping, and not its vendor's
-- endpoint: the audit webhook stays on only if it pointed at an endpoint of the user's own.
UPDATE keyhippo_internal.config c SET value = o.value
  FROM keyhippo_internal_1_2_5.config o
 WHERE o.key = c.key
   AND o.key IN ('enable_key_expiry_notifications', 'key_expiry_notification_hours',
                 'audit_log_retention_days');
INSERT INTO keyhippo_internal.config (key, value, description)
SELECT o.key, o.value, 'Endpoint the audit webhook sends audit rows to'
  FROM keyhippo_internal_1_2_5.config o
 WHERE o.key = 'audit_log_endpoint'
   AND NULLIF(pg_catalog.btrim(o.value), '') IS NOT NULL
   AND o.value NOT LIKE 'https://app.keyhippo.com/%';

INSERT INTO keyhippo.audit_log (action, table_name, data, function_name)
VALUES ('migrated_from_keyhippo_1.2.5', NULL,
        pg_catalog.jsonb_build_object(
            'keys', (SELECT count(*) FROM kh_keys),
            'revoked_keys', (SELECT count(*) FROM kh_keys WHERE is_revoked),
            'scopes', (SELECT count(*) FROM keyhippo.scopes),
            'groups', (SELECT count(*) FROM keyhippo_rbac.groups),
            'roles', (SELECT count(*) FROM keyhippo_rbac.roles),
            'role_assignments', (SELECT count(*) FROM keyhippo_rbac.user_group_roles)),
        'migrate_from_keyhippo_1.2.5');

SET LOCAL session_replication_role = origin;

-- The audit webhook, where 1.2.5 had it on towards the user's own endpoint (needs pg_net).
DO $webhook$
BEGIN
    IF EXISTS (SELECT 1 FROM keyhippo_internal_1_2_5.config o
                WHERE o.key = 'enable_http_logging' AND pg_catalog.lower(o.value) = 'true')
       AND EXISTS (SELECT 1 FROM keyhippo_internal.config c WHERE c.key = 'audit_log_endpoint')
       AND pg_catalog.to_regproc('net.http_post') IS NOT NULL THEN
        PERFORM keyhippo_internal.enable_audit_log_notify();
    END IF;
END
$webhook$;

-- 1.2.5's objects go, with its trigger on auth.users; keyhippo's own replaced it. (Quietly:
-- the list of what goes is long.)
SET LOCAL client_min_messages = warning;
DROP SCHEMA keyhippo_1_2_5, keyhippo_rbac_1_2_5, keyhippo_internal_1_2_5,
            keyhippo_impersonation_1_2_5 CASCADE;

-- The application's policies and views, naming keyhippo's objects.
DO $recreate$
DECLARE
    r record;
    v_sql text;
BEGIN
    FOR r IN SELECT definition FROM kh_policies LOOP
        v_sql := pg_catalog.regexp_replace(r.definition,
                     '(keyhippo(_rbac|_internal|_impersonation)?)_1_2_5\.', '\1.', 'g');
        EXECUTE v_sql;
    END LOOP;
    FOR r IN SELECT view, definition, reloptions, owner, grants FROM kh_views LOOP
        v_sql := pg_catalog.regexp_replace(r.definition,
                     '(keyhippo(_rbac|_internal|_impersonation)?)_1_2_5\.', '\1.', 'g');
        EXECUTE pg_catalog.format('CREATE VIEW %s%s AS %s', r.view,
            CASE WHEN r.reloptions IS NULL THEN ''
                 ELSE ' WITH (' || pg_catalog.array_to_string(r.reloptions, ', ') || ')' END,
            v_sql);
        EXECUTE pg_catalog.format('ALTER VIEW %s OWNER TO %s', r.view, r.owner);
        IF r.grants IS NOT NULL THEN
            FOR v_sql IN SELECT pg_catalog.unnest(r.grants) LOOP
                EXECUTE v_sql;
            END LOOP;
        END IF;
    END LOOP;
END
$recreate$;

COMMIT;
