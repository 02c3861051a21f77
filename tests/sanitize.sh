#!/usr/bin/env bash
# Builds blockd and its tests with AddressSanitizer + UndefinedBehaviorSanitizer (BLOCKD_SANITIZE)
# in a build directory of its own, then runs every test that needs no GPU, no cluster and no long
# load run: ctest -LE "gpu|deploy|load". Prints how long the build and the tests took.
#
#   tests/sanitize.sh                 # build-asan next to the sources
#   tests/sanitize.sh /tmp/asan -R hostile   # another directory; extra arguments go to ctest
#
# BLOCKD_JOBS sets the parallelism (default: all cores). Any sanitizer report fails the test that
# triggered it: UBSan aborts (-fno-sanitize-recover), ASan and LeakSanitizer exit non-zero.
set -euo pipefail

src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${1:-$src/build-asan}"
shift || true
jobs="${BLOCKD_JOBS:-$(nproc)}"

# allocator_may_return_null: an allocation beyond what the host can give must throw bad_alloc (which
# blockd turns into RESOURCE_EXHAUSTED, and the hostile-input battery checks) instead of ASan
# aborting the process. detect_leaks: on, also for the blockd children the tests start.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:allocator_may_return_null=1:abort_on_error=0:strict_string_checks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

t0=$(date +%s)
# -O1 -g1 (line tables for the reports) compiles in half the time of -O2 -g, which is what keeps
# this inside CI's budget; no -DNDEBUG, so assertions are checked too.
cmake -S "$src" -B "$build" -G Ninja -DBLOCKD_CUDA=OFF -DBLOCKD_SANITIZE=ON -DCMAKE_BUILD_TYPE=Sanitize \
  -DCMAKE_C_FLAGS_SANITIZE="-O1 -g1" -DCMAKE_CXX_FLAGS_SANITIZE="-O1 -g1"
cmake --build "$build" -j "$jobs"
t1=$(date +%s)
status=0
ctest --test-dir "$build" -LE "gpu|deploy|load" --output-on-failure -j "$jobs" "$@" || status=$?
t2=$(date +%s)
echo "sanitize.sh: build $((t1 - t0)) s, tests $((t2 - t1)) s, total $((t2 - t0)) s (${jobs} jobs)"
exit "$status"
