#!/usr/bin/env bash
# Runs on the GPU host over a bundle from bundle.sh: the gpu tests (what `ctest -L gpu` runs),
# compute-sanitizer memcheck and racecheck, the Python parity test against a CUDA daemon, and the
# benchmarks; logs under $OUT, a table last.
#   bash bench/device/run_checks.sh [tests] [sanitize] [parity] [bench] [generate] [decode] [profile] [grpc_decode] [decode_ab] [grpc_wake] [nccl] [groups] [ipc] [transport] [tcp_sweep] [ipc_sweep] [spin_ab] [context_ab] [step_early] [scale] [lora] [big]   (default: the first four)
# `nccl`: the NCCL replica-group tests (the multigpu ones too when nvidia-smi -L lists 2+ GPUs);
# `groups`: those tests and the
# all-reduce bus bandwidth of the NCCL provider beside torch.distributed's (bench/allreduce_torch.py).
set -uo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
OUT=${OUT:-/tmp/blockd-out}
mkdir -p "$OUT"
dev=/tmp/blockd-device
rm -rf "$dev" && mkdir -p "$dev" && tar -C "$dev" -xJf "$root/.device/bundle.tar.xz"
stages=${*:-tests sanitize parity bench}
export LIBS="$dev/lib:/usr/local/cuda/lib64"
export NCCL_NVLS_ENABLE=0  # never NVLink multicast on these hosts: every daemon and test started here inherits it
# cuDNN 9.19 (PyTorch's copy on the GPU host) when present, else the system's: for the cuDNN
# attention test and the blocks' --attention=cudnn variants and benchmarks.
cudnn=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cudnn/lib/libcudnn_graph.so.9
[ -f "$cudnn" ] && export BLOCKD_CUDNN_PATH=$cudnn
run() { LD_LIBRARY_PATH="$LIBS" "$@"; }  # only our binaries see the bundled libraries
declare -a table
row() { table+=("$(printf '%-34s %-6s %s' "$1" "$2" "$3")"); echo "ROW ${table[-1]}"; }  # echoed too: a run cut short still shows its rows

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv,noheader | tee "$OUT/gpu.txt"
card=$(head -1 "$OUT/gpu.txt" | cut -d, -f1)

gtest() {  # name binary [filter]
  local name=$1 bin=$2 filter=${3:-*}
  local log="$OUT/$name.log" limit=${4:-200}
  timeout "$limit" env LD_LIBRARY_PATH="$LIBS" "$dev/bin/$bin" --gtest_filter="$filter" >"$log" 2>&1
  local rc=$?
  local summary
  summary=$(grep -E '^\[  (PASSED|FAILED)  \]|tests ran' "$log" | tr '\n' ' ' | cut -c1-120)
  row "$name" "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" "$summary"
  grep -E '^\[  FAILED  \]' "$log" | head -20
  [ $rc -eq 0 ] || grep -B3 -A12 -E 'Failure$|^Expected|timed out|Timeout' "$log" | head -60
}

# A Python unittest module of the bundle against the bundle's daemon (and blockctl): its row, and a
# failure's story on stdout (the run returns only a few files). pyunit ROW MODULE [ENV=VALUE...]
pyunit() {
  local name=$1 module=$2 log="$OUT/$1.log"; shift 2
  (cd "$dev/python" && env BLOCKD_BINARY="$dev/bin/blockd" BLOCKCTL_BINARY="$dev/bin/blockctl" \
    BLOCKD_LD_LIBRARY_PATH="$LIBS" PYTHONPATH="$dev/python" "$@" timeout 300 python3 -m unittest -v "$module") >"$log" 2>&1
  local rc=$?
  row "$name" "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" "$(grep -E '^(OK|FAILED|Ran)' "$log" | tr '\n' ' ')"
  [ $rc -eq 0 ] || grep -B2 -A25 -E '^(FAIL|ERROR):|Traceback' "$log" | head -80
}

# The sweeps' shared steps. span_inproc LOG: bench_engine's in-process fwd+bwd of the span of 8
# Qwen-like bf16 blocks into LOG, its tokens/s in $inproc. span_daemon NAME TARGET [FLAG...]: a
# CUDA daemon (native attention) on TARGET, its log blockd.NAME.log, its pid in $daemon, once it
# serves. span_run LOG LABEL [BENCH_SERVICE_FLAG...]: one bench_service run of the span against
# $target, appended to LOG, and its last row printed as "LABEL depth D micro-batches M: T
# tokens/s, P% of in-process".
# decode_session NAME BIN TARGET LEVEL LOG [VAR=VALUE | --flag=value]: a CUDA daemon $dev/bin/BIN on
# TARGET at --log_level=LEVEL (its log blockd.NAME.log), bench_session's 32-block decode against it
# into LOG (from a sleeping client, then a busy-waiting one), the daemon stopped; returns
# bench_session's status; VAR=VALUE goes into both processes' environments (e.g. a gRPC setting),
# --flag=value to the daemon.
# $inproc: bench_decode's ms/layer/step.
decode_session() {
  local name=$1 bin=$2 at=$3 level=$4 log=$5 setting=${6:-} flag=""
  if [[ $setting == --* ]]; then flag=$setting; setting=""; fi  # a daemon flag, not an environment
  LD_LIBRARY_PATH="$LIBS" timeout 300 env ${setting:+"$setting"} "$dev/bin/$bin" --backend=cuda --listen=$at --metrics_listen= \
    --log_level=$level $flag >"$OUT/blockd.$name.log" 2>&1 &
  local d=$!
  for _ in $(seq 60); do grep -q "serving blockd" "$OUT/blockd.$name.log" 2>/dev/null && break; sleep 1; done
  timeout 200 env LD_LIBRARY_PATH="$LIBS" ${setting:+"$setting"} "$dev/bin/bench_session" --target=$at --blocks=32 \
    --in_process_ms="${inproc:-0}" --busy_wait --trace >"$log" 2>&1
  local rc=$?
  kill $d 2>/dev/null; wait $d 2>/dev/null
  return $rc
}
span_inproc() {
  timeout 240 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_engine" --shapes=span8 --precisions=bf16 \
    --iters=${TRANSPORT_ITERS:-6} --attention=native >>"$1" 2>&1
  inproc=$(awk '/^span of 8/ {print $12; exit}' "$1")
}
# The training step both ways on stdout, 20 steps each: bench_engine's pipelined step in process (3
# micro-batches + Step), and a daemon's at $target through CUDA IPC in place, 3 in flight (more
# bench_service flags after).
pipelined_inproc() {
  timeout 240 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_engine" --shapes=span8 --precisions=bf16 --iters=20 \
    --attention=native --pipeline=3
}
ipc_in_place_step() {
  timeout 200 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_service" --target=$target --blocks=8 --iters=20 --depth=3 \
    --transport=cuda_ipc_in_place "$@"
}
span_daemon() {
  local name=$1 at=$2; shift 2
  LD_LIBRARY_PATH="$LIBS" timeout 500 "$dev/bin/blockd" --backend=cuda --attention=native --listen=$at \
    --metrics_listen= "$@" >"$OUT/blockd.$name.log" 2>&1 &
  daemon=$!
  for _ in $(seq 60); do grep -q "serving blockd" "$OUT/blockd.$name.log" 2>/dev/null && break; sleep 1; done
}
span_run() {
  local log=$1 label=$2; shift 2
  echo "== $label $*" >>"$log"
  timeout 200 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_service" --target=$target --blocks=8 \
    --iters=${TRANSPORT_ITERS:-6} "$@" >"$log.run" 2>&1
  cat "$log.run" >>"$log"
  awk -v x="$label" -v b="$inproc" '/^8 blocks/ {d=$4; t=$7; m=$9} END {printf "%s depth %s micro-batches %s: %s tokens/s, %.1f%% of in-process %s\n", x, d, m, t, (b > 0 ? 100*t/b : 0), b}' "$log.run"
  rm -f "$log.run"
}

