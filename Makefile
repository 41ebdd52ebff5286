# The README's two commands: `make demo` (the main job) and `make test`. Each installs what is
# missing first (scripts/install.sh is idempotent: seconds on an installed tree).
VENV ?= .venv
PY := $(VENV)/bin/python
ARGS ?=

.PHONY: install demo test bench
install:
	bash scripts/install.sh

demo: install
	$(PY) -m tir.cli quickstart $(ARGS)

test: install
	$(PY) -m pytest $(ARGS)

bench: install
	$(PY) benchmarks/batch_transfer.py
