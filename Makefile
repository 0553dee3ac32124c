# Devyard — the two commands a new user runs are `make up` and `make test`; both install what is
# missing first (Debian packages, npm dependencies) and build.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Debian packages come from host-packages.json (each with the programs Devyard starts from it and
# why): `runtime` for `make up`, plus `test` for `make test` and `bench` for `make bench`. Node.js
# reads the list, since it is on the machine before anything is installed.
host_packages = $(shell node -p 'Object.keys(require("./host-packages.json").$(1)).join(" ")')
APT_PACKAGES := $(call host_packages,runtime)
APT_TEST_PACKAGES := $(call host_packages,test)
APT_BENCH_PACKAGES := $(call host_packages,bench)
UP_ARGS ?=

.PHONY: help deps apt-deps apt-test-deps apt-bench-deps npm-deps build up test test-unit test-host test-e2e bench lint clean

help:
	@echo "make up     install what is missing, build, and run Devyard on this machine"
	@echo "make test   install what is missing and run the whole test suite (tiers: make test-unit, test-host, test-e2e)"
	@echo "make bench  run the benchmarks and write docs/benchmarks.md"
	@echo "make lint   ESLint (incl. the import-direction rule) and the TypeScript build (packages and benchmarks)"

# Installs whichever of the tier's packages are missing, in one apt-get run.
apt-deps: PKGS = $(APT_PACKAGES)
apt-test-deps: PKGS = $(APT_TEST_PACKAGES)
apt-bench-deps: PKGS = $(APT_BENCH_PACKAGES)
apt-deps apt-test-deps apt-bench-deps:
	@missing=$$(for p in $(PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done | tr '\n' ' '); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

# npm ci only when node_modules is missing or older than the lock file.
npm-deps:
	@if [ ! -f node_modules/.package-lock.json ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then \
	  echo "installing npm dependencies (native modules compile from source: about two minutes)"; \
	  npm ci --no-audit --no-fund; \
	fi

deps: apt-deps npm-deps

build: deps
	npx tsc -b packages/cli

up: build
	@ln -sf "$(CURDIR)/bin/devyard" /usr/local/bin/devyard && echo "devyard is on PATH (/usr/local/bin/devyard)"
	./bin/devyard up $(UP_ARGS)

test: build apt-test-deps
	npx vitest run

# One tier of the suite (vitest.config.ts): unit, host or e2e.
test-unit test-host test-e2e: build apt-test-deps
	npx vitest run --project $(@:test-%=%)

bench: build apt-bench-deps
	npx tsc -b bench
	node bench/dist/bench/run-benchmarks.js

lint: npm-deps
	npx eslint .
	npx tsc -b packages/cli
	npx tsc -b bench
	# The tests and benchmarks against the sources, as vitest runs them (tsconfig.test.json).
	npx tsc -p tsconfig.test.json

clean:
	rm -rf packages/*/dist
