#!/usr/bin/env bash
# Device run of the CUDA tests and compute-sanitizer over a local build packed into
# build-device/ (bench/pack_device.sh); nothing is built here. Logs under $OUT.
#   DEVICE_TESTS: pytest -k selection over tests/python ("cuda or compile"; "skip" to skip)
#   FLASHLIN_SANITIZE_TOOLS: compute-sanitizer tools to run after the tests ("" to skip)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export OUT="${OUT:-/tmp/flashlin-device}"
mkdir -p "$OUT"
export LD_LIBRARY_PATH=$PWD/build-device FLASHLIN_LIBRARY=$PWD/build-device/libflashlin.so
export PYTHONPATH=$PWD/python PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,clocks.sm --format=csv,noheader
if [ "${DEVICE_TESTS:-}" != skip ]; then
  start=$(date +%s)
  timeout "${DEVICE_TESTS_TIMEOUT:-330}" python3 -m pytest -q -p no:cacheprovider tests/python \
    -k "${DEVICE_TESTS:-cuda or compile}" --durations=10 > "$OUT/pytest.txt" 2>&1
  echo "pytest rc=$? in $(( $(date +%s) - start )) s" >> "$OUT/pytest.txt"
  echo "== pytest =="; grep -E "^(FAILED|ERROR)" "$OUT/pytest.txt" | cut -c1-250 | head -30
  tail -14 "$OUT/pytest.txt"
fi
if [ -n "${FLASHLIN_SANITIZE_TOOLS-memcheck racecheck synccheck initcheck}" ]; then
  bash scripts/compute_sanitize.sh > "$OUT/compute_sanitizer.txt" 2>&1
  echo "== compute-sanitizer =="; tail -5 "$OUT/compute_sanitizer.txt"
fi
