#!/usr/bin/env bash
# The main job: builds flashlin if needed (scripts/build.sh; incremental), then checks every op
# configuration against the float64 reference (`flashlin check`, exits non-zero on any FAIL) and,
# if that passed, benchmarks it (`flashlin bench`).
#
#   bash scripts/run.sh                        check, then bench
#   bash scripts/run.sh check|bench|info ARGS  only that command, with its options
#                                              (see: bash scripts/run.sh <command> --help)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/build.sh
cli=build/flashlin

if (($# > 0)); then
  exec "$cli" "$@"
fi

echo "== flashlin check"
"$cli" check
echo
echo "== flashlin bench"
"$cli" bench
