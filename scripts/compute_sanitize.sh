#!/usr/bin/env bash
# NVIDIA compute-sanitizer over the CUDA tests (issue 7): memcheck, racecheck, initcheck and
# synccheck, each on a selection of the CUDA test cases that reaches every flashlin kernel (both
# kernel families, forward and backward, every gate kind, the RWKV-6 bonus, varlen).
# Needs a GPU and a CUDA build of the library (FLASHLIN_LIBRARY or build/); no GPU -> exits 0
# with a note. Logs go to $OUT (default /tmp/flashlin-compute-sanitizer); a summary line per tool
# is printed last, and the exit status is non-zero if any tool reported an error.
# FLASHLIN_SANITIZE_TOOLS picks the tools (default: all four).
#
#   bash scripts/compute_sanitize.sh [memcheck -k selection] [racecheck/synccheck/initcheck -k selection]
# FLASHLIN_SANITIZE_FILES replaces the test files (default: test_cuda_paths, test_stress,
# test_concurrency).
#
# memcheck, racecheck and synccheck instrument flashlin's kernels only (--kernel-name
# kns=flashlin: PyTorch's own kernels are not ours to check, and instrumenting them costs most of
# the time); initcheck must see every kernel's writes to know what memory is initialised, so it
# instruments all kernels. memcheck runs the large selection, the slower tools a smaller one that
# still reaches every kernel family. FLASHLIN_SANITIZE_TIMEOUT bounds each tool (150 s; rc 124).
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-/tmp/flashlin-compute-sanitizer}"
mkdir -p "$out"
export PYTHONPATH="$PWD/python${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

if ! python3 -c "import sys, torch, flashlin; sys.exit(0 if torch.cuda.is_available() and flashlin.has_cuda() else 1)"; then
  echo "compute_sanitize.sh: no GPU or no CUDA build of flashlin; nothing to check"
  exit 0
fi
sanitizer="$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)"

# Both CUDA kernel families ([default] = tensor cores where supported, [general] = SIMT) on the
# chunked ops, odd lengths, varlen with an empty sequence, extreme gates, and several streams at
# once. The small selection (the slower tools) still has one case of every tensor-core
# instantiation: per-key gates (GLA), the bonus (RWKV-6), per-head (retention), per-token
# (simple GLA [g]) and no gate (linear attention).
selection="${1:-(test_chunk_shapes and bfloat16 and 128x128) or test_chunk_lengths or test_chunk_varlen or (test_chunk_extreme_gates and inf) or test_cuda_streams or (test_head_dims and cuda and 256x256)}"
small_selection="${2:-(test_chunk_shapes and bfloat16 and 128x128 and (chunk_gla or chunk_rwkv6 or chunk_retention or chunk_simple_gla or chunk_linear_attn)) or (test_chunk_varlen and chunk_gla) or (test_head_dims and cuda-float32 and 256x256 and chunk_gla) or test_cuda_streams}"
files="${FLASHLIN_SANITIZE_FILES:-tests/python/test_cuda_paths.py tests/python/test_stress.py tests/python/test_concurrency.py}"

status=0
summary=()
for tool in ${FLASHLIN_SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}; do
  filter=(--kernel-name kns=flashlin)
  select="$small_selection"
  extra=()
  case "$tool" in
    memcheck) select="$selection" ;;
    initcheck) filter=() ;;
    racecheck) extra=(--racecheck-report hazard); select="${small_selection% or test_cuda_streams}" ;;
  esac
  log="$out/compute_sanitizer_$tool.txt"
  start=$(date +%s)
  # --error-exitcode makes a reported hazard fail the run even when the tests pass.
  timeout "${FLASHLIN_SANITIZE_TIMEOUT:-150}" "$sanitizer" --tool "$tool" ${filter[@]+"${filter[@]}"} ${extra[@]+"${extra[@]}"} --error-exitcode 86 --print-limit 50 \
    python3 -m pytest -q -p no:cacheprovider -x $files -k "$select" > "$log" 2>&1
  rc=$?
  errors="$(grep -E "^========= (ERROR|RACECHECK|Race|Invalid|Uninitialized|Barrier)" -c "$log" || true)"
  line="$tool: rc=$rc, $(grep -E "ERROR SUMMARY|RACECHECK SUMMARY" "$log" | tail -1 | sed 's/=* *//'), pytest: $(grep -E "passed|failed|error" "$log" | tail -1), $(( $(date +%s) - start )) s"
  summary+=("$line")
  [ "$rc" -ne 0 ] && status=1
  echo "$line (flagged lines: $errors)"
done
echo "== compute-sanitizer summary =="
printf '%s\n' "${summary[@]}"
exit $status
