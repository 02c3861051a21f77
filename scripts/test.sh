#!/usr/bin/env bash
# Installs what the build and the tests need (idempotent: a no-op once installed), builds blockd
# and runs every test that needs no GPU (unit, integration, python, deploy, reliability, fuzz
# smoke): what CI runs. On a fresh machine this is the whole setup; run.sh is not needed first.
# On a machine with a GPU, `ctest -L gpu` in build/ adds the GPU tests.
#   bash scripts/test.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
build=${BUILD_DIR:-$root/build}
bash "$root/scripts/install_deps.sh"
bash "$root/scripts/build.sh"
cd "$build"
ctest -LE 'gpu|load' --output-on-failure -j "$(nproc)" --timeout 600
