# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.mixllm-installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test assets clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch only if none is importable: torch==2.13.0 resolves to the local CPU wheel here.
$(STAMP): $(PY) pyproject.toml
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)

assets: setup
	$(VENV)/bin/mixllm assets fetch

demo: setup
	$(VENV)/bin/mixllm demo

test: setup
	$(PY) -m pytest -q -ra tests

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
