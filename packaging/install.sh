#!/bin/sh
# Installs the keyhippo files of this archive into the PostgreSQL whose pg_config is
# $PG_CONFIG (default: pg_config on PATH). Each file is written under a temporary name next to
# its destination and renamed into place: a running server never reads a half-written library.
# Restart PostgreSQL afterwards, before ALTER EXTENSION keyhippo UPDATE.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
PG_CONFIG=${PG_CONFIG:-pg_config}
if ! version=$("$PG_CONFIG" --version 2>/dev/null); then
    echo "install.sh: cannot run $PG_CONFIG; set PG_CONFIG to your PostgreSQL's pg_config" >&2
    exit 1
fi
major=$(echo "$version" | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')
if [ "$major" != @PG@ ]; then
    echo "install.sh: this archive is keyhippo for PostgreSQL @PG@, and $PG_CONFIG is $version; use the archive for PostgreSQL $major" >&2
    exit 1
fi
libdir=$("$PG_CONFIG" --pkglibdir)
extdir=$("$PG_CONFIG" --sharedir)/extension

place() { # file, destination directory
    mkdir -p "$2"
    tmp=$(mktemp "$2/.$(basename "$1").XXXXXX")
    cp "$1" "$tmp"
    chmod 0644 "$tmp"
    mv -f "$tmp" "$2/$(basename "$1")"
}
# The library first: the new scripts may name functions only it has.
place "$here/lib/keyhippo.so" "$libdir"
for f in "$here"/share/extension/*; do
    place "$f" "$extdir"
done
echo "keyhippo installed into $libdir and $extdir"
echo "next: shared_preload_libraries = 'keyhippo' in postgresql.conf, restart PostgreSQL, CREATE EXTENSION keyhippo;"
