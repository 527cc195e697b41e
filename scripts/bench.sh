#!/usr/bin/env bash
# The benchmark command: builds libdcp (when cargo is here) and runs scripts/bench.py, which
# prints one table comparing libdcp with the disk's O_DIRECT limit and torch DCP, measured in
# the same run. Meant for the GPU machine (CUDA tensors); elsewhere it runs on CPU tensors.
# Usage: scripts/bench.sh [bench.py options, e.g. --dir /data/bench --gib 8]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if command -v cargo >/dev/null 2>&1; then cargo build --release -q; fi
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
export LIBDCP_SO="${LIBDCP_SO:-$ROOT/target/release/libdcp.so}"
exec "$PY" scripts/bench.py "$@"
