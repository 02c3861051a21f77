#!/usr/bin/env bash
# Installs blockd's build and test dependencies from Debian 12's apt (idempotent).
#   bash scripts/install_deps.sh
set -euo pipefail
packages=(
  build-essential cmake ninja-build pkg-config git curl ca-certificates openssl
  libgrpc++-dev libgrpc-dev protobuf-compiler protobuf-compiler-grpc libprotobuf-dev grpc-proto
  libabsl-dev libssl-dev prometheus-cpp-dev libgtest-dev libgmock-dev libbenchmark-dev
  libopenblas-dev nlohmann-json3-dev libgloo-dev
  python3-grpcio python3-protobuf python3-numpy python3-torch
  prometheus yamllint shellcheck
  clang-14 libclang-rt-14-dev
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi
echo "blockd dependencies installed"