if [[ " $stages " == *" tests "* ]]; then
  gtest gpu.ops cuda_ops_test '*' 90
  gtest gpu.blocks cuda_block_test '*' 240
  gtest gpu.sessions cuda_session_test '*' 120
  gtest gpu.frozen frozen_cuda_test '*' 60
  gtest gpu.lora lora_cuda_test '*' 60
  gtest gpu.sticky sticky_error_test '*' 30
  gtest gpu.cudnn cudnn_attention_test '*' 120
  grep -hE 'norm rel' "$OUT"/gpu.ops.log "$OUT"/gpu.blocks.log | sort -t'l' -k1 > "$OUT/errors.txt" || true
fi

if [[ " $stages " == *" groups "* || " $stages " == *" nccl "* ]]; then  # nccl: the tests only
  export BLOCKD_BINARY="$dev/bin/blockd"
  gtest gpu.nccl_group nccl_group_test '*' 300
  ngpu=$(nvidia-smi -L | grep -c '^GPU')
  if [ "$ngpu" -ge 2 ]; then
    gtest gpu.nccl_multigpu nccl_multigpu_test '*' 400
  else
    row gpu.nccl_multigpu SKIP "$ngpu GPU: needs 2 or more"
  fi
fi
if [[ " $stages " == *" groups "* ]]; then
  timeout 300 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_allreduce" --max_mb=${ALLREDUCE_MAX_MB:-1024} \
    >"$OUT/bench_allreduce.log" 2>&1
  row bench.allreduce "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see bench_allreduce.log"
  cat "$OUT/bench_allreduce.log"
  (cd "$root" && timeout 300 python3 bench/allreduce_torch.py --max_mb=${ALLREDUCE_MAX_MB:-1024}) \
    >"$OUT/allreduce_torch.log" 2>&1
  row bench.allreduce_torch "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see allreduce_torch.log"
  tail -20 "$OUT/allreduce_torch.log"
fi

if [[ " $stages " == *" sanitize "* ]]; then
  for tool in memcheck racecheck; do
    log="$OUT/sanitize.$tool.log"
    timeout 120 env LD_LIBRARY_PATH="$LIBS" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$dev/bin/cuda_ops_test" --gtest_filter='*RmsNorm*:*Rope*:*SwiGlu*:*AdamW*:*Convert*:*AttentionTest*/0:*AttentionTest*/1:*AttentionTest*/2:*AttentionTest*/5:*AttentionTest*/7' >"$log" 2>&1
    rc1=$?
    timeout 120 env LD_LIBRARY_PATH="$LIBS" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$dev/bin/cuda_block_test" --gtest_filter='*tiny_qknorm_gqa2_bf16:*tiny_qknorm_gqa2_bf16_cudnn:*tiny_qknorm_gqa2_fp32:*Span*' >>"$log" 2>&1
    rc2=$?
    # the session kernels: paged K/V write, paged decode attention (split and unsplit), row chunks
    timeout 150 env LD_LIBRARY_PATH="$LIBS" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$dev/bin/cuda_session_test" --gtest_filter='*StepsMatch*' >>"$log" 2>&1 || rc2=$?
    errs=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tr '\n' ' ')
    row "sanitizer.$tool" "$([ $rc1 -eq 0 ] && [ $rc2 -eq 0 ] && echo PASS || echo FAIL)" "$errs"
  done
fi

if [[ " $stages " == *" parity "* ]] && [ -f "$dev/python/test_parity.py" ]; then
  for run in fp32,native bf16,native bf16,cudnn; do
    IFS=, read -r precision attention <<<"$run"
    pyunit "parity.cuda.$precision.$attention" test_parity BLOCKD_BACKEND=cuda BLOCKD_PRECISION="$precision" \
      BLOCKD_ATTENTION="$attention"
  done
fi

# CUDA IPC tensors against the inline path on a CUDA daemon (torch with CUDA on this GPU).
if [[ " $stages " == *" ipc "* ]] && [ -f "$dev/python/cuda_ipc_test.py" ]; then
  pyunit cuda_ipc cuda_ipc_test
  export BLOCKD_BINARY="$dev/bin/blockd"
  gtest cuda_ipc.client cuda_ipc_client_test '*' 120  # the C++ client's regions
fi

# Generation against Hugging Face transformers' generate (greedy logits, beams, sampling), the
# export back to Hugging Face loaded by transformers (export_hf's and blockctl's output with the
# daemon's logits), and blocks against transformers' decoder layers; opt-in:
#   bash bench/device/run_checks.sh generate
if [[ " $stages " == *" generate "* ]] && [ -f "$dev/python/hf_generate_test.py" ]; then
  pyunit hf_generate.cpu hf_generate_test
  pyunit hf_generate.cuda hf_generate_test BLOCKD_BACKEND=cuda
  [ -f "$dev/python/hf_export_test.py" ] && pyunit hf_export.cpu hf_export_test
  # Layer 0 against transformers' decoder layers (forward and every gradient), both backends.
  pyunit hf_layer.cpu hf_layer_test
  pyunit hf_layer.cuda hf_layer_test BLOCKD_BACKEND=cuda
