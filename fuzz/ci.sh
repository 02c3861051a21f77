#!/usr/bin/env bash
# CI's fuzz smoke run: configures a clang build with -DBLOCKD_FUZZ=ON in its own directory, builds
# the fuzz targets only, and runs `ctest -L fuzz` (each target for BLOCKD_FUZZ_SECONDS, 20 s by
# default, from the seed corpus in fuzz/corpus). Needs clang-14 and libclang-rt-14-dev (libFuzzer).
#
#   fuzz/ci.sh [BUILD_DIR]      # default: build-fuzz next to the sources
set -euo pipefail
src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$src/build-fuzz}"
seconds="${BLOCKD_FUZZ_SECONDS:-20}"
t0=$(date +%s)
cmake -S "$src" -B "$build" -G Ninja -DBLOCKD_CUDA=OFF -DBLOCKD_FUZZ=ON -DBLOCKD_FUZZ_SECONDS="$seconds" \
  -DCMAKE_C_COMPILER="${CC:-clang}" -DCMAKE_CXX_COMPILER="${CXX:-clang++}"
cmake --build "$build" -j "${BLOCKD_JOBS:-$(nproc)}" --target safetensors_fuzzer request_fuzzer session_fuzzer shared_memory_fuzzer tensor_wire_fuzzer
t1=$(date +%s)
status=0
ctest --test-dir "$build" -L fuzz --output-on-failure || status=$?
t2=$(date +%s)
echo "fuzz/ci.sh: build $((t1 - t0)) s, fuzzing $((t2 - t1)) s"
exit "$status"
