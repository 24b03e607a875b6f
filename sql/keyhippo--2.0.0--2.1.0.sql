-- keyhippo 2.0.0 -> 2.1.0: rate limits (keyhippo.set_rate_limit, keyhippo.set_owner_rate_limit)
-- and credits (keyhippo.set_credits, keyhippo.spend_credits),
-- counted in shared memory by verify_api_key_status and check_request (HTTP 429, also for JWT
-- API keys); a key imported with import_api_key is seen at once by backends that had found no
-- imported key before; verifications per key and hour in keyhippo.api_key_usage.

-- A server still running an older library cannot run this version's SQL: restart it first.
SELECT keyhippo_internal.require_library('2.1.0');

-- Rate limits (keyhippo.set_rate_limit, keyhippo.set_owner_rate_limit): at most max_requests
-- admissions per window of `per`, counted in shared memory (src/limits.rs); these rows are the
-- limits themselves. One for a key, one shared by all of a user's keys.
CREATE TABLE keyhippo.api_key_rate_limits (
    api_key_id uuid PRIMARY KEY REFERENCES keyhippo.api_key_metadata (id) ON DELETE CASCADE,
    max_requests integer NOT NULL CONSTRAINT api_key_rate_limits_max_requests_check CHECK (max_requests > 0),
    per interval NOT NULL CONSTRAINT api_key_rate_limits_per_check
        CHECK (per > interval '0' AND per <= interval '366 days' AND pg_catalog.date_part('month', per) = 0
               AND pg_catalog.date_part('year', per) = 0),
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE keyhippo.api_key_rate_limits IS
    'Rate limits of single keys (keyhippo.set_rate_limit): at most max_requests admitted requests per window of per';

CREATE TABLE keyhippo.owner_rate_limits (
    user_id uuid PRIMARY KEY,
    max_requests integer NOT NULL CONSTRAINT owner_rate_limits_max_requests_check CHECK (max_requests > 0),
    per interval NOT NULL CONSTRAINT owner_rate_limits_per_check
        CHECK (per > interval '0' AND per <= interval '366 days' AND pg_catalog.date_part('month', per) = 0
               AND pg_catalog.date_part('year', per) = 0),
    updated_at timestamptz NOT NULL DEFAULT pg_catalog.now()
);
COMMENT ON TABLE keyhippo.owner_rate_limits IS
    'Rate limits shared by all keys of one user (keyhippo.set_owner_rate_limit)';

-- Credits (keyhippo.set_credits): what a key may still spend, each admitted request costing 1
-- and keyhippo.spend_credits more. The live balance is in shared memory (src/credits.rs);
-- remaining is what the background workers last wrote back, for the refill window that starts
-- at refilled_at. granted_at tells one grant from the next.
CREATE TABLE keyhippo.api_key_credits (
    api_key_id uuid PRIMARY KEY REFERENCES keyhippo.api_key_metadata (id) ON DELETE CASCADE,
    remaining bigint NOT NULL CONSTRAINT api_key_credits_remaining_check CHECK (remaining >= 0),
    refill_amount bigint CONSTRAINT api_key_credits_refill_amount_check CHECK (refill_amount > 0),
    refill_interval interval CONSTRAINT api_key_credits_refill_interval_check
        CHECK (refill_interval > interval '0' AND refill_interval <= interval '366 days'
               AND pg_catalog.date_part('month', refill_interval) = 0
               AND pg_catalog.date_part('year', refill_interval) = 0),
    granted_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    refilled_at timestamptz NOT NULL DEFAULT pg_catalog.clock_timestamp(),
    CONSTRAINT api_key_credits_refill_check CHECK ((refill_amount IS NULL) = (refill_interval IS NULL))
);
COMMENT ON TABLE keyhippo.api_key_credits IS
    'Credits of keys (keyhippo.set_credits): remaining as last written by keyhippo''s background workers, and the refill';

-- Verifications per key and hour, by outcome: counted in shared memory by the calls that admit
-- a request (verify_api_key_status, check_request) and added here by the background workers
-- (src/usage_counts.rs), which delete rows older than keyhippo.usage_retention.
CREATE TABLE keyhippo.api_key_usage (
    api_key_id uuid NOT NULL REFERENCES keyhippo.api_key_metadata (id) ON DELETE CASCADE,
    hour timestamptz NOT NULL,
    outcome text NOT NULL CONSTRAINT api_key_usage_outcome_check
        CHECK (outcome IN ('VALID', 'RATE_LIMITED', 'USAGE_EXCEEDED', 'EXPIRED', 'DISABLED')),
    count bigint NOT NULL CONSTRAINT api_key_usage_count_check CHECK (count > 0),
    PRIMARY KEY (api_key_id, hour, outcome)
);
-- The retention delete, and questions about a period across all keys.
CREATE INDEX api_key_usage_hour_idx ON keyhippo.api_key_usage (hour);
COMMENT ON TABLE keyhippo.api_key_usage IS
    'Verifications per key and hour by outcome (verify_api_key_status, check_request), written by keyhippo''s background workers; kept for keyhippo.usage_retention';

SELECT pg_catalog.pg_extension_config_dump('keyhippo.api_key_rate_limits', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo.owner_rate_limits', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo.api_key_usage', '');
SELECT pg_catalog.pg_extension_config_dump('keyhippo.api_key_credits', '');

CREATE FUNCTION keyhippo_internal."rate_limit_refusal"() RETURNS jsonb
STRICT VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'rate_limit_refusal_wrapper';

CREATE FUNCTION keyhippo_internal."jwt_api_key_status"() RETURNS TEXT
STRICT VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path TO pg_catalog, pg_temp
LANGUAGE c
AS 'MODULE_PATHNAME', 'jwt_api_key_status_wrapper';
CREATE FUNCTION keyhippo_internal."spend_credits_now"("p_cost" INT) RETURNS jsonb
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'spend_credits_now_wrapper';
REVOKE ALL ON FUNCTION keyhippo_internal.jwt_api_key_status() FROM PUBLIC;
GRANT EXECUTE ON FUNCTION keyhippo_internal.jwt_api_key_status() TO anon, authenticated, service_role;

CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo.api_key_rate_limits
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo.owner_rate_limits
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();
CREATE TRIGGER keyhippo_audit AFTER INSERT OR UPDATE OR DELETE ON keyhippo.api_key_credits
    FOR EACH ROW EXECUTE FUNCTION keyhippo_internal.audit_change();

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

-- PostgREST's hook answers 429 for a key whose limit is used up, JWT API keys included.
CREATE OR REPLACE FUNCTION keyhippo.check_request() RETURNS void
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

COMMENT ON TYPE keyhippo.verify_api_key_status_result IS
    'The row verify_api_key_status returns: VALID, NOT_FOUND, EXPIRED, DISABLED or RATE_LIMITED, and the key when its secret matched.';
COMMENT ON FUNCTION keyhippo.verify_api_key_status(text) IS
    'Exactly one row: status VALID, NOT_FOUND, EXPIRED, DISABLED or RATE_LIMITED (the request is counted against the key''s rate limits); the key''s id, owner, scope and expiry only when its secret matched, its permissions only when VALID.';

-- A key imported from elsewhere is found by a lookup that backends skip while they know the
-- database holds none (src/imported_keys.rs): its arrival must make that knowledge stale too.
-- (A key made here needs nothing: no cache holds a prefix that did not exist.)
CREATE TRIGGER keyhippo_cache_imported AFTER INSERT ON keyhippo.api_key_secrets
    FOR EACH ROW WHEN (NEW.key_hash LIKE 'imported-%')
    EXECUTE FUNCTION keyhippo_internal.note_key_change();
ALTER TABLE keyhippo.api_key_secrets ENABLE ALWAYS TRIGGER keyhippo_cache_imported;
