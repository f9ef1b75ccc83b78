#!/usr/bin/env bash
# libFuzzer over the C ABI, recurrence and fused modules (tests/fuzz/fuzz_recurrence.cpp): a clang
# build of the CPU library with AddressSanitizer + UBSan (and coverage instrumentation) in
# build-fuzz/, then a bounded run from the committed seed corpus (tests/fuzz/corpus, read only;
# new inputs go to a temporary folder). A crash, a sanitizer report, an error without a message, a
# write to an input, an accepted overlap or a size query disagreeing with its call fails the run
# and leaves the input in build-fuzz/ (crash-*, timeout-*): keep it as a regression seed in
# tests/fuzz/corpus.
#
#   bash scripts/fuzz.sh [seconds]     (default 60; FLASHLIN_FUZZ_SECONDS also sets it)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

seconds="${1:-${FLASHLIN_FUZZ_SECONDS:-60}}"
build_dir=build-fuzz
# -fsanitize=fuzzer-no-link: the library's own branches (argument checks, kernels) guide the
# fuzzer, not only the target's.
CC=clang CXX=clang++ cmake -S . -B "$build_dir" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo \
  -DCMAKE_CXX_FLAGS=-fsanitize=fuzzer-no-link \
  -DFLASHLIN_ENABLE_CUDA=OFF -DFLASHLIN_SANITIZE=ON -DFLASHLIN_BUILD_TESTS=OFF \
  -DFLASHLIN_BUILD_FUZZERS=ON > /dev/null
cmake --build "$build_dir" --parallel "${FLASHLIN_JOBS:-$(nproc)}" --target fuzz_recurrence

scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export ASAN_OPTIONS="detect_leaks=1:abort_on_error=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export OMP_NUM_THREADS=2
"$build_dir/fuzz_recurrence" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix="$build_dir/" -print_final_stats=1 "$scratch" tests/fuzz/corpus