fi

# Inference-session decode (issue 12), in one call: correctness first (the session tests and the
# paged attention kernel against float64), the sanitizers on the session kernels (naming any
# hazard's kernel and line), then bench_decode and Hugging Face's static-cache decode on the same
# card; everything is printed, since the run returns few files.
#   bash bench/device/run_checks.sh decode
if [[ " $stages " == *" decode "* ]]; then
  gtest decode.sessions cuda_session_test '*' 240
  grep -E 'norm rel' "$OUT/decode.sessions.log" | grep -E ' o, ' | head -30
  for tool in racecheck memcheck; do
    log="$OUT/decode.$tool.log"
    timeout 200 env LD_LIBRARY_PATH="$LIBS" compute-sanitizer --tool "$tool" --error-exitcode 9 \
      "$dev/bin/cuda_session_test" --gtest_filter='*StepsMatch*:*PagedAttention*multi_token*:*PagedAttention*dh20*:*PagedAttention*group16*' >"$log" 2>&1
    rc=$?
    row "decode.sanitizer.$tool" "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" "$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$log" | tr '\n' ' ')"
    # where: each reported access's kernel and source line, counted
    grep -E '^=========  +(Write|Read|at|and) |^========= +(Error|Warning|Invalid)' "$log" | sed -E 's/0x[0-9a-f]+/ADDR/g' \
      | sort | uniq -c | sort -rn | head -24
  done
  timeout 300 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_decode" --batches=1,64 --attention_batches=1,8,64 \
    >"$OUT/bench_decode.log" 2>&1
  row "decode.bench_decode" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see bench_decode.log"
  cat "$OUT/bench_decode.log"
  timeout 300 python3 "$dev/python/hf_decode.py" --batches 1,64 >"$OUT/hf_decode.log" 2>&1
  row "decode.hf_decode" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see hf_decode.log"
  tail -20 "$OUT/hf_decode.log"
fi

# A 32-block span's decode over gRPC on loopback against the same span in process (issue 12: at
# batch 1, >= 85%): bench_decode --layers=32 --frozen first, then bench/session_grpc.py against a
# CUDA daemon (32 frozen bf16 Llama-3-8B-shaped blocks, the Infer stream, bf16 on the wire), then
# the C++ client's bench_session on the same daemon.
if [[ " $stages " == *" grpc_decode "* ]]; then
  # In process: the span's graph step, then the same decode through Engine::InferStep (bf16 bytes
  # in and out, as the daemon runs a step), its times logged per step.
  timeout 300 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_decode" --layers=32 --frozen --written_layers=1 \
    --batches=1 --attention_batches= --engine_debug >"$OUT/grpc_decode.inproc.log" 2>&1
  row "grpc_decode.in_process" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see grpc_decode.inproc.log"
  grep -v " blockd: " "$OUT/grpc_decode.inproc.log"
  echo "== the engine's times of a step in process"
  python3 "$root/bench/device/step_times.py" "$OUT/grpc_decode.inproc.log" --blocks=32
  inproc=$(grep -oE '[0-9.]+ ms/layer/step' "$OUT/grpc_decode.inproc.log" | head -1 | cut -d' ' -f1)
  port=50997
  LD_LIBRARY_PATH="$LIBS" timeout 400 "$dev/bin/blockd" --backend=cuda --listen=127.0.0.1:$port \
    --metrics_listen=127.0.0.1:$((port + 1)) >"$OUT/blockd.grpc_decode.log" 2>&1 &
  daemon=$!
  sleep 3
  (cd "$root" && PYTHONPATH="$dev/python" timeout 300 python3 bench/session_grpc.py --target 127.0.0.1:$port \
     --blocks 32 --in_process_ms "${inproc:-0}" --metrics "http://127.0.0.1:$((port + 1))/metrics") \
    >"$OUT/grpc_decode.log" 2>&1
  rc=$?
  row "grpc_decode.grpc" "$([ $rc -eq 0 ] && echo DONE || echo FAIL)" "see grpc_decode.log"
  tail -5 "$OUT/grpc_decode.log"
  # The same with the C++ client (bench_session), on the same daemon.
  timeout 200 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_session" --target=127.0.0.1:$port --blocks=32 \
    --in_process_ms="${inproc:-0}" >"$OUT/grpc_decode.cc.log" 2>&1
  row "grpc_decode.grpc_cc" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see grpc_decode.cc.log"
  tail -5 "$OUT/grpc_decode.cc.log"
  kill $daemon 2>/dev/null; wait $daemon 2>/dev/null
  # The C++ client again over a Unix socket (a same-host client's other gRPC path); then where a
  # step's time goes in the daemon: the same client on a daemon that logs each step's times
  # (--log_level=debug; the logging itself costs a little), their medians last.
  sock=unix:/tmp/blockd-grpc-decode.sock
  for run in unix,info debug,debug; do
    IFS=, read -r name level <<<"$run"
    decode_session "grpc_decode.$name" blockd $sock "$level" "$OUT/grpc_decode.cc.$name.log"
    row "grpc_decode.grpc_cc_$name" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see grpc_decode.cc.$name.log"
    tail -5 "$OUT/grpc_decode.cc.$name.log"
  done
  for b in 32 1; do
    echo "== the daemon's times of a step, $b-block session"
    python3 "$root/bench/device/step_times.py" "$OUT/blockd.grpc_decode.debug.log" --blocks=$b
  done
fi

