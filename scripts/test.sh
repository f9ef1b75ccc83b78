#!/usr/bin/env bash
# Builds flashlin (scripts/build.sh) and runs the whole test suite; exits non-zero on any failure.
#
#   bash scripts/test.sh [extra cmake -D options, passed to the build]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# Tests are forced on: a -DFLASHLIN_BUILD_TESTS=OFF given to an earlier build stays in the cache.
bash scripts/build.sh -DFLASHLIN_BUILD_TESTS=ON "$@"

# C++: GoogleTest suite, the install/find_package consumer test (CPU always; CUDA tests skip
# themselves when no GPU is present).
# --no-tests=error: a build that registered no test fails instead of passing silently.
ctest --test-dir build --output-on-failure --no-tests=error -j"$(nproc)"

# Python: the PyTorch front end (tests/python) against the library just built. CI uses Debian's
# python3-torch (torch 1.13, installed by scripts/setup.sh); FLASHLIN_PYTHON picks another
# interpreter (e.g. one with torch 2.x). pytest's exit code 5 (no tests collected) is a failure.
python="${FLASHLIN_PYTHON:-/usr/bin/python3}"
FLASHLIN_LIBRARY="$PWD/build/libflashlin.so" PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" \
  "$python" -m pytest -q -p no:cacheprovider tests/python

# Sanitizers: the CPU library, C ABI and C++ suite again under AddressSanitizer + UBSan
# (scripts/sanitize.sh; build-asan/). FLASHLIN_SKIP_SANITIZE=1 skips both for a quick local run.
# Then libFuzzer over the C ABI for a bounded time from the committed corpus (scripts/fuzz.sh).
if [[ "${FLASHLIN_SKIP_SANITIZE:-0}" != 1 ]]; then
  bash scripts/sanitize.sh
  bash scripts/fuzz.sh "${FLASHLIN_FUZZ_SECONDS:-60}"
fi
