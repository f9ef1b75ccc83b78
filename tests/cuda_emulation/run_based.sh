#!/usr/bin/env bash
# Builds and runs the host emulation of the Based CUDA kernels against the CPU library
# (see based_emulation.cpp). Usage: bash tests/cuda_emulation/run_based.sh [path/to/libflashlin.so]
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
lib=${1:-$root/build-cpu/libflashlin.so}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
# g++ cannot parse kernel launches or block-scope __shared__ arrays: rewrite those two forms.
sed -e 's/\([A-Za-z_]*\)<<<\([^;]*\)>>>(args)/emulate_launch(\1, \2, args)/' \
    -e 's/extern __shared__ float smem\[\];/float* smem = ::smem;/' \
    "$root/src/cuda/based.cu" > "$work/based_emul.cpp"
g++ -std=c++17 -O2 -DFLASHLIN_WITH_CUDA=1 -I"$here" -I"$root/include" -I"$root/src" \
    -include "$here/cuda_runtime.h" -x c++ "$work/based_emul.cpp" \
    "$root/src/api/based_api.cpp" "$root/src/api/sequences.cpp" "$root/src/api/tensor_checks.cpp" \
    "$here/based_emulation.cpp" -ldl -o "$work/based_emulation"
"$work/based_emulation" "$lib"
