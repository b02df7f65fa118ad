# qwen25 — two commands set everything up on a fresh machine:
#   make run                 create .venv, install, fetch the default model, chat with it
#   make run PROMPT="..."    answer one message and exit
#   make test                create .venv (with test references), run the fast suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip install --disable-pip-version-check -q
MODEL  ?= qwen2.5-coder-0.5b-instruct
PROMPT ?=
PYTEST_ARGS ?=
export OMP_WAIT_POLICY ?= PASSIVE

.PHONY: run install install-test test test-slow test-all bench clean help

help:
	@echo "make run [PROMPT=...] [MODEL=...]   chat with the default model (answers once with PROMPT)"
	@echo "make test                           fast test suite;  make test-all: also the slow real-model tests"
	@echo "make bench                          benchmarks/bench_decode.py (see BENCHMARKS.md)"

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)

# torch is pinned to the CPU build (pyproject); installing it first keeps pip from resolving anything else.
$(VENV)/.installed: pyproject.toml | $(VENV)/bin/python
	$(PIP) torch==2.13.0
	$(PIP) -e .
	@touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed
	$(PIP) -e ".[test]"
	@touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

run: install
	@$(VENV)/bin/qwen25 download $(MODEL) >/dev/null
ifeq ($(strip $(PROMPT)),)
	$(VENV)/bin/qwen25 chat --model $(MODEL)
else
	@$(VENV)/bin/qwen25 chat --model $(MODEL) --prompt "$(PROMPT)"
endif

test: install-test
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# pytest exits 5 when nothing is selected: not a failure here.
test-slow: install-test
	$(PY) -m pytest -m slow $(PYTEST_ARGS) || [ $$? -eq 5 ]

test-all: install-test
	$(PY) -m pytest $(PYTEST_ARGS)

bench: install-test
	$(PY) benchmarks/bench_decode.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
