#!/usr/bin/env bash
# make bench: keyhippo's performance, measured in one run on a throwaway cluster (docs/benchmarks.md).
#
#   BENCH_KEYS    keys created (default 100000; 1000000 for the large run)
#   BENCH_ROUNDS  rounds of each pgbench measurement; medians are reported (default 5)
#   BENCH_SECONDS length of each pgbench run (default 10)
#   BENCH_CREATE_JOBS  connections creating the keys in parallel (default: the number of cores)
#   BENCH_COST_ROUNDS  rounds of each in-database cost loop; medians are reported (default 7)
#   BENCH_FRESH_KEYS=1 keys never used before (default: in service, last_used_at already set)
#   BENCH_RECORD_USES=0 no use is due during the run (last_used_at set now, interval a day):
#                      what verify costs without recording and writing last_used_at
#
# The cluster runs the private PostgreSQL build of $PG (default 15) in the configuration a user
# has by default: keyhippo preloaded (verify records uses in shared memory, background workers
# write last_used_at), synchronous_commit on, the keys in a database not named postgres.
# BENCH_PRELOAD=0 measures the server without preloading (the synchronous fallback).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
. bin/env.sh
PORT=${BENCH_PORT:-55450}
N=${BENCH_KEYS:-100000}
ROUNDS=${BENCH_ROUNDS:-5}
SECONDS_PER_RUN=${BENCH_SECONDS:-10}
PRELOAD=${BENCH_PRELOAD:-1}
JOBS=${BENCH_CREATE_JOBS:-$(nproc)}
# The in-database cost loops are short (10,000 calls): more rounds for a steadier median.
COST_ROUNDS=${BENCH_COST_ROUNDS:-7}
OUT="$ROOT/target/bench"
rm -rf "$OUT"; mkdir -p "$OUT"

# Memory and WAL sized for a million keys (as anyone running that many would); everything else
# as PostgreSQL ships it: fsync on (the throwaway test clusters turn it off), synchronous_commit
# on.
conf="shared_buffers = 2GB
max_wal_size = 4GB
fsync = on"
if [ "$PRELOAD" = 1 ]; then
    conf="$conf
shared_preload_libraries = 'keyhippo'"
fi
RECORD=${BENCH_RECORD_USES:-1}
if [ "$RECORD" = 0 ]; then
    conf="$conf
keyhippo.last_used_interval = 86400"
fi
EXTRA_CONF="$conf" bin/cluster start bench "$PORT"
trap 'bin/cluster stop bench' EXIT
PORT=$(bin/cluster port bench)
export PGHOST=127.0.0.1 PGPORT=$PORT PGUSER=postgres PGDATABASE=bench
q() { "$PGBIN/psql" -X -q -t -A -v ON_ERROR_STOP=1 "$@"; }
q -d postgres -c 'CREATE DATABASE bench'
q -f tests/fixtures/supabase.sql -c 'CREATE EXTENSION keyhippo' >/dev/null

USER_ID=aaaaaaaa-aaaa-4aaa-8aaa-aaaaaaaaaaaa
AS_USER="SELECT set_config('request.jwt.claims', '{\"sub\":\"$USER_ID\",\"role\":\"authenticated\"}', false) IS NULL"
q -c "INSERT INTO auth.users (id, email) VALUES ('$USER_ID', 'bench@example.com')"
q -c "CREATE TABLE bench_keys (i int PRIMARY KEY, key text NOT NULL)"

echo "creating $N keys on $JOBS connections ..."
start=$(date +%s.%N)
pids=()
for j in $(seq 0 $((JOBS - 1))); do
    # Connection j creates the keys i with i % JOBS = j, in one statement.
    q -c "$AS_USER" -c "INSERT INTO bench_keys SELECT i, (keyhippo.create_api_key('bench ' || i)).api_key FROM generate_series(1, $N) i WHERE i % $JOBS = $j" >/dev/null &
    pids+=($!)
