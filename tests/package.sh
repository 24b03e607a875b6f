#!/usr/bin/env bash
# The release packages of bin/package, installed the way an operator installs them, with no
# Rust toolchain, cargo or server headers on PATH:
#   - the .deb for $DEB_PG (default 15) on the machine's Debian PostgreSQL of that version (the
#     postgresql-NN package; bin/deps --package installs it): its name, version, dependencies
#     and file list; refused without postgresql-NN; dpkg -i; a cluster of that PostgreSQL's own
#     binaries with keyhippo preloaded: CREATE EXTENSION, a key created and verified, the update
#     from every earlier release; reinstalled three times under load without a crash; dpkg -r
#     removes every file it installed.
#   - the tarball for $TAR_PG (default 17) unpacked into the PyPI build of that version with its
#     install.sh: the same checks.
# Tests never install into the machine's PostgreSQL: dpkg works on a copy of the Debian
# PostgreSQL's directories (dpkg --root, its own package database holding the entries of the
# packages the .deb depends on), and the tarball goes into a copy of the PyPI build.
# Needs the packages in target/dist (bin/package for both versions). Ends with
# "package: N passed, N failed".
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
DEB_PG=${DEB_PG:-15}
TAR_PG=${TAR_PG:-17}
PORT=${PACKAGE_PORT:-55471}
WORK="$ROOT/target/package-test"
arch=$(dpkg --print-architecture)
# What an operator's shell has: no cargo, rustc or clang from a toolchain directory.
SYSTEM_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
PG=$TAR_PG
. bin/env.sh
private=$PGBIN
. tests/lib.sh
# So psql and the servers below use their own libpq, not the private build's.
unset LD_LIBRARY_PATH
export PGPORT=$PORT