# The decode step over gRPC on this bundle's daemon and on an older one (.device/blockd-old.xz,
# when carried: a daemon binary built from an earlier commit against the same libraries),
# alternating, the C++ client over TCP and over a Unix socket each, beside the in-process graph
# step: a change's effect on the step measured within one call. Then this bundle's daemon once
# more at --log_level=debug, where the step's time went.
if [[ " $stages " == *" decode_ab "* ]]; then
  timeout 300 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_decode" --layers=32 --frozen --written_layers=1 \
    --batches=1 --attention_batches= --engine >"$OUT/decode_ab.inproc.log" 2>&1
  row "decode_ab.in_process" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see decode_ab.inproc.log"
  grep -E "CUDA graph|engine decode" "$OUT/decode_ab.inproc.log" | sed 's/^/AB in process: /'
  inproc=$(grep -oE '[0-9.]+ ms/layer/step' "$OUT/decode_ab.inproc.log" | head -1 | cut -d' ' -f1)
  bins=blockd
  if [ -f "$root/.device/blockd-old.xz" ]; then
    xz -dc "$root/.device/blockd-old.xz" >"$dev/bin/blockd-old" && chmod +x "$dev/bin/blockd-old" && bins="blockd-old blockd"
  fi
  # DECODE_AB_SETTING=VAR=VALUE (the daemon's and the client's environment) or --flag=value (the
  # daemon's): this bundle's daemon and client once more with it in every round, after the runs
  # without it in odd rounds and before them in even ones, and at debug level beside the default's
  # debug run, so that step_times.py splits both steps. DECODE_AB_TRANSPORTS: "tcp unix"
  # (default), or one of them.
  if [ -n "${DECODE_AB_SETTING:-}" ] && ! [[ $DECODE_AB_SETTING =~ ^(--)?[A-Za-z_][A-Za-z0-9_]*=[^\ ,]*$ ]]; then
    echo "DECODE_AB_SETTING=$DECODE_AB_SETTING: expected one VAR=VALUE or --flag=value without spaces or commas"; exit 2
  fi
  ats=""
  for t in ${DECODE_AB_TRANSPORTS:-tcp unix}; do
    case $t in
      tcp) ats+=" 127.0.0.1:50991" ;;
      unix) ats+=" unix:/tmp/blockd-ab.sock" ;;
      *) echo "DECODE_AB_TRANSPORTS: $t is neither tcp nor unix"; exit 2 ;;
    esac
  done
  runs=""
  for round in $(seq ${DECODE_AB_ROUNDS:-2}); do
    for at in $ats; do
      one=""
      for bin in $bins; do one+=" $round,$bin,$at,info"; done
      if [ -n "${DECODE_AB_SETTING:-}" ]; then
        set_run=" $round.setting,blockd,$at,info,$DECODE_AB_SETTING"
        if ((round % 2)); then one+=$set_run; else one=$set_run$one; fi
      fi
      runs+=$one
    done
  done
  debug_runs="blockd_debug,blockd,unix:/tmp/blockd-ab.sock,debug"
  [ -n "${DECODE_AB_SETTING:-}" ] && debug_runs+=" setting_debug,blockd,unix:/tmp/blockd-ab.sock,debug,$DECODE_AB_SETTING"
  for run in $runs $debug_runs; do
    IFS=, read -r round bin at level setting <<<"$run"
    name="ab.$round.$bin.${at%%:*}"
    decode_session "$name" "$bin" "$at" "$level" "$OUT/$name.log" "$setting"
    echo "AB $round $bin ${at%%:*}${setting:+ $setting}: $(grep -oE 'median step [0-9.]+ ms' "$OUT/$name.log" | head -1), $(grep -oE "GetServerInfo [0-9.]+ ms" "$OUT/$name.log" | head -1), busy-waiting client $(grep -oE 'busy-waiting.*median step [0-9.]+ ms' "$OUT/$name.log" | grep -oE '[0-9.]+ ms$')"
  done
  for dbg in blockd_debug setting_debug; do
    [ -f "$OUT/ab.$dbg.blockd.unix.log" ] || continue
    for b in 32 1; do
      echo "== the daemon's times of a step, $b-block session ($dbg)"
      python3 "$root/bench/device/step_times.py" "$OUT/blockd.ab.$dbg.blockd.unix.log" --blocks=$b \
        $([ $b = 32 ] && echo --client="$OUT/ab.$dbg.blockd.unix.log")
    done
  done
fi

# gRPC's cost of a sleeping receiver on a stream: the callback API (as the daemon serves Infer)
# against completion queues of the server's own, busy-polled or slept on (bench_grpc_wake).
if [[ " $stages " == *" grpc_wake "* ]]; then
  # Each transport with gRPC's default poller (epoll1), then with GRPC_POLL_STRATEGY=poll.
  for poller in epoll1 poll; do
    for at in 127.0.0.1:0 unix:/tmp/blockd-wake.sock; do
      echo "== GRPC_POLL_STRATEGY=$poller" >>"$OUT/grpc_wake.log"
      timeout 200 env LD_LIBRARY_PATH="$LIBS" GRPC_POLL_STRATEGY=$poller "$dev/bin/bench_grpc_wake" --target=$at \
        --rounds=${WAKE_ROUNDS:-3} >>"$OUT/grpc_wake.log" 2>&1
      row "grpc_wake.$poller.${at%%:*}" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see grpc_wake.log"
    done
  done
  cat "$OUT/grpc_wake.log"
fi

if [[ " $stages " == *" kernels "* ]]; then
  for shape in qwen llama; do
    timeout 120 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_kernels" --shape=$shape >"$OUT/bench_kernels.$shape.log" 2>&1
    row "bench.kernels.$shape" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see bench_kernels.$shape.log"
    cat "$OUT/bench_kernels.$shape.log"
  done
fi

if [[ " $stages " == *" cudnn "* ]]; then
  timeout 120 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_cudnn_attention" --iters=50 >"$OUT/bench_cudnn_attention.log" 2>&1
  row "bench.cudnn_attention" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see bench_cudnn_attention.log"
  cat "$OUT/bench_cudnn_attention.log"
fi

if [[ " $stages " == *" ncu "* ]]; then
  timeout 240 env LD_LIBRARY_PATH="$LIBS" ncu --clock-control none -k regex:"attention_(fwd|bwd)_mma" -c 2 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
    --section MemoryWorkloadAnalysis "$dev/bin/bench_kernels" --shape=qwen --iters=1 >"$OUT/ncu.log" 2>&1
  row "ncu.attention" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see ncu.log"
fi