done
for p in "${pids[@]}"; do wait "$p" || { echo "creating keys failed" >&2; exit 1; }; done
create_seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
# Keys in service: a deployment's keys have been used before, so their last_used_at is set.
# BENCH_FRESH_KEYS=1 keeps the keys never used, every recorded use in the rounds then a first
# one (the row grows from NULL to a time). Bulk set-up as a restore would do it: no audit rows
# (session_replication_role = replica).
FRESH=${BENCH_FRESH_KEYS:-0}
if [ "$RECORD" = 0 ]; then
    q -c "SET session_replication_role = replica" \
      -c "UPDATE keyhippo.api_key_metadata SET last_used_at = now()" >/dev/null
elif [ "$FRESH" != 1 ]; then
    q -c "SET session_replication_role = replica" \
      -c "UPDATE keyhippo.api_key_metadata SET last_used_at = created_at - interval '1 day'" >/dev/null
fi
# 10,000 more keys, each with a rate limit and credits it never reaches (a limit of
# 2,000,000,000 an hour, 10^15 credits), for verify_api_key_status and check_request() with
# and without them.
LIMITED=10000
q -c "$AS_USER" -c "INSERT INTO bench_keys SELECT i, (keyhippo.create_api_key('limited ' || i)).api_key FROM generate_series($((N + 1)), $((N + LIMITED))) i" >/dev/null
q -c "SET session_replication_role = replica" \
  -c "INSERT INTO keyhippo.api_key_rate_limits (api_key_id, max_requests, per) SELECT id, 2000000000, '1 hour' FROM keyhippo.api_key_metadata WHERE description LIKE 'limited %'" \
  -c "INSERT INTO keyhippo.api_key_credits (api_key_id, remaining) SELECT id, 1000000000000000 FROM keyhippo.api_key_metadata WHERE description LIKE 'limited %'" >/dev/null
# VACUUM marks the pages all-visible, as autovacuum would find them later in a real database.
q -c "CHECKPOINT" -c "VACUUM ANALYZE" -c "CHECKPOINT"

cat >"$OUT/floor.sql" <<SQL
\set i random(1, $N)
SELECT key FROM bench_keys WHERE i = :i;
SQL
cat >"$OUT/verify.sql" <<SQL
\set i random(1, $N)
SELECT user_id FROM keyhippo.verify_api_key((SELECT key FROM bench_keys WHERE i = :i));
SQL
cat >"$OUT/floor10k.sql" <<SQL
\set i random(1, 10000)
SELECT key FROM bench_keys WHERE i = :i;
SQL
cat >"$OUT/verify10k.sql" <<SQL
\set i random(1, 10000)
SELECT user_id FROM keyhippo.verify_api_key((SELECT key FROM bench_keys WHERE i = :i));
SQL
cat >"$OUT/status.sql" <<SQL
\set i random(1, $N)
SELECT status FROM keyhippo.verify_api_key_status((SELECT key FROM bench_keys WHERE i = :i));
SQL
cat >"$OUT/status_limited.sql" <<SQL
\set i random($((N + 1)), $((N + LIMITED)))
SELECT status FROM keyhippo.verify_api_key_status((SELECT key FROM bench_keys WHERE i = :i));
SQL
cat >"$OUT/status_unlimited.sql" <<SQL
\set i random(1, $LIMITED)
SELECT status FROM keyhippo.verify_api_key_status((SELECT key FROM bench_keys WHERE i = :i));
SQL
echo "SELECT 1;" >"$OUT/select1.sql"
# Verify with the lookup as a prepared SQL statement instead of the index probes (the *_sql
# kinds run with keyhippo.verify_index_probes = off).
cp "$OUT/verify.sql" "$OUT/verify_sql.sql"

# Runs one pgbench; prints "tps latency_ms". Kinds ending in _cache run the same script with
# the per-backend verified-key cache switched on (keyhippo.verified_key_cache, off by default).
pgb() {
    local script=$1 options=${PGOPTIONS:-}
    case "$script" in *_cache.sql)
        script=${script%_cache.sql}.sql; options="$options -c keyhippo.verified_key_cache=on" ;;
    *_sql.sql)
        options="$options -c keyhippo.verify_index_probes=off" ;;
    esac
    PGOPTIONS="$options" "$PGBIN/pgbench" -n -M prepared -c 2 -j 2 -T "$SECONDS_PER_RUN" -f "$script" bench >"$OUT/pgbench.last" 2>&1 ||
        { cat "$OUT/pgbench.last" >&2; return 1; }
    tps=$(sed -nE 's/^tps = ([0-9]+)(\.[0-9]+)? \(without initial connection time\)/\1/p' "$OUT/pgbench.last")
    lat=$(sed -nE 's/^latency average = ([0-9.]+) ms/\1/p' "$OUT/pgbench.last")
    echo "$tps $lat"
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2 ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2)}'; }

