#!/usr/bin/env bash
# bin/install (what `make install` runs) on a running server: keyhippo preloaded, two
# connections verifying keys and a third opening a new connection for every verify, while the
# library and SQL files are replaced ten times. No process may crash: each file is renamed into
# place (a new inode every time), never written over while processes run its code. Needs the
# extension built and installed into the private build (bin/install). Ends with "install: N passed, N failed".
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
PORT=${INSTALL_PORT:-55446}
WORK="$ROOT/target/install-test"
. bin/env.sh
LIB="$("$PG_CONFIG" --pkglibdir)/keyhippo.so"
EXTRA_CONF="shared_preload_libraries = 'keyhippo'" bin/cluster start install "$PORT" || exit 1
trap 'bin/cluster stop install' EXIT
PORT=$(bin/cluster port install)
rm -rf "$WORK"; mkdir -p "$WORK"
export PGPORT=$PORT
. tests/lib.sh
setup_kh
read -r key _ <<<"$(new_key install)"
start_verify_load "$key" 8 "$WORK"
inodes=$(stat -c %i "$LIB")
for i in $(seq 1 10); do
    bin/install --prebuilt >/dev/null || echo "install $i failed"
    inodes="$inodes $(stat -c %i "$LIB")"
    sleep 0.3
done
check_verify_load "the installs" "$ROOT/target/clusters/install/server.log"
check "the server still answers, with keyhippo" 1 "$(q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')")"
# Each install leaves a different file (inode) in place than the one before it; a freed inode
# may come back later, so only neighbours are compared.
check "every install renamed a new file into place" 10 \
    "$(echo "$inodes" | tr ' ' '\n' | awk 'NR > 1 && $1 != prev {n++} {prev = $1} END {print n + 0}')"
check "no temporary files left" 0 "$(find "$(dirname "$LIB")" "$("$PG_CONFIG" --sharedir)/extension" -name '.keyhippo*' | wc -l)"
echo "install: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
