#!/usr/bin/env bash
# grpcurl-style smoke test of a running blockd, with no copy of blockd's proto (see smoke.py):
#   deploy/smoke.sh HOST:PORT [--tls] [--cacert CA.pem] [--token TOKEN]
#   kubectl -n blockd port-forward pod/blockd-0 50051:50051 & deploy/smoke.sh 127.0.0.1:50051
# Lists services, describes blockd.v1.BlockService, checks health, then creates a seeded block,
# runs Forward, Backward and Step through it and deletes it. Exits non-zero on any failure.
set -euo pipefail
if [[ $# -lt 1 || $1 == -h || $1 == --help ]]; then
  echo "usage: $0 HOST:PORT [--tls] [--cacert CA.pem] [--cert C.pem --key K.pem] [--token TOKEN]" >&2
  [[ $# -ge 1 ]] && exec /usr/bin/python3 "$(dirname "$0")/smoke.py" --help
  exit 2
fi
# Debian's python3 has python3-grpcio; another python3 first on PATH may not.
PYTHON=${BLOCKD_SMOKE_PYTHON:-/usr/bin/python3}
[[ -x $PYTHON ]] || PYTHON=python3
exec "$PYTHON" "$(dirname "$0")/smoke.py" "$@"
