#!/usr/bin/env bash
# flashlin beside fla on the GPU machine (the `device` tool), one call: installs the carried fla
# wheels (.whl/), restores Triton's cache from a carried tarball (.tcache/triton_cache.tar.xz*, if
# present), fills the cache in parallel (bench/fla_warm.py), sends the cache back through $OUT
# before the timed run, then runs bench/gpu_bench.py. Builds nothing: the library comes from
# build-device/ (bench/pack_device.sh).
#   FLA_WARM: arguments of bench/fla_warm.py, or "skip"
#   FLA_BENCH: arguments of bench/gpu_bench.py, or "skip"
#   FLA_BENCH_TIMEOUT: seconds for the benchmark (240)
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-/tmp/flashlin-device}"
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/build-device${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FLASHLIN_LIBRARY="$PWD/build-device/libflashlin.so" PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/python:/tmp/site"
# Triton's cache records absolute paths: keep it at one place on every machine.
export TRITON_CACHE_DIR=/tmp/flashlin-triton-cache
mkdir -p "$TRITON_CACHE_DIR"
if ls .tcache/triton_cache.tar.xz* > /dev/null 2>&1; then
  cat .tcache/triton_cache.tar.xz* | tar -xJf - -C "$TRITON_CACHE_DIR" &&
    echo "restored Triton's cache: $(find "$TRITON_CACHE_DIR" -type f | wc -l) files"
fi
start=$(date +%s)
if [ "${FLA_WARM:-}" != skip ]; then
  python3 bench/fla_warm.py ${FLA_WARM:-} 2>&1 | tee "$out/fla_warm.txt" |
    grep -E "^==|Error|error" | head -40
  echo "warm-up: $(( $(date +%s) - start )) s, $(du -sh "$TRITON_CACHE_DIR" | cut -f1) in the cache"
  # Only what a cache hit reads: the metadata, the group files and the binaries.
  (cd "$TRITON_CACHE_DIR" && find . -type f \( -name '*.json' -o -name '*.cubin' \) -print0 |
    tar --null -T - -cf - | xz -T0 -6 | split -b 15m - "$out/triton_cache.tar.xz.")
  ls -la "$out" | grep triton_cache
fi
if [ "${FLA_BENCH:-}" != skip ]; then
  timeout "${FLA_BENCH_TIMEOUT:-240}" python3 bench/gpu_bench.py ${FLA_BENCH:-} \
    --csv "$out/bench_gpu.csv" --png "$out/bench_gpu.png" > "$out/bench_gpu.txt" 2>&1
  echo "bench rc=$? after $(( $(date +%s) - start )) s"
  grep -v "^   " "$out/bench_gpu.txt" | tail -70
fi
