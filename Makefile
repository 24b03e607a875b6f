# keyhippo: the commands the README names. Each target installs what it needs (bin/deps).
PG_CONFIG ?= /usr/lib/postgresql/15/bin/pg_config
BENCH_KEYS ?= 100000

.PHONY: deps build install run stop test installcheck bench clean

deps:
	bin/deps

build: deps
	cargo build --release

## Build and install the extension into the system's Postgres 15 (each file renamed into place:
## safe on a running server; restart it before ALTER EXTENSION keyhippo UPDATE).
install: deps
	PG_CONFIG=$(PG_CONFIG) bin/install

## A throwaway cluster with a Supabase-shaped database, the extension, and a short demo.
run: install
	bin/demo

## Stop and remove the `make run` cluster.
stop:
	bin/cluster stop run

## Every test layer, ending with "N passed, N failed".
test: deps
	bin/test

## The benchmark (figures and ratios in one run, see BENCHMARKS.md): BENCH_KEYS=1000000 for the large run.
bench: install
	BENCH_KEYS=$(BENCH_KEYS) bench/run.sh

## Only the pg_regress suite (after make install).
installcheck: install
	bin/installcheck

clean: stop
	cargo clean
