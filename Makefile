# keyhippo: the commands the README names. Each target installs what it needs (bin/deps).
#
# PG selects the PostgreSQL major version (14 to 18, default 15) of the private build that
# build, run, test and bench use (bin/pg fetches it under target/pg). Only `make install`
# touches a PostgreSQL of the machine's: the one whose pg_config is PG_CONFIG.
PG ?= 15
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
BENCH_KEYS ?= 100000
export PG

.PHONY: deps build install package package-all test-package run stop test test-all test-ci installcheck bench clean

deps:
	bin/deps

build: deps
	cargo build --release --no-default-features --features pg$(PG)

## Build and install the extension into the PostgreSQL of PG_CONFIG (each file renamed into
## place: safe on a running server; restart it before ALTER EXTENSION keyhippo UPDATE).
install: deps
	PG_CONFIG=$(PG_CONFIG) bin/install

## Release packages for PostgreSQL $(PG) in target/dist: a .deb for Debian's and PGDG's
## postgresql-$(PG), and a tarball of the same files for any other PostgreSQL $(PG).
package: deps
	bin/package

## The packages for PostgreSQL 14, 15, 16, 17 and 18.
package-all: deps
	for v in 14 15 16 17 18; do PG=$$v bin/package || exit 1; done

## The packages installed: the .deb on Debian's postgresql-15 (installed if missing), the
## tarball in the private build of 17 (part of test-all and test-ci).
test-package: deps
	bin/deps --package
	PG=15 bin/package
	PG=17 bin/package
	tests/package.sh

## A throwaway cluster of the private build with a Supabase-shaped database, the extension,
## and a short demo.
run: deps
	bin/install-private
	bin/demo

## Stop and remove the `make run` cluster.
stop:
	bin/cluster stop run

## Every test layer on PostgreSQL $(PG), ending with "N passed, N failed".
test: deps
	bin/test

## Every test layer on PostgreSQL 14, 15, 16, 17 and 18.
test-all: deps
	bin/test-all

## What CI runs: every layer on 15 and 17, pg_upgrade 15 -> 17 and the packages; build,
## #[pg_test]s, pg_regress and updates between keyhippo versions on 14, 16 and 18.
test-ci: deps
	bin/test-all 15:all 17:all 14:2,3 16:2,3 18:2,3

## The benchmark on PostgreSQL $(PG) (figures and ratios in one run, see docs/benchmarks.md):
## BENCH_KEYS=1000000 for the large run.
bench: deps
	bin/install-private
	BENCH_KEYS=$(BENCH_KEYS) bench/run.sh

## Only the pg_regress suite on PostgreSQL $(PG).
installcheck: deps
	bin/install-private
	bin/installcheck

clean: stop
	cargo clean
