# Every target creates the virtual environment it needs; nothing is assumed installed beyond python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

# The real Yandex AI Studio SDK for tests/test_yandex_compat.py: it pins protobuf<7 (through
# yandexcloud) while Spindle runs protobuf 7, so it gets an environment of its own and the tests
# drive it in a subprocess.
YANDEX_VENV ?= .venv-yandex
YANDEX_STAMP := $(YANDEX_VENV)/.installed-stamp
YANDEX_SDK := yandex-cloud-ml-sdk==0.19.1 yandex-ai-studio-sdk==0.22.0

LLAMA_VENV ?= .venv-llama
LLAMA_PYTHON := $(wildcard $(abspath $(LLAMA_VENV))/bin/python)

.PHONY: serve test test-sqlite test-postgresql pg pg-stop replicas replicas-runs proto yandex-proto yandex-sdk lint bench bench-smoke llama clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

$(YANDEX_STAMP): Makefile
	$(PYTHON) -m venv $(YANDEX_VENV)
	$(YANDEX_VENV)/bin/python -m pip install --quiet --upgrade pip
	$(YANDEX_VENV)/bin/python -m pip install --quiet $(YANDEX_SDK)
	touch $(YANDEX_STAMP)

# Only the Yandex SDK's environment (make test builds it too).
yandex-sdk: $(YANDEX_STAMP)

serve: $(STAMP)
	$(VENV)/bin/spindle-server $(ARGS)

# Two passes: everything on SQLite, then the integration tests (those that start a server) on a
# private PostgreSQL cluster the session starts (tests/support/postgres.py). The second pass
# skips, saying why, where PostgreSQL is not installed (CI installs it: .ci/run).
# With .venv-llama (make llama), the end-to-end tests against llama.cpp's server run too.
# The Yandex SDK's tests run where $(YANDEX_VENV) is (built by the test targets).
TEST_ENV = SPINDLE_LLAMA_PYTHON=$(LLAMA_PYTHON) SPINDLE_YANDEX_PYTHON=$(abspath $(YANDEX_VENV))/bin/python
test: test-sqlite test-postgresql

test-sqlite: $(STAMP) $(YANDEX_STAMP)
	SPINDLE_TEST_STORE=sqlite $(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

test-postgresql: $(STAMP) $(YANDEX_STAMP)
	SPINDLE_TEST_STORE=postgresql $(TEST_ENV) $(PY) -m pytest $(PYTEST_ARGS)

# A private PostgreSQL under .pg/ for development: prints the SPINDLE_DATABASE to export
# (eval "$$(make -s pg)"); make pg-stop stops it, the data stays until rm -rf .pg.
pg: $(STAMP)
	@$(PY) scripts/pg_cluster.py start

pg-stop: $(STAMP)
	@$(PY) scripts/pg_cluster.py stop

# Three replicas on make pg's PostgreSQL with nginx in front (scripts/replicas.py): prints the
# address for SPINDLE_TARGET and the PIDs; Ctrl-C stops them. ARGS: e.g. --count 2 -- --log-level debug
replicas: $(STAMP)
	@$(PY) scripts/replicas.py start $(ARGS)

# The runs not finished yet and the PID of the replica executing each (for kill -9).
replicas-runs: $(STAMP)
	@$(PY) scripts/replicas.py runs

# llama-cpp-python's OpenAI-compatible server, compiled from source (about 3 minutes), for
# tests/test_llama_cpp.py: a real provider on the wire, with a tiny random model it writes.
llama:
	$(PYTHON) -m venv $(LLAMA_VENV)
	CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAVA_BUILD=OFF" $(LLAMA_VENV)/bin/pip install --quiet \
		'llama-cpp-python[server]==0.3.36' 'gguf==0.19.0' numpy || { rm -rf $(LLAMA_VENV); exit 1; }

proto: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) scripts/genproto.py

# Recompiles server/spindle_server/compat/yandex/gen from the protos the yandexcloud package ships.
yandex-proto: $(STAMP) $(YANDEX_STAMP)
	$(PY) scripts/genyandex.py

lint: $(STAMP)
	$(VENV)/bin/ruff check client server tests bench examples scripts
	$(VENV)/bin/ruff format --check client server tests bench examples scripts
	$(VENV)/bin/mypy
	$(VENV)/bin/mypy tests/client/conftest.py  # see [tool.mypy] exclude in pyproject.toml

bench: $(STAMP)
	$(PY) -m bench

# Every benchmark, small, in seconds; writes nothing (CI runs it so the benchmarks cannot rot).
bench-smoke: $(STAMP)
	$(PY) -m bench --smoke

clean:
	rm -rf $(VENV) $(LLAMA_VENV) $(YANDEX_VENV) .pytest_cache .mypy_cache .ruff_cache