version=$(sed -nE 's/^version = "([^"]+)"/\1/p' Cargo.toml | head -1)
vre=${version//./\\.}
if grep -qE "^## $vre - " CHANGELOG.md; then pkgversion=$version; else pkgversion="$version~dev"; fi
# The install scripts the packages must carry: every released version's, this version's, and
# every upgrade script.
expected_scripts() {
    {
        echo keyhippo.control
        echo "keyhippo--$version.sql"
        for f in sql/keyhippo--*.sql; do basename "$f"; done
    } | LC_ALL=C sort -u
}
# Every file under $1 with its mode, size and checksum: two listings are equal when the trees
# are.
tree_listing() {
    (cd "$1" && find . -printf '%p %y %m %s\n' | LC_ALL=C sort && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 md5sum)
}
as_postgres() { runuser -u postgres -- "$@"; }
# $1 = label: CREATE EXTENSION in a Supabase-shaped database, a key created and verified,
# then the update from each earlier release, on the cluster of $PGBIN listening on $PGPORT.
extension_works() {
    local label=$1 key id old
    setup_kh >/dev/null
    check "$label: CREATE EXTENSION keyhippo installs $version" "$version" \
        "$(q -c "SELECT extversion FROM pg_extension WHERE extname = 'keyhippo'")"
    check "$label: the library loaded is $version" "$version" "$(q -c 'SELECT keyhippo_internal.library_version()')"
    check "$label: preloaded" keyhippo "$(q -c 'SHOW shared_preload_libraries')"
    read -r key id <<<"$(new_key "from the package")"
    check "$label: a new key verifies" "$USER_A" "$(q -c "SELECT user_id FROM keyhippo.verify_api_key('$key')")"
    check "$label: its status is VALID" VALID "$(q -c "SELECT status FROM keyhippo.verify_api_key_status('$key')")"
    q -c "$as_a" -c "SELECT keyhippo.revoke_api_key('$id')" >/dev/null
    check "$label: revoked, it is refused" 0 "$(q -c "SELECT count(*) FROM keyhippo.verify_api_key('$key')")"
    for old in $(ls sql | sed -nE 's/^keyhippo--([0-9.]+)\.sql$/\1/p'); do
        [ "$old" != "$version" ] || continue
        q -d postgres -c "CREATE DATABASE upd" \
            && q -d upd -c 'SET client_min_messages = warning' -f tests/fixtures/supabase.sql -c "CREATE EXTENSION keyhippo VERSION '$old'" \
                -c "INSERT INTO auth.users (id, email) VALUES ('$USER_A', 'a@example.com')" >/dev/null
        key=$(q -d upd -c "$as_a" -c "SELECT api_key FROM keyhippo.create_api_key('made before the update')" | tail -1)
        q -d upd -c 'ALTER EXTENSION keyhippo UPDATE' >/dev/null
        check "$label: ALTER EXTENSION keyhippo UPDATE from $old reaches $version" "$version" \
            "$(q -d upd -c "SELECT extversion FROM pg_extension WHERE extname = 'keyhippo'")"
        check "$label: ... and the key made on $old verifies" "$USER_A" \
            "$(q -d upd -c "SELECT user_id FROM keyhippo.verify_api_key('$key')")"
        q -d postgres -c "DROP DATABASE upd WITH (FORCE)"
    done
}

rm -rf "$WORK"
mkdir -p "$WORK"
p="$WORK"; while [ "$p" != / ]; do chmod o+x "$p" 2>/dev/null || true; p=$(dirname "$p"); done

############ The .deb on the machine's Debian PostgreSQL
deb="$ROOT/target/dist/postgresql-$DEB_PG-keyhippo_${pkgversion}_$arch.deb"
name="postgresql-$DEB_PG-keyhippo"
echo "== $(basename "$deb") on Debian's postgresql-$DEB_PG"
if [ "$(dpkg-query -W -f '${Status}' "postgresql-$DEB_PG" 2>/dev/null)" != "install ok installed" ]; then
    check "Debian's postgresql-$DEB_PG is installed (bin/deps --package)" installed missing
elif [ ! -f "$deb" ]; then
    check "the package exists (bin/package with PG=$DEB_PG)" "$deb" missing
else
    check "package name" "$name" "$(dpkg-deb -f "$deb" Package)"
    check "package version: Cargo.toml's, ~dev until CHANGELOG.md dates it" "$pkgversion" "$(dpkg-deb -f "$deb" Version)"
    check "CHANGELOG.md has a section for it (dated once released)" yes \
        "$(grep -qE "^## ($vre - |Unreleased \($vre\))" CHANGELOG.md && echo yes || echo no)"
    check "architecture" "$arch" "$(dpkg-deb -f "$deb" Architecture)"
    depends=$(dpkg-deb -f "$deb" Depends)
    check "depends on postgresql-$DEB_PG first" "postgresql-$DEB_PG" "${depends%%,*}"
    # The package's files: the library, the control file, every install and upgrade script,
    # the documents. Nothing else, all owned by root.
    {
        echo "./usr/lib/postgresql/$DEB_PG/lib/keyhippo.so"
        expected_scripts | sed "s|^|./usr/share/postgresql/$DEB_PG/extension/|"
        for f in README.md changelog.gz copyright; do echo "./usr/share/doc/$name/$f"; done
    } | LC_ALL=C sort >"$WORK/deb-expected"
    dpkg-deb -c "$deb" | awk '$1 !~ /^d/ {print $6}' | LC_ALL=C sort >"$WORK/deb-files"
    check "file list: the library, every install and upgrade script, the documents" "" \
        "$(diff "$WORK/deb-expected" "$WORK/deb-files" | grep '^[<>]' | tr '\n' ' ')"
    check "every file and directory is owned by root" 0 "$(dpkg-deb -c "$deb" | awk '$2 != "root/root"' | wc -l)"
    dpkg-deb -x "$deb" "$WORK/deb-contents"
    for f in sql/keyhippo--*.sql; do
        cmp -s "$f" "$WORK/deb-contents/usr/share/postgresql/$DEB_PG/extension/$(basename "$f")" \
            || check "$(basename "$f") is the repository's" same different
    done
    lib="$WORK/deb-contents/usr/lib/postgresql/$DEB_PG/lib/keyhippo.so"
    check "the library is stripped of debug information" 0 "$(readelf -S "$lib" | grep -c '\.debug_')"
    check "... and keeps the symbols PostgreSQL looks up" yes \
        "$(nm -D --defined-only "$lib" | grep -qw Pg_magic_func && nm -D --defined-only "$lib" | grep -qw _PG_init && echo yes || echo no)"

    # A copy of the machine's postgresql-$DEB_PG, and a package database knowing the packages
    # the .deb depends on.
    R="$WORK/root"
    mkdir -p "$R/usr/lib/postgresql" "$R/usr/share/postgresql" "$R/var/lib/dpkg/info" "$R/var/lib/dpkg/updates"
    cp -a "/usr/lib/postgresql/$DEB_PG" "$R/usr/lib/postgresql/"
    cp -a "/usr/share/postgresql/$DEB_PG" "$R/usr/share/postgresql/"
    # (a keyhippo installed on the machine by make install is not the package's)
    rm -f "$R/usr/lib/postgresql/$DEB_PG/lib/keyhippo.so" "$R/usr/share/postgresql/$DEB_PG/extension/keyhippo"*
    touch "$R/var/lib/dpkg/available" "$R/var/lib/dpkg/status"
    dpkg_r() { env PATH="$SYSTEM_PATH" dpkg --root="$R" --log="$WORK/dpkg.log" "$@"; }
    # First, a root whose package database has nothing in it.
    R0="$WORK/root-without-postgresql"
    mkdir -p "$R0/var/lib/dpkg/info" "$R0/var/lib/dpkg/updates"
    touch "$R0/var/lib/dpkg/available" "$R0/var/lib/dpkg/status"
    check "without postgresql-$DEB_PG, dpkg refuses to configure it" "refused, names postgresql-$DEB_PG" \
        "$(if env PATH="$SYSTEM_PATH" dpkg --root="$R0" --log="$WORK/dpkg.log" -i "$deb" >"$WORK/dpkg-nodeps.log" 2>&1; then echo accepted
           elif grep -q "depends on postgresql-$DEB_PG" "$WORK/dpkg-nodeps.log"; then echo "refused, names postgresql-$DEB_PG"
           else echo "refused: $(tr '\n' ' ' <"$WORK/dpkg-nodeps.log")"; fi)"
    for dep in $(echo "$depends" | tr ',' '\n' | sed -E 's/\(.*\)//; s/ //g'); do
        dpkg-query -s "$dep" >>"$R/var/lib/dpkg/status" && echo >>"$R/var/lib/dpkg/status"
    done
    tree_listing "$R/usr" >"$WORK/before"

    dpkg_r -i "$deb" >"$WORK/dpkg-install.log" 2>&1
    check "dpkg -i installs it" "0 install ok installed" "$? $(dpkg_r -s "$name" 2>/dev/null | sed -n 's/^Status: //p')"
    dpkg_r -L "$name" | while read -r f; do [ -d "$R$f" ] || echo ".$f"; done | LC_ALL=C sort >"$WORK/deb-installed"
    check "the files it installed are the package's" "" "$(diff "$WORK/deb-files" "$WORK/deb-installed" | grep '^[<>]' | tr '\n' ' ')"

    # A cluster of that PostgreSQL's own binaries.
    PGBIN="$R/usr/lib/postgresql/$DEB_PG/bin"
    check "the cluster runs Debian's PostgreSQL $DEB_PG" yes \
        "$("$PGBIN/postgres" --version | grep -qE "PostgreSQL\) $DEB_PG\..*Debian" && echo yes || echo "no: $("$PGBIN/postgres" --version)")"
    if PATH="$SYSTEM_PATH" PGBIN="$PGBIN" EXTRA_CONF="shared_preload_libraries = 'keyhippo'" \
        bin/cluster start package-deb "$PORT"; then
        PGPORT=$(PGBIN="$PGBIN" bin/cluster port package-deb)
        extension_works "deb"
        # Reinstalling under load: dpkg renames each file into place, so neither the running
        # connections nor the ones opening meanwhile (loading the library) crash.
        read -r key _ <<<"$(new_key "under load")"
        start_verify_load "$key" 6 "$WORK"
        inode=$(stat -c %i "$R/usr/lib/postgresql/$DEB_PG/lib/keyhippo.so") renamed=0
        for i in 1 2 3; do
            dpkg_r -i "$deb" >>"$WORK/dpkg-reinstall.log" 2>&1 || echo "reinstall $i failed"
            now=$(stat -c %i "$R/usr/lib/postgresql/$DEB_PG/lib/keyhippo.so")
            [ "$now" = "$inode" ] || renamed=$((renamed + 1))
            inode=$now
            sleep 0.5
        done
        check "reinstalled three times: each a new file renamed into place" 3 "$renamed"
        check_verify_load "the reinstalls" "$ROOT/target/clusters/package-deb/server.log"
        PGBIN="$PGBIN" bin/cluster stop package-deb
    else
        check "a cluster of Debian's PostgreSQL $DEB_PG starts with keyhippo preloaded" started failed
    fi

    dpkg_r -r "$name" >"$WORK/dpkg-remove.log" 2>&1
    check "dpkg -r removes it" "0 not installed" "$? $(dpkg_r -s "$name" >/dev/null 2>&1 && echo installed || echo 'not installed')"
    tree_listing "$R/usr" >"$WORK/after"
    check "... and every file it installed: the PostgreSQL directories are as before" "" \
        "$(diff "$WORK/before" "$WORK/after" | grep '^[<>]' | head -5 | tr '\n' ' ')"
