# Every target creates the virtual environment it needs; nothing is assumed installed beyond python3.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp

.PHONY: serve test proto lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/spindle-server $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(PYTEST_ARGS)

proto: $(STAMP)
	PATH=$(abspath $(VENV))/bin:$$PATH $(PY) scripts/genproto.py

lint: $(STAMP)
	$(VENV)/bin/ruff check client server tests bench
	$(VENV)/bin/ruff format --check client server tests bench
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m bench

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
