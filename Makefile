# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Each creates or updates its own virtual environment first.
PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
BASE_STAMP := $(VENV)/.copack-base
VLLM_STAMP := $(VENV)/.copack-vllm
TOOLS_STAMP := $(VENV)/.copack-deploy-tools
# Extra flags for `copack demo`, e.g. DEMO_ARGS="--duration-s 300 --policy complementary".
DEMO_ARGS ?=

.PHONY: demo test lint venv vllm clean-venv

$(BASE_STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

$(VLLM_STAMP): $(BASE_STAMP) scripts/install-vllm.sh
	bash scripts/install-vllm.sh $(PY)
	touch $@

# checkov lives in its own venv (.venv-checkov): its pins conflict with vLLM's.
$(TOOLS_STAMP): $(BASE_STAMP) scripts/install-deploy-tools.sh
	bash scripts/install-deploy-tools.sh $(PYTHON)
	touch $@

venv: $(BASE_STAMP)

vllm: $(VLLM_STAMP)

demo: $(BASE_STAMP)
	$(VENV)/bin/copack demo $(DEMO_ARGS)

lint: $(BASE_STAMP)
	$(PY) -m ruff check .

# COPACK_REQUIRE_VLLM=1: a broken vLLM install fails the end-to-end tests instead of skipping them.
test: $(VLLM_STAMP) $(TOOLS_STAMP)
	$(PY) -m ruff check .
	COPACK_REQUIRE_VLLM=1 $(PY) -m pytest

clean-venv:
	rm -rf $(VENV)
