#!/usr/bin/env bash
# AddressSanitizer + UndefinedBehaviorSanitizer: a CPU-only build of the library (C ABI, argument
# checks, CPU backend), the CLI and the GoogleTest suite in build-asan/, then the C++ suite and
# the Python suite's argument-error tests against it. Any sanitizer report fails the run (UBSan
# does not recover; ASan checks leaks at exit). Called by scripts/test.sh.
#
#   bash scripts/sanitize.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

build_dir=build-asan
cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DFLASHLIN_ENABLE_CUDA=OFF -DFLASHLIN_SANITIZE=ON -DFLASHLIN_BUILD_TESTS=ON > /dev/null
cmake --build "$build_dir" --parallel "${FLASHLIN_JOBS:-$(nproc)}"

export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1:strict_string_checks=1:detect_stack_use_after_return=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
# install_consumer builds an outside project against the installed (here: sanitized) library; it
# is covered by the regular build.
ctest --test-dir "$build_dir" --output-on-failure --no-tests=error -j"$(nproc)" -E install_consumer

# Python: the interpreter is not instrumented, so the runtime is preloaded and leak checking (of
# the interpreter's own allocations) is off; the argument-error and regression tests drive the
# library's checks and the CPU kernels' edge cases.
python="${FLASHLIN_PYTHON:-/usr/bin/python3}"
LD_PRELOAD="$(gcc -print-file-name=libasan.so):$(gcc -print-file-name=libubsan.so)" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1" \
FLASHLIN_LIBRARY="$PWD/$build_dir/libflashlin.so" PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" \
  "$python" -m pytest -q -p no:cacheprovider tests/python/test_errors.py tests/python/test_regressions.py