fi

############ The tarball in the PyPI build
tarball="$ROOT/target/dist/keyhippo-$pkgversion-pg$TAR_PG-$arch.tar.gz"
top="keyhippo-$pkgversion-pg$TAR_PG-$arch"
echo "== $(basename "$tarball") in the PyPI build of PostgreSQL $TAR_PG"
if [ ! -f "$tarball" ]; then
    check "the tarball exists (bin/package with PG=$TAR_PG)" "$tarball" missing
else
    {
        echo "$top/INSTALL"
        echo "$top/install.sh"
        echo "$top/lib/keyhippo.so"
        expected_scripts | sed "s|^|$top/share/extension/|"
    } | LC_ALL=C sort >"$WORK/tar-expected"
    tar -tzf "$tarball" | grep -v '/$' | LC_ALL=C sort >"$WORK/tar-files"
    check "tarball file list: library, scripts, INSTALL, install.sh" "" \
        "$(diff "$WORK/tar-expected" "$WORK/tar-files" | grep '^[<>]' | tr '\n' ' ')"
    mkdir -p "$WORK/unpacked" && tar -xzf "$tarball" -C "$WORK/unpacked"
    check "INSTALL names the version and PostgreSQL $TAR_PG" yes \
        "$(grep -q "keyhippo $pkgversion for PostgreSQL $TAR_PG" "$WORK/unpacked/$top/INSTALL" && echo yes || echo no)"

    # A copy of the PyPI build, without the keyhippo the test suites installed into it.
    C="$WORK/pg$TAR_PG"
    cp -a "$(dirname "$private")" "$C"
    rm -f "$("$C/bin/pg_config" --pkglibdir)/keyhippo.so" "$("$C/bin/pg_config" --sharedir)/extension/keyhippo"*
    tree_listing "$C" >"$WORK/tar-before"
    other=/usr/lib/postgresql/$DEB_PG/bin/pg_config
    [ "$DEB_PG" != "$TAR_PG" ] && [ -x "$other" ] &&
        check "install.sh refuses a PostgreSQL of another version" "1 names $TAR_PG" \
            "$(env PATH="$SYSTEM_PATH" PG_CONFIG="$other" sh "$WORK/unpacked/$top/install.sh" >"$WORK/install-other.log" 2>&1; echo -n "$? ";
               grep -q "PostgreSQL $TAR_PG" "$WORK/install-other.log" && echo "names $TAR_PG" || cat "$WORK/install-other.log")"
    env PATH="$SYSTEM_PATH" LD_LIBRARY_PATH="$C/lib" PG_CONFIG="$C/bin/pg_config" \
        sh "$WORK/unpacked/$top/install.sh" >"$WORK/install.log" 2>&1
    check "install.sh installs it" 0 "$?"
    installed=$( (cd "$C" && find . -type f -name 'keyhippo*' | sed -E 's|.*/||') | LC_ALL=C sort)
    check "... exactly the tarball's library and scripts" \
        "$( (echo keyhippo.so; expected_scripts) | LC_ALL=C sort | tr '\n' ' ')" "$(echo "$installed" | tr '\n' ' ')"
    check "... no temporary files left" 0 "$(find "$C" -name '.keyhippo*' | wc -l)"
    export LD_LIBRARY_PATH="$C/lib"
    PGBIN="$C/bin"
    if EXTRA_CONF="shared_preload_libraries = 'keyhippo'" PGBIN="$PGBIN" bin/cluster start package-tar "$((PORT + 1))"; then
        PGPORT=$(PGBIN="$PGBIN" bin/cluster port package-tar)
        extension_works "tar.gz"
        PGBIN="$PGBIN" bin/cluster stop package-tar
    else
        check "a cluster of PostgreSQL $TAR_PG starts with keyhippo preloaded" started failed
    fi
fi

echo "package: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
