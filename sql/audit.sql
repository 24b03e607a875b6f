-- keyhippo audit trail, key-expiry notifications and the opt-in webhook.
--
-- Nothing here sends anything outside the database unless the operator installs pg_net, sets
-- keyhippo_internal.config 'audit_log_endpoint', and calls keyhippo_internal.enable_audit_log_notify().

-- Configuration read by the functions below. (PL/pgSQL functions keep their plans for the
-- session; SQL functions called from triggers and policies are planned at every call.)
CREATE FUNCTION keyhippo_internal.config_value(p_key text) RETURNS text
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RETURN (SELECT c.value FROM keyhippo_internal.config c WHERE c.key = p_key);
END
$$;

-- The expiry window: key_expiry_notification_hours, or NULL when notifications are switched off
-- (enable_key_expiry_notifications = false). Malformed values fall back to the defaults.
CREATE FUNCTION keyhippo_internal.expiry_window() RETURNS interval
LANGUAGE plpgsql STABLE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_enabled text := pg_catalog.lower(COALESCE(keyhippo_internal.config_value('enable_key_expiry_notifications'), 'true'));
    v_hours text := keyhippo_internal.config_value('key_expiry_notification_hours');
BEGIN
    IF v_enabled NOT IN ('true', 't', 'on', '1', 'yes') THEN
        RETURN NULL;
    END IF;
    IF v_hours IS NULL OR v_hours !~ '^\s*[0-9]{1,6}\s*$' THEN
        v_hours := '72';
    END IF;
    -- At most a year: the triggers below skip keys expiring later than that without a call.
    RETURN pg_catalog.make_interval(hours => LEAST(v_hours::int, 8760));
END
$$;

-- Audit ----------------------------------------------------------------------------------------

-- One audit row per INSERT, UPDATE and DELETE on keyhippo's tables: action, table, old and new
-- row as JSON, the acting user (request context; NULL for the database owner) and the keyhippo
-- function that caused it. api_key_secrets is not audited at all (its rows are hashes), and
-- config values whose key names a secret are masked. Written in Rust (src/audit.rs); it inserts
-- the audit row with the extension owner's rights and search_path pinned.
CREATE FUNCTION keyhippo_internal.audit_change() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'keyhippo_audit_change';

CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo.api_key_metadata
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo.scopes
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo.scope_permissions
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo_rbac.groups
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo_rbac.roles
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo_rbac.permissions
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo_rbac.role_permissions
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo_rbac.user_group_roles
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo_internal.config
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo.api_key_rate_limits
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo.owner_rate_limits
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo.api_key_credits
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();

-- Expiring keys -------------------------------------------------------------------------------

-- Finds the report of a key's expiry quickly (dedupe, and the periodic job).
CREATE INDEX audit_log_expiring_key_idx ON keyhippo.audit_log ((data -> 'expiring_key' ->> 'id'))
    WHERE action = 'expiring_key';

-- Reports one key as expiring: an 'expiring_key' audit row and a NOTIFY on channel
-- keyhippo_key_expiring (delivered at commit) carrying {event, id, expires_at}. A write that moves a key into the window is a new
-- entry and always reports (p_entered); the periodic job reports a key only if it has not been
-- reported since it entered the window (no report at or after expires_at - window). Returns
-- whether it reported.
CREATE FUNCTION keyhippo_internal.report_expiring_key(p_id uuid, p_user_id uuid, p_description text,
                                                      p_expires_at timestamptz, p_entered boolean)
RETURNS boolean
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_window interval := keyhippo_internal.expiry_window();
    v_key jsonb := pg_catalog.jsonb_build_object('id', p_id, 'user_id', p_user_id,
                                                 'description', p_description,
                                                 'expires_at', p_expires_at);
BEGIN
    IF v_window IS NULL OR (NOT p_entered AND EXISTS (
           SELECT 1 FROM keyhippo.audit_log a
            WHERE a.action = 'expiring_key'
              AND (a.data -> 'expiring_key' ->> 'id') = p_id::text
              AND a."timestamp" >= p_expires_at - v_window)) THEN
        RETURN false;
    END IF;
    INSERT INTO keyhippo.audit_log (action, table_name, data, user_id, function_name)
    VALUES ('expiring_key', 'api_key_metadata',
            pg_catalog.jsonb_build_object('event', 'expiring_key', 'expiring_key', v_key),
            keyhippo_internal.current_user_id(),
            COALESCE(keyhippo_internal.calling_function(),
                     NULLIF(pg_catalog.current_setting('keyhippo_audit.function_name', true), '')));
    -- Anyone may LISTEN: the payload names the key and its expiry only (bounded, and nothing
    -- of the owner's); a listener reads the rest with its own rights.
    PERFORM pg_catalog.pg_notify('keyhippo_key_expiring',
        pg_catalog.jsonb_build_object('event', 'expiring_key', 'id', p_id,
                                      'expires_at', p_expires_at)::text);
    RETURN true;
END
$$;

-- A write that moves a key's expiry into the window reports it (once: a key that was already
-- in the window is not reported again by later updates). Called by the trigger below for a
-- written key that may be in the window; p_old_expires_at is NULL for an INSERT.
CREATE FUNCTION keyhippo_internal.expiring_key_written(p_id uuid, p_user_id uuid,
                                                       p_description text,
                                                       p_expires_at timestamptz,
                                                       p_old_expires_at timestamptz)
RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_window interval := keyhippo_internal.expiry_window();
BEGIN
    IF v_window IS NULL THEN
        RETURN;
    END IF;
    IF p_expires_at <= pg_catalog.now() + v_window
       AND (p_old_expires_at IS NULL OR p_old_expires_at > pg_catalog.now() + v_window) THEN
        PERFORM keyhippo_internal.report_expiring_key(p_id, p_user_id, p_description,
                                                      p_expires_at, true);
    END IF;
END
$$;

-- In Rust (src/expiry.rs) and without a WHEN clause, which Postgres would parse again for
-- every statement: keys expiring more than a year from now (the widest window), revoked keys
-- and updates that leave expires_at alone are skipped without any SQL.
CREATE FUNCTION keyhippo_internal.notify_expiring_key() RETURNS trigger
LANGUAGE c AS 'MODULE_PATHNAME', 'keyhippo_notify_expiring_key';

CREATE TRIGGER keyhippo_notify_expiring_key
    AFTER INSERT OR UPDATE OF expires_at ON keyhippo.api_key_metadata
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.notify_expiring_key();

-- The periodic job. Reports every unrevoked key that time has carried into the window and that
-- has not been reported since it entered it; revokes keys whose rotation grace period is over
-- (revoked_reason stays 'rotated'; their hashes go); and, when keyhippo.disable_unused_after is
-- set, disables keys unused for that long (after writing the uses still buffered in shared
-- memory). Returns how many keys it reported as expiring. Scheduled hourly with pg_cron when
-- that is installed (see finalize.sql); otherwise call it from any scheduler:
-- psql -c 'SELECT keyhippo.update_expiring_keys()'.
CREATE FUNCTION keyhippo.update_expiring_keys() RETURNS integer
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET keyhippo_audit.function_name = 'update_expiring_keys'
AS $$
DECLARE
    v_window interval := keyhippo_internal.expiry_window();
    v_unused text := NULLIF(pg_catalog.btrim(pg_catalog.current_setting('keyhippo.disable_unused_after', true)), '');
    v_after interval;
    v_reported integer := 0;
    k record;
