#!/usr/bin/env bash
# Builds blockd with the CUDA backend for Hopper here, and bundles what the GPU host needs into
# the git-ignored .device/bundle.tar.xz (name .device in the device tool's `carry`): binaries in bin/, the
# shared libraries they resolve outside glibc, libstdc++ and CUDA in lib/, the Python package with
# its generated stubs and the Python tests in python/. run_checks.sh unpacks it. See
# ARCHITECTURE.md, "Running on the GPU host".
#   bash bench/device/bundle.sh            # then: device run ... carry=[".device"]
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
build=${BLOCKD_DEVICE_BUILD:-$root/build-device}
cmake -S "$root" -B "$build" -G Ninja -DBLOCKD_CUDA=ON -DCMAKE_BUILD_TYPE=${BLOCKD_BUILD_TYPE:-Release} \
  -DCMAKE_CUDA_ARCHITECTURES=90 >/dev/null
want="blockd blockctl cuda_ipc_client_test cuda_ops_test cuda_block_test cuda_session_test frozen_cuda_test lora_cuda_test sticky_error_test cudnn_attention_test nccl_group_test nccl_multigpu_test bench_cudnn_attention blockd_proto_python blockd_python bench_engine bench_kernels bench_service bench_decode bench_allreduce"
have=$(ninja -C "$build" -t targets all 2>/dev/null | cut -d: -f1)
targets=$(for t in $want; do grep -qx "$t" <<<"$have" && echo "$t"; done)
ninja -C "$build" $targets
out="$root/.device"
rm -rf "$out"
mkdir -p "$out/bin" "$out/lib" "$out/python"
bins=("$build/server/blockd" "$build/client/blockctl" "$build/tests/gpu/cuda_ops_test"
      "$build/tests/gpu/cuda_block_test" "$build/tests/gpu/cuda_session_test" "$build/tests/gpu/frozen_cuda_test"
      "$build/tests/gpu/lora_cuda_test" "$build/tests/gpu/sticky_error_test" "$build/tests/gpu/nccl_group_test"
      "$build/tests/gpu/nccl_multigpu_test"
      "$build/tests/gpu/cudnn_attention_test" "$build/tests/gpu/cuda_ipc_client_test")
for b in "$build"/bench/bench_*; do [ -x "$b" ] && bins+=("$b"); done
for b in "${bins[@]}"; do
  [ -x "$b" ] || continue
  cp "$b" "$out/bin/" && strip "$out/bin/$(basename "$b")"
  # Every resolved library except glibc's, the C++ runtime (the host's is newer) and CUDA's.
  ldd "$b" | awk '/=> \//{print $3}' | grep -vE '/(libc|libm|libdl|libpthread|librt|ld-linux[^/]*|libstdc\+\+|libgcc_s|libcuda|libcudart|libcublas[A-Za-z]*|libcudnn[a-z_]*|libnccl)\.so' \
    | while read -r lib; do cp -nL "$lib" "$out/lib/"; done || true  # grep finds nothing for some binaries
done
cp -r "$build/python/." "$out/python/"
cp -r "$root/tests/python/." "$out/python/" 2>/dev/null || true
# lora_test.py (run_checks.sh lora runs it against a CUDA daemon) and what it imports; not the
# whole folder: its hf_export_test.py would shadow tests/gpu's.
cp "$root"/tests/client_python/{lora_test,client_test,torch_reference}.py "$out/python/"
cp "$root"/tests/gpu/*.py "$out/python/" 2>/dev/null || true  # hf_generate_test.py
cp "$root/bench/hf_decode.py" "$out/python/"  # the decode stage's Hugging Face baseline
# The travelling tree is limited to 64 MiB: ship one compressed archive (OpenBLAS alone is 36 MB).
tar -C "$out" -cJf "$root/.bundle.tar.xz" bin lib python
rm -rf "$out" && mkdir -p "$out" && mv "$root/.bundle.tar.xz" "$out/bundle.tar.xz"
du -sh "$out/bundle.tar.xz"
