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

# ---------------------------------------------------------------------------------------------
# Python (tests/python, pytest): not yet written. When it lands, run it here against the
# library just built, e.g.
#   FLASHLIN_LIBRARY="$PWD/build/libflashlin.so" python3 -m pytest -q tests/python
# and treat pytest's exit code 5 ("no tests collected") as a failure, not a pass.
# ---------------------------------------------------------------------------------------------
