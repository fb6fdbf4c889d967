#!/usr/bin/env bash
# The GPU machine's checklist, in stages that each fit well inside the device's 10-minute command limit:
#   bench/gpu_check.sh [build] [test] [serve] [kernels]     (no stage named: all four, in order)
# build:   the extension with the CUDA kernels (-j16; the build folder is reused when it is there)
# test:    every GPU test; fails if one failed, was skipped, or none ran
# serve:   the server tests (tests/entrypoints) against a server on the GPU. The device image has no
#          fastapi/uvicorn/pydantic/openai: carry their wheels in .whl/ (how: the device README); they are
#          installed to /tmp/site first. Fails like `test`.
# kernels: the kernel benchmarks (each with its same-run baseline)
# e2e:     the offline benchmark, ours and HF transformers' in the same command (run it on its own)
# Logs and JSON go to $OUT (default ./gpu_out): gpu_check.log, gpu_tests.xml, bench_*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
export OUT=${OUT:-$PWD/gpu_out} PYTHONUNBUFFERED=1
mkdir -p "$OUT"
LOG=$OUT/gpu_check.log
PY=${PYTHON:-python3}
# On the device image, a process that loads an extension built there crashes when C++ formats an error
# message (an older libstdc++ is found first): load the toolchain's own libstdc++ (seen 2026-11-27).
export LD_PRELOAD=$(g++ -print-file-name=libstdc++.so.6)
stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(build test serve kernels)

log() { echo "== $(date +%T) $*" | tee -a "$LOG"; }

stage_build() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$LOG"
  local t0=$SECONDS
  CMAKE_BUILD_PARALLEL_LEVEL=16 $PY -m pip install --no-build-isolation --no-deps -e . >>"$LOG" 2>&1 \
    || { tail -50 "$LOG"; return 1; }
  log "build took $((SECONDS - t0)) s"
  $PY -c "from pagedinfer import _ops; assert _ops.has_cuda_kernels(), 'CUDA kernels missing'" 2>&1 | tee -a "$LOG"
}

# Fails unless the JUnit report $1 shows tests that ran, none failed and none skipped.
check_junit() {
  $PY - "$1" <<'PYEOF' 2>&1 | tee -a "$LOG"
import sys, xml.etree.ElementTree as ET
root = ET.parse(sys.argv[1]).getroot()
suite = root if root.tag == "testsuite" else root.find("testsuite")
n, skipped = int(suite.get("tests")), int(suite.get("skipped"))
failed = int(suite.get("failures")) + int(suite.get("errors"))
print(f"{sys.argv[1]}: {n} run, {failed} failed, {skipped} skipped")
sys.exit(0 if n > 0 and failed == 0 and skipped == 0 else 1)
PYEOF
}

stage_test() {
  $PY -m pytest -m gpu -q -rs -p no:cacheprovider --junitxml="$OUT/gpu_tests.xml" tests 2>&1 | tee -a "$LOG" || true
  check_junit "$OUT/gpu_tests.xml"
}

stage_serve() {
  if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      >>"$LOG" 2>&1 || { tail -20 "$LOG"; return 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  fi
  PAGEDINFER_TEST_SERVER_DEVICE=cuda $PY -m pytest -q -rs -p no:cacheprovider --junitxml="$OUT/serve_tests.xml" \
    tests/entrypoints 2>&1 | tee -a "$LOG" || true
  check_junit "$OUT/serve_tests.xml"
}

stage_kernels() {
  $PY bench/bench_paged_attention.py 2>&1 | tee -a "$LOG"
  $PY bench/bench_prefill_attention.py 2>&1 | tee -a "$LOG"
  $PY bench/bench_prefill_predecessor.py 2>&1 | tee -a "$LOG"
  $PY bench/bench_prefill_drift.py 2>&1 | tee -a "$LOG"
  $PY bench/bench_cache_ops.py 2>&1 | tee -a "$LOG"
}

# End to end (bench/bench_offline.py): ours (startup, workloads a and b, roofline rates), then the HF
# baselines (static-cache generate, then generate_batch), each in its own process, all in this one command
# so that the baseline runs in the same call on the same card (measured on an H100: ~1, ~2 and ~1 min).
# The children are cut short (each reported so) to end 570 s after this script started, whatever stages
# ran before. Writes $OUT/bench_offline.json and one JSON file per child.
stage_e2e() {
  export BENCH_DEADLINE=${BENCH_DEADLINE:-$(( $(date +%s) - SECONDS + 570 ))}
  $PY bench/bench_offline.py 2>&1 | tee -a "$LOG"
}

for s in "${stages[@]}"; do
  log "stage $s"
  "stage_$s"
done
log "done: ${stages[*]}"