BEGIN
    UPDATE keyhippo.api_key_metadata m
       SET is_revoked = true, revoked_at = pg_catalog.now()
     WHERE NOT m.is_revoked AND m.revoked_reason = 'rotated' AND m.expires_at <= pg_catalog.now();
    IF v_unused IS NOT NULL THEN
        BEGIN
            v_after := v_unused::interval;
        EXCEPTION WHEN OTHERS THEN
            v_after := NULL;
        END;
        IF v_after IS NULL OR v_after <= interval '0' THEN
            RAISE WARNING 'keyhippo: keyhippo.disable_unused_after (''%'') is not a positive interval; no key was disabled', v_unused
                USING ERRCODE = '22023', HINT = 'Set it to an interval such as ''90 days'', or to '''' to switch it off.';
        ELSE
            PERFORM keyhippo.flush_key_usage();
            UPDATE keyhippo.api_key_metadata m
               SET disabled_at = pg_catalog.now()
             WHERE NOT m.is_revoked AND m.disabled_at IS NULL
               AND m.expires_at > pg_catalog.now()
               AND COALESCE(m.last_used_at, m.created_at) < pg_catalog.now() - v_after;
        END IF;
    END IF;
    IF v_window IS NULL THEN
        RETURN 0;
    END IF;
    FOR k IN SELECT m.id, m.user_id, m.description, m.expires_at
               FROM keyhippo.api_key_metadata m
              WHERE NOT m.is_revoked
                AND m.expires_at <= pg_catalog.now() + v_window
              ORDER BY m.expires_at
    LOOP
        -- One key that cannot be reported never stops the others.
        BEGIN
            IF keyhippo_internal.report_expiring_key(k.id, k.user_id, k.description, k.expires_at, false) THEN
                v_reported := v_reported + 1;
            END IF;
        EXCEPTION WHEN OTHERS THEN
            RAISE WARNING 'keyhippo: could not report API key % as expiring: %', k.id, SQLERRM
                USING ERRCODE = SQLSTATE;
        END;
    END LOOP;
    RETURN v_reported;
END
$$;

-- Retention --------------------------------------------------------------------------------------

-- Deletes audit rows older than config audit_log_retention_days (default 90); returns how many.
-- A value of 0 or less keeps everything.
CREATE FUNCTION keyhippo.purge_audit_log() RETURNS bigint
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_days text := keyhippo_internal.config_value('audit_log_retention_days');
    v_deleted bigint;
BEGIN
    IF v_days IS NULL OR v_days !~ '^\s*-?[0-9]{1,6}\s*$' THEN
        v_days := '90';
    END IF;
    IF v_days::int <= 0 THEN
        RETURN 0;
    END IF;
    DELETE FROM keyhippo.audit_log a
     WHERE a."timestamp" < pg_catalog.now() - pg_catalog.make_interval(days => v_days::int);
    GET DIAGNOSTICS v_deleted = ROW_COUNT;
    RETURN v_deleted;
END
$$;

-- Opt-in webhook through pg_net -------------------------------------------------------------------

-- Sends a new audit row to the configured endpoint, if delivery is enabled, pg_net is present
-- and an endpoint is set; otherwise does nothing. pg_net queues the request and sends it after
-- commit, from its own worker.
CREATE FUNCTION keyhippo_internal.notify_audit_change() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v_endpoint text := NULLIF(pg_catalog.btrim(keyhippo_internal.config_value('audit_log_endpoint')), '');
BEGIN
    IF keyhippo_internal.config_value('enable_http_logging') IS DISTINCT FROM 'true'
       OR v_endpoint IS NULL
       OR pg_catalog.to_regproc('net.http_post') IS NULL THEN
        RETURN NULL;
    END IF;
    EXECUTE 'SELECT net.http_post(url := $1, body := $2, headers := $3)'
      USING v_endpoint,
            pg_catalog.jsonb_build_object('id', NEW.id, 'timestamp', NEW."timestamp",
                                          'action', NEW.action, 'table_name', NEW.table_name,
                                          'user_id', NEW.user_id,
                                          'function_name', NEW.function_name, 'data', NEW.data),
            '{"Content-Type": "application/json"}'::jsonb;
    RETURN NULL;
END
$$;

-- Switches delivery of audit events to the endpoint in config 'audit_log_endpoint' on. Needs
-- pg_net and an endpoint; says so when either is missing.
CREATE FUNCTION keyhippo_internal.enable_audit_log_notify() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET keyhippo_audit.function_name = 'enable_audit_log_notify'
AS $$
BEGIN
    IF pg_catalog.to_regproc('net.http_post') IS NULL THEN
        RAISE EXCEPTION 'keyhippo: audit log delivery needs the pg_net extension'
            USING ERRCODE = '0A000', HINT = 'CREATE EXTENSION pg_net; then call this again.';
    END IF;
    IF NULLIF(pg_catalog.btrim(keyhippo_internal.config_value('audit_log_endpoint')), '') IS NULL THEN
        RAISE EXCEPTION 'keyhippo: no audit log endpoint is configured'
            USING ERRCODE = '55000',
                  HINT = 'INSERT INTO keyhippo_internal.config (key, value) VALUES (''audit_log_endpoint'', ''https://...'') ON CONFLICT (key) DO UPDATE SET value = EXCLUDED.value;';
    END IF;
    INSERT INTO keyhippo_internal.config (key, value, description)
    VALUES ('enable_http_logging', 'true', 'Deliver audit events to audit_log_endpoint through pg_net')
    ON CONFLICT (key) DO UPDATE SET value = 'true';
    CREATE OR REPLACE TRIGGER keyhippo_audit_log_notify
        AFTER INSERT ON keyhippo.audit_log
        FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.notify_audit_change();
END
$$;

-- Switches delivery off.
CREATE FUNCTION keyhippo_internal.disable_audit_log_notify() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET keyhippo_audit.function_name = 'disable_audit_log_notify'
AS $$
BEGIN
    DROP TRIGGER IF EXISTS keyhippo_audit_log_notify ON keyhippo.audit_log;
    INSERT INTO keyhippo_internal.config (key, value, description)
    VALUES ('enable_http_logging', 'false', 'Deliver audit events to audit_log_endpoint through pg_net')
    ON CONFLICT (key) DO UPDATE SET value = 'false';
END
$$;
