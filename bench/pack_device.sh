#!/usr/bin/env bash
# Copies a local CUDA build (default build-cuda/) into build-device/ with the runtime libraries
# the GPU machine lacks (libgomp), for bench/run_device.sh. Build first, e.g.:
#   cmake -S . -B build-cuda -G Ninja -DFLASHLIN_ENABLE_CUDA=ON -DCMAKE_CXX_COMPILER=/usr/bin/g++
#   ninja -C build-cuda flashlin flashlin_cli
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
build="${1:-build-cuda}"
rm -rf build-device && mkdir -p build-device
cp "$build/libflashlin.so" build-device/
for lib in libgomp.so.1; do
  path=$(/sbin/ldconfig -p | awk -v l="$lib" '$1 == l && !found {print $NF; found = 1}')
  if [ -n "$path" ]; then cp -L "$path" build-device/; else echo "warning: $lib not found"; fi
done
du -sh build-device
