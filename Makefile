# `make demo` and `make test` create (or reuse) the virtual environment .venv and run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test install clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	# the CPU build of torch 2.13.0 (local on the reference machine); elsewhere install your build first
	$(PY) -m pip install --quiet "torch==2.13.0"
	$(PY) -m pip install --quiet -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/robal demo

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) src/*.egg-info
