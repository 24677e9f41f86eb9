#!/usr/bin/env bash
# The GPU check in one go: GPU tests, then kernel benchmarks, JSON into OUT_DIR, a short table last.
#   bash bench/gpu_check.sh OUT_DIR
# Needs no network and nothing beyond the project's own requirements (PyTorch, Triton, transformers,
# pytest, pytest-benchmark); runs from the source tree. On a machine without CUDA the GPU parts
# skip cleanly. BENCH_FILTER narrows the benchmark cases (a pytest -k expression).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/latest}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
FILTER="${BENCH_FILTER:-cuda}"
status=0

python3 - <<'PY' | tee "$OUT/env.txt"
import datetime, platform, torch
print("date", datetime.date.today().isoformat(), "python", platform.python_version(), "torch", torch.__version__)
try:
    import triton
    print("triton", triton.__version__)
except ImportError:
    print("triton missing")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("gpu", p.name, f"{p.total_memory / 2**30:.0f} GiB", f"{p.multi_processor_count} SMs", "cuda", torch.version.cuda)
else:
    print("gpu none: the GPU tests and benchmarks below skip")
PY

echo "== GPU tests"
python3 -m pytest tests/test_adam_prox.py tests/test_bsmm.py tests/test_sparse.py -q -x -p no:cacheprovider \
    2>&1 | tee "$OUT/gpu_tests.log" | tail -n 15 || status=1

echo "== benchmarks (-k '$FILTER')"
for suite in adam_prox bsmm; do
    python3 -m pytest "bench/bench_$suite.py" -q -p no:cacheprovider -k "$FILTER" \
        --benchmark-json="$OUT/bench_$suite.json" --benchmark-columns=median,iqr,rounds \
        > "$OUT/bench_$suite.log" 2>&1 || { status=1; tail -n 20 "$OUT/bench_$suite.log"; }
done

echo "== summary"
python3 bench/summarize.py "$OUT"/bench_*.json | tee "$OUT/summary.txt"
exit $status
