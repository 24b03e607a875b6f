-- In-database cost per call: a PL/pgSQL loop of n calls minus the same loop without the call,
-- over distinct keys. Used by bench/run.sh; needs the table bench_keys(i, key).

CREATE OR REPLACE FUNCTION pg_temp.cost_verify(n int, by_status boolean DEFAULT false)
RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE
    keys text[] := ARRAY(SELECT key FROM bench_keys WHERE i <= n ORDER BY i);
    t0 timestamptz; t_call interval; t_empty interval; k text;
BEGIN
    t0 := clock_timestamp();
    IF by_status THEN
        FOR i IN 1..n LOOP PERFORM v.status FROM keyhippo.verify_api_key_status(keys[i]) v; END LOOP;
    ELSE
        FOR i IN 1..n LOOP PERFORM v.user_id FROM keyhippo.verify_api_key(keys[i]) v; END LOOP;
    END IF;
    t_call := clock_timestamp() - t0;
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP k := keys[i]; PERFORM k; END LOOP;
    t_empty := clock_timestamp() - t0;
    RETURN extract(epoch FROM t_call - t_empty) * 1e6 / n;
END $$;

-- verify_api_key_status over the same keys.
CREATE OR REPLACE FUNCTION pg_temp.cost_status(n int) RETURNS double precision LANGUAGE plpgsql AS $$
BEGIN
    RETURN pg_temp.cost_verify(n, true);
END $$;

-- The same with the lookup as a prepared statement (keyhippo.verify_index_probes = off).
CREATE OR REPLACE FUNCTION pg_temp.cost_verify_sql(n int) RETURNS double precision LANGUAGE plpgsql AS $$
BEGIN
    PERFORM set_config('keyhippo.verify_index_probes', 'off', true);
    RETURN pg_temp.cost_verify(n);
END $$;

CREATE OR REPLACE FUNCTION pg_temp.cost_create(n int) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; t_call interval; t_empty interval; d text;
BEGIN
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP PERFORM k.api_key FROM keyhippo.create_api_key('cost ' || i) k; END LOOP;
    t_call := clock_timestamp() - t0;
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP d := 'cost ' || i; PERFORM d; END LOOP;
    t_empty := clock_timestamp() - t0;
    RETURN extract(epoch FROM t_call - t_empty) * 1e6 / n;
END $$;

CREATE OR REPLACE FUNCTION pg_temp.cost_revoke(n int) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE
    ids uuid[] := ARRAY(SELECT k.api_key_id FROM generate_series(1, n) g,
                              keyhippo.create_api_key('revoke ' || g) k);
    t0 timestamptz; t_call interval; t_empty interval; x uuid;
BEGIN
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP PERFORM keyhippo.revoke_api_key(ids[i]); END LOOP;
    t_call := clock_timestamp() - t0;
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP x := ids[i]; PERFORM x; END LOOP;
    t_empty := clock_timestamp() - t0;
    RETURN extract(epoch FROM t_call - t_empty) * 1e6 / n;
END $$;

CREATE OR REPLACE FUNCTION pg_temp.cost_authorize(n int) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE t0 timestamptz; t_call interval; t_empty interval; p keyhippo.app_permission := 'manage_api_keys';
BEGIN
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP PERFORM keyhippo.authorize(p); END LOOP;
    t_call := clock_timestamp() - t0;
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP PERFORM p; END LOOP;
    t_empty := clock_timestamp() - t0;
    RETURN extract(epoch FROM t_call - t_empty) * 1e6 / n;
END $$;

-- verify_api_key_status and check_request() over n keys from bench_keys' row lo on (the keys
-- from BENCH_KEYS + 1 on have a rate limit and credits, those before do not). Each key is
-- counted against its limits, and pays its credit, once (once per transaction).
CREATE OR REPLACE FUNCTION pg_temp.cost_status_from(lo int, n int) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE
    keys text[] := ARRAY(SELECT key FROM bench_keys WHERE i >= lo ORDER BY i LIMIT n);
    t0 timestamptz; t_call interval; t_empty interval; k text;
BEGIN
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP PERFORM v.status FROM keyhippo.verify_api_key_status(keys[i]) v; END LOOP;
    t_call := clock_timestamp() - t0;
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP k := keys[i]; PERFORM k; END LOOP;
    t_empty := clock_timestamp() - t0;
    RETURN extract(epoch FROM t_call - t_empty) * 1e6 / n;
END $$;

CREATE OR REPLACE FUNCTION pg_temp.cost_check_from(lo int, n int) RETURNS double precision LANGUAGE plpgsql AS $$
DECLARE
    headers text[] := ARRAY(SELECT json_build_object('x-api-key', key)::text FROM bench_keys
                             WHERE i >= lo ORDER BY i LIMIT n);
    t0 timestamptz; t_call interval; t_empty interval;
BEGIN
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP
        PERFORM set_config('request.headers', headers[i], true);
        PERFORM keyhippo.check_request();
    END LOOP;
    t_call := clock_timestamp() - t0;
    t0 := clock_timestamp();
    FOR i IN 1..n LOOP PERFORM set_config('request.headers', headers[i], true); END LOOP;
    t_empty := clock_timestamp() - t0;
    RETURN extract(epoch FROM t_call - t_empty) * 1e6 / n;
END $$;
