#!/usr/bin/env bash
# Sets up and runs blockd: installs the dependencies, builds, and starts the daemon in the
# foreground (the CUDA backend when a GPU works, otherwise the CPU backend). Extra arguments go to
# blockd, e.g. --listen=0.0.0.0:50051 --backend=cpu. Ctrl-C drains and stops it.
#   bash scripts/run.sh
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
bash "$root/scripts/install_deps.sh"
bash "$root/scripts/build.sh"
exec "${BUILD_DIR:-$root/build}/server/blockd" "$@"
