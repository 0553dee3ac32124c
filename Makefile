# Devyard — the two commands a new user runs are `make up` and `make test`; both install what is
# missing first (Debian packages, npm dependencies) and build.
SHELL := /bin/bash
.DEFAULT_GOAL := help

# Host tools the sandbox runtime and the built-in images need; the box tools bundle (SFTP, rsync) is
# built from openssh-sftp-server and rsync; `devyard ssh` runs the OpenSSH client. The microVM
# runtime needs QEMU and qemu-img, e2fsprogs for its disks, gcc to build its guest agent and zstd
# for portable snapshots.
APT_PACKAGES := crun bubblewrap debootstrap busybox-static iproute2 nftables util-linux procps ca-certificates git openssh-sftp-server rsync openssh-client \
  qemu-system-x86 qemu-utils e2fsprogs gcc libc6-dev zstd
# Extra packages for the test suite only (headless Chromium drives the browser tests).
APT_TEST_PACKAGES := curl docker-registry skopeo apache2-utils chromium
# The gateway benchmark compares against OpenSSH's sshd.
APT_BENCH_PACKAGES := openssh-server
UP_ARGS ?=

.PHONY: help deps apt-deps apt-test-deps apt-bench-deps npm-deps build up test bench lint clean

help:
	@echo "make up     install what is missing, build, and run Devyard on this machine"
	@echo "make test   install what is missing and run the whole test suite"
	@echo "make bench  run the benchmarks and write docs/benchmarks.md"
	@echo "make lint   ESLint (incl. the import-direction rule) and the TypeScript build"

apt-deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages: $$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi

apt-test-deps apt-bench-deps: PKGS = $(if $(filter apt-test-deps,$@),$(APT_TEST_PACKAGES),$(APT_BENCH_PACKAGES))
apt-test-deps apt-bench-deps:
	@missing=$$(for p in $(PKGS); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
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

bench: build apt-bench-deps
	npx tsc -b bench
	node bench/dist/bench/run-benchmarks.js

lint: npm-deps
	npx eslint .
	npx tsc -b packages/cli

clean:
	rm -rf packages/*/dist
