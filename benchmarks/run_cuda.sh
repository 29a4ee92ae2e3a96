#!/usr/bin/env bash
# The GPU session's script for issue 11: CUDA tests, calibration, benchmark, with logs.
#
#   benchmarks/run_cuda.sh [tests] [calibrate] [bench] [smoke]   (default: the first three, ~15 min on an H100)
#
# Fits the device tool's 10-minute calls as two runs:  `run_cuda.sh tests calibrate`  then
# `run_cuda.sh bench`.  Everything it writes goes to $OUT when that is set (the device tool brings
# it back), else to benchmarks/results/ (and the calibration also into vitfree/ops/calibrations/).
# The calibration is also saved in the vitfree cache, $VITFREE_CACHE_DIR (default .vitfree-cache/
# here, git-ignored, so a later call on the same machine finds it), where `bench` reads it.
# Wheels that the GPU image lacks (xformers) are installed from .whl/ when present; see the README
# section "CUDA backends" for how to fetch them.
#
# Environment: CALIBRATE_ARGS (default --quick: three shapes, bfloat16 only, a few minutes; set it
# empty for the full table, or e.g. "--no-fp32"), CAL_DEVICE (default cuda), BENCH_ARGS (extra
# bench_cuda.py options, e.g. --quick or --budget 300).  `smoke` runs bench_cuda.py on the CPU on
# tiny sizes (a check of the script; tests/test_bench_scripts.py runs it), not part of the default.
set -uo pipefail  # (empty arrays are expanded as ${a[@]+"${a[@]}"}: bash < 4.4 calls them unbound)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
OUT_DIR=${OUT:-benchmarks/results}
mkdir -p "$OUT_DIR"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export VITFREE_CACHE_DIR="${VITFREE_CACHE_DIR:-$PWD/.vitfree-cache}"
read -r -a cal_args <<< "${CALIBRATE_ARGS---quick}"
read -r -a bench_args <<< "${BENCH_ARGS:-}"
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
        # `vitfree calibrate` (the console script may not be installed: the CLI's main directly)
        "$PY" -c 'import sys; from vitfree.cli import main; sys.exit(main())' calibrate \
            --device "${CAL_DEVICE:-cuda}" --out "$OUT_DIR" ${cal_args[@]+"${cal_args[@]}"} ${extra[@]+"${extra[@]}"} 2>&1 \
            | tee "$OUT_DIR/calibration.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
        ;;
    bench)
        echo "== benchmark"
        "$PY" benchmarks/bench_cuda.py --out "$OUT_DIR" ${bench_args[@]+"${bench_args[@]}"} 2>&1 | tee "$OUT_DIR/bench_cuda.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
        ;;
    smoke)
        echo "== bench_cuda.py on the CPU, tiny sizes (a check of the script)"
        "$PY" benchmarks/bench_cuda.py --device cpu --smoke --recalibrate --out "$OUT_DIR" 2>&1 \
            | tee "$OUT_DIR/bench_cuda_smoke.log"
        [ "${PIPESTATUS[0]}" -eq 0 ] || rc=1
        ;;
    *) echo "unknown stage $stage (tests, calibrate, bench, smoke)"; exit 2 ;;
    esac
done
exit $rc