# Where a decode step's GPU time goes (nsys cannot run on the GPU host; ncu can): every kernel of
# one Llama-3-8B-shaped layer's prefill and three decode steps at batch 1, then at batch 64, timed
# one at a time by ncu (serialised, clocks not locked), summarised by kernel_times.py; then the
# decode attention kernel's speed of light and memory workload at batch 64, 4k context.
if [[ " $stages " == *" profile "* ]]; then
  for b in 1 64; do
    timeout 200 env LD_LIBRARY_PATH="$LIBS" ncu --clock-control none --metrics gpu__time_duration.sum --csv \
      "$dev/bin/bench_decode" --layers=1 --new=3 --batches=$b --attention_batches= >"$OUT/profile.b$b.csv" 2>&1
    row "profile.decode.b$b" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see profile.b$b.txt"
    python3 "$root/bench/device/kernel_times.py" "$OUT/profile.b$b.csv" >"$OUT/profile.b$b.txt" 2>&1
    tail -40 "$OUT/profile.b$b.txt"
  done
  timeout 200 env LD_LIBRARY_PATH="$LIBS" ncu --clock-control none -k regex:"paged_attention" -c 3 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section MemoryWorkloadAnalysis \
    "$dev/bin/bench_decode" --attention_batches=64 --batches= >"$OUT/profile.attention.log" 2>&1
  row "profile.attention" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see profile.attention.log"
  grep -E "paged_attention|DRAM Throughput|Memory Throughput|Duration|Achieved Occupancy|Registers|Warp Cycles Per Issued|Stall|Theoretical Occ" \
    "$OUT/profile.attention.log" | head -40
fi

if [[ " $stages " == *" service "* ]]; then
  # The same span through gRPC over loopback TCP (first with glibc's malloc defaults in daemon and
  # client, BLOCKD_MALLOC_TUNING=0, and one connection; then tuned; then over 3 connections) and
  # over a Unix socket; the daemon logs each Forward's upload, launch and compute+download times
  # (--log_level=debug).
  for run in 127.0.0.1:50996,0,1 127.0.0.1:50997,1,1 127.0.0.1:50998,1,3 unix:/tmp/blockd-bench.sock,1,3; do
    IFS=, read -r target tuning conns <<<"$run"
    BLOCKD_MALLOC_TUNING=$tuning LD_LIBRARY_PATH="$LIBS" timeout 300 "$dev/bin/blockd" --backend=cuda \
      --listen=$target --log_level=debug --metrics_listen= >>"$OUT/blockd.service.log" 2>&1 &
    daemon=$!
    sleep 2
    echo "== $target (BLOCKD_MALLOC_TUNING=$tuning, $conns connections)" >>"$OUT/bench_service.log"
    timeout 200 env BLOCKD_MALLOC_TUNING=$tuning LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_service" --target=$target \
      --blocks=8 --depth=${SERVICE_DEPTH:-1,3} --iters=${SERVICE_ITERS:-6} --connections=$conns \
      >>"$OUT/bench_service.log" 2>&1
    rc=$?
    timeout 60 env BLOCKD_MALLOC_TUNING=$tuning LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_service" --target=$target \
      --transport_probe --iters=6 >>"$OUT/bench_service.log" 2>&1
    kill $daemon 2>/dev/null; wait $daemon 2>/dev/null
    row "bench.service $target t=$tuning c=$conns" "$([ $rc -eq 0 ] && echo DONE || echo FAIL)" "see bench_service.log"
  done
  cat "$OUT/bench_service.log"
  grep "Forward of 8" "$OUT/blockd.service.log" | tail -4
fi

if [[ " $stages " == *" tcp_sweep "* ]]; then
  # Issue 17's remote row against how many micro-batches are in flight and over how many
  # connections: the span of 8 Qwen-like bf16 blocks through one daemon over loopback TCP, beside
  # bench_engine's in-process figure from the same run; then gRPC's one-way time of a 34 MB request.
  log="$OUT/tcp_sweep.log"; : >"$log"
  span_inproc "$log"
  target=127.0.0.1:50993
  span_daemon tcp_sweep $target
  for run in ${SWEEP_RUNS:-3,3,0 3,6,0 6,6,18 8,8,24 12,12,24}; do
    IFS=, read -r conns depth mb <<<"$run"
    span_run "$log" "SWEEP tcp connections $conns" --depth=$depth --micro_batches=$mb --connections=$conns
  done
  for conns in 1 3; do
    timeout 60 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_service" --target=$target --connections=$conns \
      --transport_probe --iters=6 | sed "s/^/SWEEP $conns connection(s): /"
  done
  kill $daemon 2>/dev/null; wait $daemon 2>/dev/null
  row "bench.tcp_sweep" "$([ -n "$inproc" ] && echo DONE || echo FAIL)" "see tcp_sweep.log"
fi

if [[ " $stages " == *" ipc_sweep "* ]]; then
  # Issue 17's same-host rows against how many micro-batches make a step and how many are in
  # flight: the span of 8 Qwen-like bf16 blocks through one daemon (--allow_shared_memory) with the
  # C++ client's same-host transports, beside bench_engine's in-process fwd+bwd from the same run.
  log="$OUT/ipc_sweep.log"; : >"$log"
  span_inproc "$log"
  target=127.0.0.1:50994
  span_daemon ipc_sweep $target --allow_shared_memory
  for run in ${IPC_SWEEP_RUNS:-cuda_auto,3,3 cuda_auto,3,12 cuda_auto,4,24 cuda_ipc_in_place,4,24 shm,4,24 shm_in_place,4,24}; do
    IFS=, read -r transport depth mb <<<"$run"
    span_run "$log" "SWEEP $transport" --depth=$depth --micro_batches=$mb --transport=$transport
  done
  kill $daemon 2>/dev/null; wait $daemon 2>/dev/null
  row "bench.ipc_sweep" "$([ -n "$inproc" ] && echo DONE || echo FAIL)" "see ipc_sweep.log"
fi

if [[ " $stages " == *" spin_ab "* ]]; then
  # The training rows with and without a worker watching the queue (--worker_spin_us=0 against
  # the default), two rounds, alternating, beside bench_engine's in-process fwd+bwd.
  log="$OUT/spin_ab.log"; : >"$log"
  span_inproc "$log"
  target=127.0.0.1:50995
  for spin in 0 -1 0 -1; do
    span_daemon spin_ab $target --allow_shared_memory --worker_spin_us=$spin
    for run in grpc,8,24,0 shm,3,3,1 cuda_auto,3,3,1; do
      IFS=, read -r transport depth mb conns <<<"$run"
      span_run "$log" "SPIN $transport spin $spin" --depth=$depth --micro_batches=$mb --transport=$transport \
        --connections=$conns
    done
    kill $daemon 2>/dev/null; wait $daemon 2>/dev/null
  done
  row "bench.spin_ab" "$([ -n "$inproc" ] && echo DONE || echo FAIL)" "see spin_ab.log"
fi