rounds_start=$(q -c "SELECT now()")
stats() { q -F ' ' -c "SELECT n_tup_upd, n_tup_hot_upd, autovacuum_count FROM pg_stat_user_tables WHERE relid = 'keyhippo.api_key_metadata'::regclass"; }
read -r upd0 hot0 av0 <<<"$(stats)"
# Each verify run right after its floor run, and the run over the first 10,000 keys right after
# the run over all of them: the ratios taken round by round below compare runs a few seconds
# apart, not minutes.
kinds="floor verify status status_unlimited status_limited verify_sql select1"
[ "$N" -gt 10000 ] && kinds="floor verify status status_unlimited status_limited verify10k floor10k verify_sql select1 verify_cache verify10k_cache"
for r in $(seq 1 "$ROUNDS"); do
    for k in $kinds; do
        read -r tps lat <<<"$(pgb "$OUT/$k.sql")"
        echo "$tps" >>"$OUT/$k.tps"; echo "$lat" >>"$OUT/$k.lat"
        echo "  round $r $k: $tps tps, $lat ms"
    done
done

# How the background worker's writes of last_used_at went during the pgbench rounds: rows
# updated, and how many of them as HOT updates (no index entries).
q -c "SELECT keyhippo.flush_key_usage()" >/dev/null
sleep 1
read -r upd hot av <<<"$(stats)"
upd=$((upd - upd0)); hot=$((hot - hot0)); av=$((av - av0))
used_keys=$(q -c "SELECT count(*) FROM keyhippo.api_key_metadata WHERE last_used_at >= '$rounds_start'")

cost() { q -c "$AS_USER" -f bench/cost.sql -c "BEGIN" -c "SELECT round(pg_temp.cost_$1(10000)::numeric, 1)" -c "ROLLBACK" | tail -1; }
# What runs before leaves work behind: uses for the background worker to write, dead row
# versions for autovacuum (the create and revoke loops roll back 10,000 new keys each), dirty
# pages for the checkpointer. Every round therefore runs on a database settled first (uses
# written, VACUUM, CHECKPOINT), so that no operation is measured while PostgreSQL cleans up
# after another one on the same two CPUs. The rounds of the operations take turns rather than
# running back to back: one round lasts well under a second and this machine's speed moves
# by up to half for a minute at a time (see docs/benchmarks.md), so each median is taken over
# rounds spread across the whole phase instead of over one or two seconds of it.
settle() { q -c "SELECT keyhippo.flush_key_usage()" -c "VACUUM ANALYZE" -c "CHECKPOINT" >/dev/null; }
for r in $(seq 1 "$COST_ROUNDS"); do
    for k in verify status verify_sql create revoke authorize; do
        settle
        cost "$k" >>"$OUT/cost_$k"
    done
    # With and without a rate limit, one right after the other.
    for k in "status_from(1, " "status_from($((N + 1)), " "check_from(1, " "check_from($((N + 1)), "; do
        settle
        name=$(echo "$k" | sed -E "s/\(1, /_unlimited/; s/\([0-9]+, /_limited/")
        q -c "$AS_USER" -f bench/cost.sql -c "BEGIN" -c "SELECT round(pg_temp.cost_${k}10000)::numeric, 1)" -c "ROLLBACK" | tail -1 >>"$OUT/cost_$name"
    done
done

