#!/usr/bin/env bash
# Installs what building and testing flashlin needs on Debian 12 (bookworm), quietly and only
# what is missing: a second run checks the packages and returns at once, printing nothing.
#
#   bash scripts/setup.sh
#
# The CUDA toolkit is not installed here: with FLASHLIN_ENABLE_CUDA=AUTO (the default) the CUDA
# backend is built when nvcc is found, and skipped otherwise.
set -euo pipefail

packages=(
  cmake            # >= 3.25 (bookworm has 3.25.1)
  ninja-build
  g++              # with libgomp (OpenMP); no libomp-dev needed
  libgtest-dev     # GoogleTest (ctest suite)
  libgmock-dev
  libbenchmark-dev # Google Benchmark
  libdlpack-dev    # dlpack/dlpack.h: the tensor type of the C ABI
  libeigen3-dev    # dense kernels of the CPU backend (header-only)
  libopenblas-dev  # optional sgemm baseline of `flashlin bench`
  python3-torch    # the PyTorch front end's tests (Debian: torch 1.13)
  python3-pytest
  python3-matplotlib  # the demo's loss plot (flashlin demo)
  clang            # libFuzzer target over the C ABI (scripts/fuzz.sh)
  libomp-dev       # OpenMP for the clang (fuzzing) build
)

installed() {
  [[ "$(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null)" == installed ]]
}

missing=()
for package in "${packages[@]}"; do
  installed "$package" || missing+=("$package")
done
((${#missing[@]} == 0)) && exit 0

if ((EUID != 0)); then
  if command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
  else
    echo "setup.sh: missing packages (${missing[*]}) and not root: install them as root" >&2
    exit 1
  fi
else
  sudo=()
fi

echo "setup.sh: installing ${missing[*]}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
export DEBIAN_FRONTEND=noninteractive
if ! { "${sudo[@]}" apt-get update -qq &&
       "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"; } >"$log" 2>&1
then
  echo "setup.sh: apt-get failed:" >&2
  tail -n 40 "$log" >&2
  exit 1
fi
