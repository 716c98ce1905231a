# Two commands: `make run` and `make test`. Everything else here is what they stand on.
PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: run test test-fast lint format typecheck setup key clean browser nginx

# Reinstall only when the project's dependencies change.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: set up everything (venv, default model, database) and start api + worker + beat
run: $(STAMP)
	$(PY) -m app.cli run

## setup: prepare the default model and migrate the database, without starting anything
setup: $(STAMP)
	$(PY) -m app.cli setup

## test: lint, type-check and run the whole suite (PostgreSQL and Redis on this machine)
test: $(STAMP) browser nginx
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(PY) -m pytest

## test-fast: the suite without the tests that use the real default model
test-fast: $(STAMP)
	$(PY) -m pytest -m "not real_model"

## browser: Debian's chromium for the page tests (Playwright drives it; it downloads no browser)
browser:
	@test -x /usr/bin/chromium || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium >/dev/null; }

## nginx: Debian's nginx for the proxy tests (tests/deploy/test_proxy.py starts its own, on a
## free port, with deploy/nginx/default.conf); the package's own service is not needed, so it is
## stopped and disabled where systemd started it
nginx:
	@test -x /usr/sbin/nginx || { \
	  SUDO=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq nginx >/dev/null && \
	  { ! [ -d /run/systemd/system ] || $$SUDO systemctl disable --now nginx >/dev/null 2>&1 || true; }; }

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

typecheck: $(STAMP)
	$(VENV)/bin/mypy

## key: create an API key (ROLE=user|rater|admin NAME=...)
key: $(STAMP)
	$(PY) -m app.cli keys create --role $(or $(ROLE),user) --name $(or $(NAME),cli)

clean:
	rm -rf $(VENV) .cache .pytest_cache .mypy_cache .ruff_cache
