#!/usr/bin/env bash
# Runs one libFuzzer target for SECONDS from a seed corpus, writing what it discovers into a scratch
# directory (the seed corpus in the repository stays as it is), and prints libFuzzer's final stats.
# A crash, a sanitizer report, a leak or a timeout makes the fuzzer (and this script) exit non-zero;
# the reproducer is left in the scratch directory, whose path is printed.
#
#   fuzz/run_fuzzer.sh build-fuzz/fuzz/safetensors_fuzzer fuzz/corpus/safetensors 20 [libFuzzer flags...]
set -euo pipefail
fuzzer="$1"
seeds="$2"
seconds="$3"
shift 3
work="$(mktemp -d "${TMPDIR:-/tmp}/blockd-fuzz-$(basename "$fuzzer")-XXXXXX")"
mkdir -p "$work/corpus" "$work/artifacts"
echo "run_fuzzer.sh: $(basename "$fuzzer") for ${seconds} s from $(find "$seeds" -type f | wc -l) seeds; scratch $work"
status=0
"$fuzzer" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 -print_final_stats=1 \
  -artifact_prefix="$work/artifacts/" "$@" "$work/corpus" "$seeds" || status=$?
echo "run_fuzzer.sh: corpus grew to $(find "$work/corpus" -type f | wc -l) files; exit status $status"
if [ "$status" -eq 0 ]; then rm -rf "$work"; fi
exit "$status"