# What a Step queued behind the step's last Backward would save at the step's turn (CUDA IPC in
# place, 3 in flight): bench_service --step_early_ms=5 sends the Step 5 ms after the last Backward
# instead of after the Backwards' replies (a bound, not a client mode: see bench_service.cc),
# alternating with the usual order in each round, beside bench_engine's pipelined step in process.
#   STEP_EARLY_ROUNDS=2 bash bench/device/run_checks.sh step_early
if [[ " $stages " == *" step_early "* ]]; then
  log="$OUT/step_early.log"; : >"$log"
  target=127.0.0.1:50993
  for round in $(seq "${STEP_EARLY_ROUNDS:-2}"); do
    pipelined_inproc >"$OUT/step_early.run" 2>&1
    cat "$OUT/step_early.run" >>"$log"
    echo "EARLY round $round in process, 3 queued + Step: $(awk '/^pipelined span of 8/ {print $(NF-2)}' "$OUT/step_early.run") tokens/s" | tee -a "$log"
    span_daemon step_early $target --allow_shared_memory
    flags="-1 5"
    ((round % 2)) || flags="5 -1"
    for early in $flags; do
      ipc_in_place_step --step_early_ms=$early --trace >"$OUT/step_early.run" 2>&1
      cat "$OUT/step_early.run" >>"$log"
      echo "EARLY round $round daemon, CUDA IPC in place, step_early_ms $early: $(awk '/^8 blocks/ {print $7}' "$OUT/step_early.run") tokens/s" | tee -a "$log"
    done
    kill $daemon 2>/dev/null; wait $daemon 2>/dev/null
  done
  row "bench.step_early" "$(grep -q 'step_early_ms 5: [0-9]' "$log" && echo DONE || echo FAIL)" "see step_early.log"
fi

# Does a second CUDA context on the GPU slow the in-process step? The daemon's CUDA IPC steps run
# ~3% under bench_engine's, at lower clocks; a same-host client brings a context of its own (it does
# not: bench/RESULTS.md, 2026-12-02 18:03). Rounds of bench_engine's pipelined step (3 micro-batches + Step) alone and beside
# bench/probe/second_context.py (idle; an event every 15 ms; a 32 MiB copy every 15 ms), and the
# daemon's step through CUDA IPC in place (3 in flight), in reverse order every other round; each
# with nvidia-smi sampled every 100 ms: mean SM clock and power over the samples at >= 95%
# utilisation, and the clock event reasons seen most (a bit mask: 0x4 the power cap, 0x20/0x40
# thermal slowdown, 0x1 idle).
#   CONTEXT_AB_ROUNDS=2 CONTEXT_AB_MODES="alone idle events copies daemon" bash bench/device/run_checks.sh context_ab
if [[ " $stages " == *" context_ab "* ]]; then
  log="$OUT/context_ab.log"; : >"$log"
  sampled() {  # label command...: runs the command with the GPU sampled; one summary line
    local label=$1; shift
    nvidia-smi --query-gpu=clocks.sm,power.draw,utilization.gpu,temperature.gpu,clocks_event_reasons.active \
      --format=csv,noheader,nounits -lms 100 >"$OUT/context_ab.smi" 2>/dev/null &
    local smi=$!
    "$@" >"$OUT/context_ab.run" 2>&1
    kill $smi 2>/dev/null; wait $smi 2>/dev/null
    cat "$OUT/context_ab.run" >>"$log"
    local rate
    rate=$(awk '/^pipelined span of 8/ {print $(NF-2)} /^8 blocks/ {print $7}' "$OUT/context_ab.run" | tail -1)
    awk -F', ' -v l="$label" -v r="$rate" '$3 >= 95 {n++; c += $1; w += $2; if (!lo || $4 < lo) lo = $4; if ($4 > hi) hi = $4; why[$5]++}
      END {m = ""; for (k in why) if (why[k] > why[m]) m = k
           printf "CTX %-40s %9s tokens/s  %5.0f MHz  %4.0f W  %s-%s C  reasons %s (%d of %d samples)\n", l, r, n ? c/n : 0, n ? w/n : 0, lo, hi, m, why[m], n}' \
      "$OUT/context_ab.smi" | tee -a "$log"
  }
  target=127.0.0.1:50996
  beside() {  # mode: bench_engine's pipelined step with a second context working (or none), or the daemon's
    local mode=$1 helper=""
    if [ "$mode" = daemon ]; then
      span_daemon context_ab $target --allow_shared_memory
      sampled "daemon, CUDA IPC in place, 3 in flight" ipc_in_place_step
      kill $daemon 2>/dev/null; wait $daemon 2>/dev/null
      return
    fi
    if [ "$mode" != alone ]; then
      python3 "$root/bench/probe/second_context.py" --mode "$mode" >"$OUT/context_ab.helper" 2>&1 &
      helper=$!
      for _ in $(seq 60); do grep -q ready "$OUT/context_ab.helper" 2>/dev/null && break; sleep 0.5; done
    fi
    sampled "in process, beside: $mode" pipelined_inproc
    [ -n "$helper" ] && { kill $helper 2>/dev/null; wait $helper 2>/dev/null; }
  }
  modes=${CONTEXT_AB_MODES:-alone idle events copies daemon}
  for round in $(seq "${CONTEXT_AB_ROUNDS:-2}"); do
    order=$modes
    [ $((round % 2)) -eq 0 ] && order=$(tr ' ' '\n' <<<"$modes" | tac | tr '\n' ' ')
    for mode in $order; do beside "$mode"; done
  done
  row "bench.context_ab" "$(grep -q '^CTX' "$log" && echo DONE || echo FAIL)" "see context_ab.log"
  grep '^CTX' "$log"
fi

