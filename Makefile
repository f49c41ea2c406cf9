# `make run` and `make test` bootstrap .venv from nothing; both are quick once it exists.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: run test lint typecheck pytest install clean bench browser soak node

install: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

run: $(STAMP)
	$(BIN)/cvi-agent serve

lint: $(STAMP)
	$(BIN)/ruff check cvi_agent tests
	$(BIN)/ruff format --check cvi_agent tests
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy --strict cvi_agent tests

# The console's browser test drives Debian's Chromium (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the console test"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq chromium >/dev/null; }

# The official OpenAI Node SDK for tests/test_compat_node.py, pinned by its lockfile; installed
# again only when the lockfile is newer than the install (npm ci writes node_modules/.package-lock.json).
NODE_DIR := tests/clients/node
NODE_STAMP := $(NODE_DIR)/node_modules/.package-lock.json

node: $(NODE_STAMP)

$(NODE_STAMP): $(NODE_DIR)/package.json $(NODE_DIR)/package-lock.json
	npm ci --prefix $(NODE_DIR) --no-audit --no-fund
	@touch $(NODE_STAMP)

pytest: $(STAMP) browser node
	$(BIN)/python -m pytest -q

test: lint typecheck pytest

bench: $(STAMP)
	$(BIN)/cvi-agent bench

# 200 concurrent conversations for 10 minutes (a 1-minute variant runs in `make test`)
soak: $(STAMP)
	$(BIN)/cvi-agent soak

clean:
	rm -rf $(VENV) var .mypy_cache .pytest_cache .ruff_cache $(NODE_DIR)/node_modules
