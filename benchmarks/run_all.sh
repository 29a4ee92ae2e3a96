#!/usr/bin/env bash
# Run every benchmark and write benchmarks/results/{attention,models}.{json,md}.
# About 20 minutes on a 2-core CPU; NATTEN is optional: pip install 'vitfree[bench]'.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
"$PY" benchmarks/bench_attention.py "$@"
"$PY" benchmarks/bench_models.py "$@"