if [[ " $stages " == *" transport "* ]]; then
  # Issue 17's transport table: the span of 8 Qwen-like bf16 blocks trained in process
  # (bench_engine) and through one daemon (--allow_shared_memory, native attention on both sides)
  # over inline TCP (3 connections), a Unix socket, POSIX shared memory (bench_service) and CUDA
  # IPC (bench/transport_ipc.py, torch CUDA tensors), in one run; one table on stdout.
  log="$OUT/transport.log"; : >"$log"
  timeout 240 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_engine" --shapes=span8 --precisions=bf16 \
    --iters=${TRANSPORT_ITERS:-6} --attention=native --pipeline=3 --pipeline_traffic >>"$log" 2>&1
  inproc=$(awk '/^span of 8/ {print $12; exit}' "$log")  # "span of 8 x qwen 8x2048 bf16 native fwd bwd step tokens/s"
  inproc_step=$(awk '/^pipelined span of 8/ {print $(NF-2); exit}' "$log")  # "... step 140.1 ms, 350000 tokens/s (...)"
  inproc_moving=$(awk '/^pipelined span of 8.*with transfers$/ {print $(NF-4); exit}' "$log")
  trow() { printf '%-40s %6s %12s %8s\n' "$1" "$2" "$3" "$( [ -n "$3" ] && [ -n "$inproc" ] && awk -v a="$3" -v b="$inproc" 'BEGIN{printf "%.1f%%", 100*a/b}')"; }
  ttable=("$(printf '%-40s %6s %12s %8s' transport depth tokens/s 'of in-process')")
  ttable+=("$(trow 'in process (bench_engine, fwd+bwd)' 1 "$inproc")")
  ttable+=("$(trow 'in process, 3 queued + Step (--pipeline=3)' 3 "$inproc_step")")
  ttable+=("$(trow '  the same, transfers beside it' 3 "$inproc_moving")")
  for run in tcp,127.0.0.1:50990,grpc,3 tcp1,127.0.0.1:50992,grpc,1 unix,unix:/tmp/blockd-transport.sock,grpc,3 \
    shm,127.0.0.1:50991,shm,1; do
    IFS=, read -r name target transport conns <<<"$run"
    LD_LIBRARY_PATH="$LIBS" timeout 300 "$dev/bin/blockd" --backend=cuda --attention=native --listen=$target \
      --allow_shared_memory --metrics_listen= --log_level=debug >"$OUT/blockd.transport.$name.log" 2>&1 &
    daemon=$!
    for _ in $(seq 60); do grep -q "serving blockd" "$OUT/blockd.transport.$name.log" 2>/dev/null && break; sleep 1; done
    sleep 1
    echo "== $name $target transport=$transport connections=$conns" >>"$log"
    timeout 240 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_service" --target=$target --blocks=8 --depth=1,3 \
      --iters=${TRANSPORT_ITERS:-6} --connections=$conns --transport=$transport --trace >>"$log" 2>&1
    awk -v n="$name" '/^8 blocks/ {print n, $4, $7}' "$log" | tail -2 | while read -r n dp tok; do
      echo "$(trow "$n (bench_service)" "$dp" "$tok")"; done >>"$OUT/transport.rows"
    if [ "$name" = tcp ]; then
      # What a remote trainer would run: 8 micro-batches in flight over the connections the client
      # chooses (one per call in flight), 24 a step, so that one micro-batch's transfers overlap
      # the others' compute and the step's fill and drain are amortised.
      echo "== tcp, 8 in flight, connections chosen by the client, 24 micro-batches a step" >>"$log"
      timeout 240 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_service" --target=$target --blocks=8 --depth=8 \
        --micro_batches=24 --iters=${TRANSPORT_ITERS:-6} --connections=0 >>"$log" 2>&1
      awk '/^8 blocks/ && $9 == 24 {print $4, $7}' "$log" | tail -1 | while read -r dp tok; do
        echo "$(trow "tcp, auto connections, 24 micro-batches" "$dp" "$tok")"; done >>"$OUT/transport.rows"
    fi
    if [ "$name" = shm ]; then
      # The C++ client with its host tensors made in its shared-memory regions; through CUDA IPC,
      # copying its tensors into its regions and the replies out, then with its tensors made in the
      # regions (only the event recorded per call); then through CudaActivations, which picks CUDA IPC
      # by itself.
      for ipc in shm_in_place cuda_ipc cuda_ipc_in_place cuda_auto; do
        echo "== $ipc (C++) $target" >>"$log"
        timeout 240 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_service" --target=$target --blocks=8 --depth=1,3 \
          --iters=${TRANSPORT_ITERS:-6} --transport=$ipc --trace >>"$log" 2>&1
        awk -v h="== $ipc (C++)" 'index($0, h) == 1 {on=1; next} /^== / {on=0} on && /^8 blocks/ {print $4, $7}' "$log" |
          while read -r dp tok; do echo "$(trow "$ipc (bench_service, C++)" "$dp" "$tok")"; done >>"$OUT/transport.rows"
      done
      echo "== cuda_ipc $target" >>"$log"
      (cd "$root" && PYTHONPATH="$dev/python" timeout 240 python3 bench/transport_ipc.py --target=$target \
        --iters=${TRANSPORT_ITERS:-6} --depth=1,3) >>"$log" 2>&1
      awk '/^transport cuda_ipc/ {d=$8; sub(":", "", d); print d, $(NF-1)}' "$log" | while read -r dp tok; do
        echo "$(trow 'cuda_ipc (Python, torch CUDA tensors)' "$dp" "$tok")"; done >>"$OUT/transport.rows"
      echo "== shared_memory (Python) $target" >>"$log"
      (cd "$root" && PYTHONPATH="$dev/python" timeout 240 python3 bench/transport_ipc.py --target=$target \
        --iters=${TRANSPORT_ITERS:-6} --depth=1,3 --transport=shared_memory) >>"$log" 2>&1
      awk '/^transport shared_memory/ {d=$8; sub(":", "", d); print d, $(NF-1)}' "$log" | while read -r dp tok; do
        echo "$(trow 'shm (Python, torch host tensors)' "$dp" "$tok")"; done >>"$OUT/transport.rows"
    fi
    kill $daemon 2>/dev/null; wait $daemon 2>/dev/null
    echo "== $name: the daemon's last calls (upload / launch / compute + download; a Step's norm / AdamW)" >>"$log"
    grep -E "(Forward|Backward|Step) of 8" "$OUT/blockd.transport.$name.log" | tail -8 >>"$log"
  done
  [ -f "$OUT/transport.rows" ] && while IFS= read -r line; do ttable+=("$line"); done <"$OUT/transport.rows"
  # What the loopback carries without gRPC (34 MB each way per round, as a micro-batch's Forward):
  # the floor under the inline rows.
  (cd "$root" && timeout 120 python3 bench/probe/socket_probe.py) >>"$log" 2>&1
  cat "$log"
  echo; echo "== transport table =="; printf '%s\n' "${ttable[@]}"
  grep "^socket probe" "$log"
  row "bench.transport" "$([ -n "$inproc" ] && echo DONE || echo FAIL)" "see transport.log"
fi

