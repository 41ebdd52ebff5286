# The README's two commands: `make demo` (the main job) and `make test`. Each installs what is
# missing first (scripts/install.sh is idempotent: seconds on an installed tree).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install demo test test-fast lint bench
install:
	bash scripts/install.sh

demo: install
	$(PY) -m tir.cli quickstart $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

# The edit-test loop (under 2 minutes on 2 CPU cores): no test marked slow, ray, vllm or browser
# (pytest.ini). `make test` (CI) runs them all.
test-fast: install
	$(PY) -m pytest -m "not slow and not ray and not vllm and not browser" $(ARGS)

# ruff (pyproject.toml: line length 120): the formatter's check and the linter; CI runs it first.
lint: install
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

bench: install
	$(PY) benchmarks/batch_transfer.py
