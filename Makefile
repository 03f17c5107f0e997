# Everything a fresh machine needs: `make demo` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
DEMO_OUT ?= demo_out
export NO_ALBUMENTATIONS_UPDATE := 1
export WANDB_MODE := disabled
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo lint test test-fast bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py aimv2data/loader/_jpegcrop.c scripts/install.sh
	PYTHON=$(PYTHON) bash scripts/install.sh $(VENV)
	touch $@

demo: install
	$(VENV)/bin/aimv2 demo -o $(DEMO_OUT)

lint: install
	$(PY) -m ruff check .

test: lint
	$(PY) -m pytest -q -rs

test-fast: install
	$(PY) -m pytest -q -m "not slow"

clean:
	rm -rf $(DEMO_OUT) .pytest_cache
