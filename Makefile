# keyhippo: the commands the README names. Each target installs what it needs (bin/deps).
#
# PG selects the PostgreSQL major version (14 to 18, default 15) of the private build that
# build, run, test and bench use (bin/pg fetches it under target/pg). Only `make install`
# touches a PostgreSQL of the machine's: the one whose pg_config is PG_CONFIG.
PG ?= 15
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
BENCH_KEYS ?= 100000
export PG

.PHONY: deps build install run stop test test-all test-ci installcheck bench clean

deps:
	bin/deps

build: deps
	cargo build --release --no-default-features --features pg$(PG)

## Build and install the extension into the PostgreSQL of PG_CONFIG (each file renamed into
## place: safe on a running server; restart it before ALTER EXTENSION keyhippo UPDATE).
install: deps
	PG_CONFIG=$(PG_CONFIG) bin/install

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

## What CI runs: every layer on 15 and 17; build, #[pg_test]s, pg_regress and updates between
## keyhippo versions on 14, 16 and 18.
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
