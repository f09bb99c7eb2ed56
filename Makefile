# Two entry points for a fresh machine: `make demo` and `make test`. Both create .venv when missing.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test install services clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade --quiet pip

# torch is pinned first so the package's looser range never pulls another (CUDA) build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

# TorchRec (sharded embedding tables, issue #12) for the tests only; `make demo` never needs it.
# --no-deps: torchrec's metadata asks for fbgemm-gpu (the CUDA build); the CPU pair 1.8.0 loads under
# torch 2.13 (1.9 does not). Its remaining runtime deps come from the `torchrec` extra.
TORCHREC_STAMP := $(VENV)/.torchrec
$(TORCHREC_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e ".[torchrec]"
	$(BIN)/pip install --quiet --no-deps torchrec==1.8.0 fbgemm-gpu-cpu==1.8.0
	touch $(TORCHREC_STAMP)

install: $(STAMP)

# The demo ends with how to open its run in the feed inspector (the server on the demo's bundles,
# with the serving config the demo wrote: its clock starts where the synthetic log ends).
DEMO := runs/demo
demo: $(STAMP)
	$(BIN)/feedrank demo --out $(DEMO)
	@echo
	@echo "Feed inspector: start the server on the demo run, then open http://127.0.0.1:8000/"
	@echo "  $(BIN)/feedrank serve $(DEMO)/bundle --ranker $(DEMO)/ranker --log $(DEMO)/log --config $(DEMO)/serving/serving.yaml --port 8000"

# What the tests drive for real: a redis-server (the cache backend) and headless Chromium (the
# report page; with chromium-driver, the inspector page through Selenium), all Debian packages.
DEBIAN_PACKAGES := redis-server chromium chromium-driver
services:
	@missing=""; for p in $(DEBIAN_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; fi

test: $(STAMP) $(TORCHREC_STAMP) services
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) runs
