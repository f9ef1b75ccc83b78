#!/usr/bin/env bash
# The main job: builds flashlin if needed (scripts/build.sh; incremental), then trains a small
# language model with it and generates a sample (`python3 -m flashlin demo`: a byte-level model on
# the licence texts every Debian machine has, CPU by default, CUDA when present; checkpoint, loss
# plot and sample in ./flashlin-demo/).
#
#   bash scripts/run.sh                        the demo
#   bash scripts/run.sh demo|recall ARGS       a Python program with its options (--help)
#   bash scripts/run.sh check|bench|info ARGS  a command of the C++ CLI (check: every op against
#                                              the float64 reference; bench: CPU timings)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/build.sh

command="${1:-demo}"
(($# > 0)) && shift
case "$command" in
  demo | recall)
    python="${FLASHLIN_PYTHON:-/usr/bin/python3}"
    FLASHLIN_LIBRARY="$PWD/build/libflashlin.so" PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" \
      exec "$python" -m flashlin "$command" "$@"
    ;;
  *) exec build/flashlin "$command" "$@" ;;
esac
