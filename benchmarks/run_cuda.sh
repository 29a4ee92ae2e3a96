#!/usr/bin/env bash
# The GPU session's script for issue 11: CUDA tests, calibration, benchmark, with logs.
#
#   benchmarks/run_cuda.sh [tests] [calibrate] [bench]     (default: all three, ~15 min on an H100)
#
# Fits the device tool's 10-minute calls as two runs:  `run_cuda.sh tests calibrate`  then
# `run_cuda.sh bench`.  Everything it writes goes to $OUT when that is set (the device tool brings
# it back), else to benchmarks/results/ (and the calibration also into vitfree/ops/calibrations/).
# Wheels that the GPU image lacks (xformers) are installed from .whl/ when present; see the README
# section "CUDA backends" for how to fetch them.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if compgen -G ".whl/*.whl" > /dev/null; then
    echo "installing carried wheels: $(ls .whl)"
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        || { echo "wheel install failed"; exit 1; }
    export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
"$PY" - <<'PY'
import torch
print('torch', torch.__version__, 'cuda', torch.version.cuda, 'device',
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE')
from vitfree.ops.xformers_attn import import_xformers
mod, reason = import_xformers()
print('xformers:', 'importable' if mod is not None else reason)
try:
    import natten; print('natten', natten.__version__)
except Exception as e:
    print('natten: not importable:', type(e).__name__)
PY
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(tests calibrate bench)
rc=0
for stage in "${stages[@]}"; do
    case "$stage" in
    tests)
        echo "== CUDA tests (log: $OUT_DIR/cuda_tests.log)"
        "$PY" -m pytest -q -p no:randomly -m cuda -o addopts="" -rs --durations=15 tests/test_cuda.py 2>&1 \
            | tee "$OUT_DIR/cuda_tests.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
        ;;
    calibrate)
        echo "== calibration (tables into $OUT_DIR)"
        extra=()
        [ -z "${OUT:-}" ] && extra=(--commit)
        "$PY" -m vitfree.ops.calibration --budget 180 --out "$OUT_DIR" "${extra[@]}" 2>&1 \
            | tee "$OUT_DIR/calibration.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
        ;;
    bench)
        echo "== benchmark"
        "$PY" benchmarks/bench_cuda.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/bench_cuda.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
        ;;
    *) echo "unknown stage $stage (tests, calibrate, bench)"; exit 2 ;;
    esac
done
exit $rc
