#!/usr/bin/env bash
# Installs the build dependencies (scripts/setup.sh), then configures and builds flashlin into
# build/ (Release, Ninja). Running it again rebuilds only what changed.
#
#   bash scripts/build.sh [extra cmake -D options]
#
# Environment:
#   FLASHLIN_ENABLE_CUDA   AUTO (default: the CUDA backend when nvcc is found), ON, OFF
#   FLASHLIN_BUILD_TYPE    CMake build type (default Release)
#   FLASHLIN_JOBS          parallel build jobs (default: nproc)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

build_dir=build
if [[ -f "$build_dir/CMakeCache.txt" ]] &&
   ! grep -qx 'CMAKE_GENERATOR:INTERNAL=Ninja' "$build_dir/CMakeCache.txt"; then
  echo "build.sh: $build_dir/ was configured with another generator than Ninja;" \
       "remove it (rm -rf $build_dir) and run again" >&2
  exit 1
fi

cmake -S . -B "$build_dir" -G Ninja \
  -DCMAKE_BUILD_TYPE="${FLASHLIN_BUILD_TYPE:-Release}" \
  -DFLASHLIN_ENABLE_CUDA="${FLASHLIN_ENABLE_CUDA:-AUTO}" \
  "$@"
cmake --build "$build_dir" --parallel "${FLASHLIN_JOBS:-$(nproc)}"