m() { median <"$OUT/$1"; }
floor=$(m floor.tps); verify=$(m verify.tps); select1=$(m select1.tps)
div() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.3f", a / b}'; }
ratio=$(div "$verify" "$floor")
# The ratio $2 / $1 of each round, a line each.
by_round() { paste "$OUT/$1.tps" "$OUT/$2.tps" | while read -r a b; do div "$b" "$a"; echo; done; }
{
echo
echo "## keyhippo benchmark"
echo
echo "$(nproc) cores, $(free -g | awk '/^Mem/ {print $2}') GiB, $(uname -m), PostgreSQL $("$PGBIN/postgres" --version | awk '{print $3}'), $(date -u +%Y-%m-%d)."
echo "Keys: $N; pgbench -M prepared -c 2 -j 2 -T $SECONDS_PER_RUN; medians of $ROUNDS rounds ($COST_ROUNDS for the in-database loops);"
echo "shared_preload_libraries: $([ "$PRELOAD" = 1 ] && echo keyhippo || echo none); fsync: $(q -c "SHOW fsync"); synchronous_commit: $(q -c "SHOW synchronous_commit"); database: $(q -c "SELECT current_database()"); keys $([ "$RECORD" = 0 ] && echo 'used just now, none due during the run (BENCH_RECORD_USES=0)' || { [ "$FRESH" = 1 ] && echo 'never used before (BENCH_FRESH_KEYS=1)' || echo 'in service (last_used_at set a day before the run)'; })."
echo
echo "| measurement | median | rounds |"
echo "|---|---|---|"
echo "| floor: \`SELECT key FROM bench_keys WHERE i = :i\` | $floor tps, $(m floor.lat) ms | $(paste -sd' ' "$OUT/floor.tps") |"
echo "| \`verify_api_key\` on that key | $verify tps, $(m verify.lat) ms | $(paste -sd' ' "$OUT/verify.tps") |"
echo "| \`verify_api_key\`, the lookup as a prepared statement (\`keyhippo.verify_index_probes = off\`) | $(m verify_sql.tps) tps, $(m verify_sql.lat) ms | $(paste -sd' ' "$OUT/verify_sql.tps") |"
echo "| \`verify_api_key_status\` on that key | $(m status.tps) tps, $(m status.lat) ms | $(paste -sd' ' "$OUT/status.tps") |"
paired=$(by_round verify status)
echo "| verify_api_key_status / verify_api_key round by round (each status run right after its verify run) | $(median <<<"$paired") | $(paste -sd' ' <<<"$paired") |"
echo "| verify with index probes / with the prepared statement | $(div "$verify" "$(m verify_sql.tps)") | |"
echo "| \`SELECT 1\` | $select1 tps, $(m select1.lat) ms | $(paste -sd' ' "$OUT/select1.tps") |"
echo "| **verify / floor** | **$ratio** (target >= 0.6) | |"
# Each round's verify run follows its floor run: their ratio round by round cancels most of
# the machine's drift between rounds, which the ratio of the two medians above does not.
paired=$(by_round floor verify)
echo "| verify / floor round by round (each verify run right after its floor run) | $(median <<<"$paired") | $(paste -sd' ' <<<"$paired") |"
if [ -f "$OUT/verify10k.tps" ]; then
    v10k=$(m verify10k.tps)
    echo "| verify, keys drawn from the first 10,000 | $v10k tps | $(paste -sd' ' "$OUT/verify10k.tps") |"
    echo "| **verify at $N keys / at 10,000** | **$(div "$verify" "$v10k")** (target >= 0.9) | |"
    paired=$(by_round verify10k verify)
    echo "| verify at $N keys / at 10,000 round by round (each 10,000-key run right after its $N-key run) | $(median <<<"$paired") | $(paste -sd' ' <<<"$paired") |"
    f10k=$(m floor10k.tps)
    echo "| floor, keys drawn from the first 10,000 | $f10k tps | $(paste -sd' ' "$OUT/floor10k.tps") |"
    echo "| floor at $N keys / at 10,000 (the same scaling for the bare lookup) | $(div "$floor" "$f10k") | |"
    vc=$(m verify_cache.tps); v10kc=$(m verify10k_cache.tps)
    echo "| verify with the verified-key cache on (\`keyhippo.verified_key_cache = on\`) | $vc tps, $(m verify_cache.lat) ms | $(paste -sd' ' "$OUT/verify_cache.tps") |"
    echo "| verify over the first 10,000, cache on | $v10kc tps | $(paste -sd' ' "$OUT/verify10k_cache.tps") |"
    echo "| verify at $N keys / at 10,000, cache on | $(div "$vc" "$v10kc") | |"
fi
echo "| keys whose last_used_at was written during the pgbench rounds | $used_keys | |"
echo "| rows updated by those writes (of which HOT updates) | $upd ($hot) | |"
echo "| autovacuum runs on the key table during the rounds | $av | |"
echo "| in-database cost, verify | $(m cost_verify) µs per call (target <= 10) | $(paste -sd' ' "$OUT/cost_verify") |"
echo "| in-database cost, verify_api_key_status | $(m cost_status) µs per call | $(paste -sd' ' "$OUT/cost_status") |"
echo "| \`verify_api_key_status\` on keys without a rate limit (the first $LIMITED) | $(m status_unlimited.tps) tps | $(paste -sd' ' "$OUT/status_unlimited.tps") |"
echo "| \`verify_api_key_status\` on $LIMITED keys with a rate limit and credits | $(m status_limited.tps) tps | $(paste -sd' ' "$OUT/status_limited.tps") |"
paired=$(by_round status_unlimited status_limited)
echo "| status with a limit and credits / without, round by round | $(median <<<"$paired") | $(paste -sd' ' <<<"$paired") |"
paired=$(by_round floor status_limited)
echo "| status with a limit and credits / floor, round by round | $(median <<<"$paired") | $(paste -sd' ' <<<"$paired") |"
echo "| in-database cost, verify_api_key_status without / with a rate limit and credits | $(m cost_status_from_unlimited) / $(m cost_status_from_limited) µs per call (goal: at most 3 more) | $(paste -sd' ' "$OUT/cost_status_from_unlimited") / $(paste -sd' ' "$OUT/cost_status_from_limited") |"
echo "| in-database cost, check_request() without / with a rate limit and credits | $(m cost_check_from_unlimited) / $(m cost_check_from_limited) µs per call | $(paste -sd' ' "$OUT/cost_check_from_unlimited") / $(paste -sd' ' "$OUT/cost_check_from_limited") |"
echo "| in-database cost, verify with the prepared statement | $(m cost_verify_sql) µs per call | $(paste -sd' ' "$OUT/cost_verify_sql") |"
echo "| in-database cost, create | $(m cost_create) µs per call (target <= 150) | $(paste -sd' ' "$OUT/cost_create") |"
echo "| in-database cost, revoke | $(m cost_revoke) µs per call | $(paste -sd' ' "$OUT/cost_revoke") |"
echo "| in-database cost, authorize | $(m cost_authorize) µs per call | $(paste -sd' ' "$OUT/cost_authorize") |"
echo "| creating $N keys ($JOBS connections, one INSERT ... SELECT create_api_key() each) | $create_seconds s$([ "$N" -ge 1000000 ] && echo ' (target <= 60)') | |"
} | tee "$OUT/results.md"

