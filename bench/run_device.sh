#!/usr/bin/env bash
# One run on the GPU machine (the `device` tool): builds nothing. Expects the library, the CLI
# and their runtime libraries in build-device/ (copied from a local CUDA build by
# bench/pack_device.sh), and the fla wheels in .whl/ when fla should be compared. Runs the CUDA
# tests, compute-sanitizer and the GPU benchmark as asked and writes everything under $OUT, with a
# short summary last.
#   FLASHLIN_DEVICE_TESTS: pytest -k selection over tests/python ("cuda or compile"), or "skip"
#   FLASHLIN_DEVICE_TESTS_TIMEOUT: seconds for the tests (330)
#   FLASHLIN_DEVICE_SANITIZE: compute-sanitizer tools to run after the tests, e.g.
#     "memcheck racecheck synccheck initcheck" (default: none); see scripts/compute_sanitize.sh
#   FLASHLIN_DEVICE_BENCH: extra arguments of bench/gpu_bench.py, or "skip"
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-/tmp/flashlin-device}"
export OUT="$out"
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/build-device${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FLASHLIN_LIBRARY="$PWD/build-device/libflashlin.so" PYTHONPATH="$PWD/python"
export PYTHONUNBUFFERED=1
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl && export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv,noheader
python3 -c "import flashlin; print('flashlin', flashlin.__version__ if hasattr(flashlin, '__version__') else '', 'cuda', flashlin.has_cuda())"
selection="${FLASHLIN_DEVICE_TESTS:-cuda or compile}"
pytest_rc=skipped
if [ "$selection" != skip ]; then
  start=$(date +%s)
  timeout "${FLASHLIN_DEVICE_TESTS_TIMEOUT:-330}" python3 -m pytest -q --maxfail=40 \
    -p no:cacheprovider tests/python -k "$selection" --durations=10 > "$out/pytest.txt" 2>&1
  pytest_rc="$? in $(( $(date +%s) - start )) s"
fi
sanitize_rc=skipped
if [ -n "${FLASHLIN_DEVICE_SANITIZE:-}" ]; then
  FLASHLIN_SANITIZE_TOOLS="$FLASHLIN_DEVICE_SANITIZE" \
    FLASHLIN_SANITIZE_TIMEOUT="${FLASHLIN_SANITIZE_TIMEOUT:-100}" \
    timeout 450 bash scripts/compute_sanitize.sh > "$out/compute_sanitizer.txt" 2>&1
  sanitize_rc=$?
fi
bench_rc=skipped
if [ "${FLASHLIN_DEVICE_BENCH:-}" != "skip" ]; then
  timeout 420 python3 bench/gpu_bench.py ${FLASHLIN_DEVICE_BENCH:-} > "$out/bench_gpu.txt" 2>&1
  bench_rc=$?
fi
echo "== pytest failures (first lines) =="
grep -E "^(FAILED|ERROR)" "$out/pytest.txt" 2>/dev/null | cut -c1-300 | head -40
echo "== bench =="
tail -60 "$out/bench_gpu.txt" 2>/dev/null
echo "== summary =="
echo "pytest (-k \"$selection\"): rc=$pytest_rc; $(tail -1 "$out/pytest.txt" 2>/dev/null)"
echo "compute-sanitizer: rc=$sanitize_rc"; tail -5 "$out/compute_sanitizer.txt" 2>/dev/null
echo "bench: rc=$bench_rc"
