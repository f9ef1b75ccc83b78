#!/usr/bin/env bash
# One run on the GPU machine (the `device` tool): builds nothing. Expects the library, the CLI
# and their runtime libraries in build-device/ (copied from a local build), runs every check and
# test there (C++ CLI check on its CPU, the Python suite with its torch), the CPU benchmark, and
# writes the outputs under $OUT with a short summary last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
out="${OUT:-/tmp/flashlin-device}"
mkdir -p "$out"
export LD_LIBRARY_PATH="$PWD/build-device${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export FLASHLIN_LIBRARY="$PWD/build-device/libflashlin.so" PYTHONPATH="$PWD/python"
python3 -c "import sys, torch; print(sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
build-device/flashlin info
build-device/flashlin check > "$out/check.txt" 2>&1; check_rc=$?
FLASHLIN_CPU_ISA=avx2 build-device/flashlin check --quick > "$out/check_avx2.txt" 2>&1; avx2_rc=$?
timeout 420 python3 -m pytest -q -p no:cacheprovider tests/python > "$out/pytest.txt" 2>&1; pytest_rc=$?
build-device/flashlin bench --quick > "$out/bench.txt" 2>&1
echo "== summary =="
echo "flashlin check (default ISA): rc=$check_rc; $(tail -1 "$out/check.txt")"
echo "flashlin check (avx2):        rc=$avx2_rc; $(tail -1 "$out/check_avx2.txt")"
echo "pytest:                       rc=$pytest_rc; $(tail -1 "$out/pytest.txt")"
grep -E "^(sgemm|chunked)" "$out/bench.txt"