# Every run is also a line of target/bench-results/runs.csv (kept across runs), from which
# bench/chart draws verify and the floor against the number of keys per PostgreSQL version.
RESULTS="$ROOT/target/bench-results"
mkdir -p "$RESULTS"
CSV="$RESULTS/runs.csv"
[ -s "$CSV" ] || echo "pg,pg_version,keys,preloaded,record_uses,floor_tps,verify_tps,floor_10k_tps,verify_10k_tps,verify_us,create_us,date" >"$CSV"
echo "$PG,$("$PGBIN/postgres" --version | awk '{print $3}'),$N,$PRELOAD,$RECORD,$floor,$verify,$([ -f "$OUT/floor10k.tps" ] && m floor10k.tps),$([ -f "$OUT/verify10k.tps" ] && m verify10k.tps),$(m cost_verify),$(m cost_create),$(date -u +%Y-%m-%d)" >>"$CSV"
cp "$OUT/results.md" "$RESULTS/pg$PG-$N-keys$([ "$PRELOAD" = 1 ] || echo -no-preload)$([ "$RECORD" = 1 ] || echo -no-uses).md"
echo
bench/chart "$CSV" "$RESULTS/verify-vs-floor.svg" ||
    echo "bench/chart: no chart drawn (the figures above stand)"
echo "All runs so far: $CSV; to show them in docs/benchmarks.md, copy the lines into"
echo "docs/benchmarks.csv and run: bench/chart docs/benchmarks.csv docs/benchmarks.svg"
