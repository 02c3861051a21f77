#!/usr/bin/env bash
# Configures and builds blockd into build/ (the CUDA backend too when nvcc is found).
#   bash scripts/build.sh [extra cmake args]      BUILD_DIR=... to build elsewhere
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
[ -x /usr/local/cuda/bin/nvcc ] && export PATH="$PATH:/usr/local/cuda/bin"
cmake -S "$root" -B "$build" -G Ninja -DBLOCKD_CUDA=AUTO "$@" >/dev/null
ninja -C "$build"
