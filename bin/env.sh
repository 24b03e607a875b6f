# Sourced by the scripts under bin/, tests/ and bench/: the private PostgreSQL build they use.
#   PG          major version, 14 to 18 (default 15)
#   PGBIN       its bin directory (bin/pg fetches the build once, under target/pg/$PG)
#   PG_CONFIG   its pg_config
#   PGRX_HOME   cargo-pgrx's configuration for the private builds (target/pgrx), so that
#               cargo pgrx never uses, or installs into, a PostgreSQL of the machine's
#   LD_LIBRARY_PATH  the build's lib directory first
: "${ROOT:?set ROOT before sourcing bin/env.sh}"
PG=${PG:-15}
PGBIN=$("$ROOT/bin/pg" "$PG") || { echo "no PostgreSQL $PG build" >&2; exit 1; }
PG_CONFIG=$PGBIN/pg_config
PGRX_HOME=$ROOT/target/pgrx
# The build's own libpq (its programs and libpqwalreceiver look for it where the build was
# made, and would otherwise load another version's, or none).
LD_LIBRARY_PATH=$(dirname "$PGBIN")/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
export PG PGBIN PG_CONFIG PGRX_HOME LD_LIBRARY_PATH
mkdir -p "$PGRX_HOME"
# Every private build fetched so far, so cargo pgrx finds pgNN for each.
{
    echo "[configs]"
    for d in "$ROOT"/target/pg/1[4-8]; do
        [ -x "$d/bin/pg_config" ] && echo "pg$(basename "$d") = \"$d/bin/pg_config\""
    done
} >"$PGRX_HOME/config.toml.new" && mv "$PGRX_HOME/config.toml.new" "$PGRX_HOME/config.toml"
