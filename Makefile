# Developer loop: `make test` and `make demo` create (or reuse) .venv on first use.
#
# NOTE: torch is installed on its own, pinned, BEFORE the project. An unpinned
# torch (or one pulled in by deepspeed/transformers) resolves to the multi-GB
# CUDA build on PyPI; torch==2.13.0 here comes from a local CPU wheel. On a GPU
# cluster install the CUDA wheel matching your driver yourself (see README.md).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# Touched after a successful install; re-install only when pyproject.toml changes.
STAMP  := $(VENV)/.installed

.PHONY: venv test demo clean-venv

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install torch==2.13.0
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

test: venv
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: venv
	$(BIN)/moetrain train configs/demo.yaml

clean-venv:
	rm -rf $(VENV)
