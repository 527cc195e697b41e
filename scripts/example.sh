#!/usr/bin/env bash
# Builds libdcp and runs the main example (examples/save_load.c): a small model's state saved
# as a PyTorch DCP checkpoint, reloaded into fresh buffers and verified.
# Usage: scripts/example.sh [CHECKPOINT_DIR]   (default: a new temporary directory)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
cargo build --release
mkdir -p build
gcc -std=c11 -Wall -Wextra -Werror -Iinclude examples/save_load.c -o build/save_load \
    -Ltarget/release -ldcp -Wl,-rpath,"$ROOT/target/release"
DIR="${1:-$(mktemp -d "${TMPDIR:-/tmp}/libdcp-example.XXXXXX")/ckpt}"
build/save_load "$DIR"
echo "checkpoint written to $DIR:"
ls -la "$DIR"
