# reparam_mm: `make demo` (the main job) and `make test`. Both set up .venv first.
PY ?= python3
VENV_PY := .venv/bin/python
PYTEST_ARGS ?=

.PHONY: setup test demo bench env
setup:
	$(PY) tools/setup_env.py

test: setup
	$(VENV_PY) -m pytest $(PYTEST_ARGS)

env: setup
	$(VENV_PY) -m reparam_mm.env
