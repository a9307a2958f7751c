# The two commands of the README. Both do all the set-up themselves (scripts/setup_env.sh: a venv in .venv with
# the CPU build of vLLM, or the machine's CUDA vLLM; a no-op in well under a second once done).
#   make demo   a real model generating through the compressed KV cache in vLLM
#   make test   the test suite (starts a local Redis for the connector tests first)
# PYTEST_ARGS passes options to pytest, e.g. `make test PYTEST_ARGS="-m 'not engine' -x"`.

SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=
REDIS_PORT ?= 6390

# Offline, quiet, small-footprint defaults for vLLM on CPU; the caller's environment wins.
export TQ_VENV := $(abspath $(VENV))
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1
export VLLM_NO_USAGE_STATS ?= 1
export DO_NOT_TRACK ?= 1
export VLLM_CPU_KVCACHE_SPACE ?= 1
export TQ_REDIS_PORT := $(REDIS_PORT)
export TQ_REDIS_URL ?= redis://127.0.0.1:$(REDIS_PORT)/0

.PHONY: help setup demo test redis

help:
	@echo "make demo   - set up .venv if needed, then run the demo (python -m tq_vllm.demo)"
	@echo "make test   - set up .venv if needed, start Redis on 127.0.0.1:$(REDIS_PORT), run pytest"
	@echo "make setup  - only the set-up (scripts/setup_env.sh)"

setup:
	@bash scripts/setup_env.sh

redis:
	@bash scripts/ensure_redis.sh >/dev/null

demo: setup
	$(PY) -m tq_vllm.demo

# pytest's exit code is also written to .tmp/pytest-exit-code (read by .ci/run); exit 5 means that no test ran.
test: setup redis
	@mkdir -p .tmp; rm -f .tmp/pytest-exit-code; rc=0; \
	$(PY) -m pytest $(PYTEST_ARGS) || rc=$$?; \
	echo $$rc > .tmp/pytest-exit-code; \
	if [[ $$rc == 5 ]]; then echo "ERROR: pytest collected no tests (exit 5): that is a failure here" >&2; fi; \
	exit $$rc