if [[ " $stages " == *" scale "* ]]; then
  # Issues 13 and 15's replica scaling: the span of 8 Qwen-like bf16 blocks trained by 1, 2, 4, 8
  # replicas (as many as there are GPUs), one daemon per GPU (each sees every GPU; replica r's
  # blocks are on device r), NCCL between them, activations by CUDA IPC (bench/scale_replicas.py).
  ngpu=$(nvidia-smi -L | grep -c '^GPU')
  daemons=() targets=()
  for ((r = 0; r < ngpu; ++r)); do
    LD_LIBRARY_PATH="$LIBS" timeout 500 "$dev/bin/blockd" --backend=cuda --listen=127.0.0.1:$((51000 + r)) \
      --collective_host=127.0.0.1 --allow_shared_memory --metrics_listen= >"$OUT/blockd.scale.$r.log" 2>&1 &
    daemons+=($!) targets+=("127.0.0.1:$((51000 + r))")
  done
  for r in "${!daemons[@]}"; do
    for _ in $(seq 60); do grep -q "serving blockd" "$OUT/blockd.scale.$r.log" 2>/dev/null && break; sleep 1; done
  done
  (cd "$root" && PYTHONPATH="$dev/python" timeout 400 python3 bench/scale_replicas.py \
    --targets="$(IFS=,; echo "${targets[*]}")" --iters=${SCALE_ITERS:-6} ${SCALE_ARGS:-}) >"$OUT/scale.log" 2>&1
  rc=$?
  kill "${daemons[@]}" 2>/dev/null; wait "${daemons[@]}" 2>/dev/null
  row bench.scale "$([ $rc -eq 0 ] && echo DONE || echo FAIL)" "$ngpu GPU(s); see scale.log"
  tail -20 "$OUT/scale.log"
fi

if [[ " $stages " == *" lora "* ]]; then
  # Issue 14's targets in one run: the LoRA blocks against the CPU backend, then bench_engine's
  # Llama block full fine-tune beside the frozen block with rank-16 adapters on all seven
  # projections, 32 of those (memory), llama3 RoPE scaling beside plain RoPE, and PyTorch's LoRA
  # (eager and torch.compile) and full fine-tune of the same block; cuDNN attention on both sides.
  gtest lora.cuda lora_cuda_test '*' 120
  timeout 150 env LD_LIBRARY_PATH="$LIBS" compute-sanitizer --tool memcheck --error-exitcode 9 \
    "$dev/bin/lora_cuda_test" --gtest_filter='*bf16_frozen*:*fp32_trainable_q_v_down*' >"$OUT/lora.memcheck.log" 2>&1
  rc=$?
  row lora.memcheck "$([ $rc -eq 0 ] && echo PASS || echo FAIL)" "$(grep -E 'ERROR SUMMARY' "$OUT/lora.memcheck.log" | tr '\n' ' ')"
  # 30 steps of the tiny LM with LoRA on a frozen fp32 base, through a CUDA daemon, against PyTorch.
  pyunit lora.python_cuda lora_test.LoraAgreementTest BLOCKD_BACKEND=cuda BLOCKD_EXAMPLES="$root/examples"
  timeout 300 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_engine" --shapes=llama,llama-lora16,llama-rope,llama-lora16x32 \
    --precisions=bf16 --iters=${LORA_ITERS:-10} --attention=${LORA_ATTENTION:-cudnn} >"$OUT/bench_lora.log" 2>&1
  row "bench.lora" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see bench_lora.log"
  cat "$OUT/bench_lora.log"
  (cd "$root" && timeout 400 python3 bench/torch_baseline.py --shapes llama \
    --modes ${LORA_TORCH_MODES:-compile-bf16-lora16,eager-bf16-lora16,compile-bf16} --iters 10) \
    >"$OUT/torch_lora.log" 2>&1
  row "bench.torch_lora" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see torch_lora.log"
  cat "$OUT/torch_lora.log"
fi

if [[ " $stages " == *" big "* ]]; then
  # Issue 15's model larger than one GPU: 80 frozen Llama-3-70B-shaped bf16 blocks (~137 GB) spread
  # over every GPU, decoded as one span in process (bench_decode), beside the weight-read floor.
  ngpu=$(nvidia-smi -L | grep -c '^GPU')
  timeout 300 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_decode" --shape=llama70b --layers=80 --devices=$ngpu \
    --frozen --written_layers=2 --batches=1,64 --attention_batches=1 --prompt=128 --new=16 >"$OUT/bench_70b.log" 2>&1
  row bench.llama70b "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "$ngpu GPU(s); see bench_70b.log"
  cat "$OUT/bench_70b.log"
fi

if [[ " $stages " == *" torch "* ]]; then
  port=50999
  LD_LIBRARY_PATH="$LIBS" timeout 900 "$dev/bin/blockd" --backend=cuda --listen=127.0.0.1:$port \
    --metrics_listen= >"$OUT/blockd.torch.log" 2>&1 &
  daemon=$!
  sleep 3
  (cd "$root" && PYTHONPATH="$dev/python" timeout ${TORCH_TIMEOUT:-400} python3 bench/torch_baseline.py \
     --check-target 127.0.0.1:$port --shapes ${TORCH_SHAPES:-qwen,llama,span8} --modes ${TORCH_MODES:-eager-bf16,compile-bf16,eager-fp32} \
     --json "$OUT/torch_baseline.json") >"$OUT/torch_baseline.log" 2>&1
  rc=$?
  kill $daemon 2>/dev/null; wait $daemon 2>/dev/null
  row "bench.torch" "$([ $rc -eq 0 ] && echo DONE || echo FAIL)" "see torch_baseline.log"
  cat "$OUT/torch_baseline.log"
fi

if [[ " $stages " == *" bench "* ]] && [ -x "$dev/bin/bench_engine" ]; then
  timeout 240 env LD_LIBRARY_PATH="$LIBS" "$dev/bin/bench_engine" --iters=${BENCH_ITERS:-10} \
    --attention=${BENCH_ATTENTION:-native,cudnn} >"$OUT/bench_engine.log" 2>&1
  row "bench.engine" "$([ $? -eq 0 ] && echo DONE || echo FAIL)" "see bench_engine.log"
  cat "$OUT/bench_engine.log"
fi

echo
echo "== blockd device checks on $card, $(date -u +%Y-%m-%dT%H:%MZ) =="
printf '%s\n' "${table[@]}" | tee "$OUT/table.txt"
