#!/usr/bin/env bash
# Builds examples/libtorch_train_bench.cpp (the C++ / LibTorch training-loop checkpoint
# benchmark, the libdcp rows of scripts/bench_train.py) against this machine's torch and
# libdcp, then runs it with the arguments given:
#   scripts/bench_train_cpp.sh                               (CUDA, the defaults of the bench)
#   scripts/bench_train_cpp.sh --device cpu --layers 2 --width 256 --batch 64 --steps 30 --every 10
# Built with g++ straight from torch's include and lib directories, as the g++ path of
# tests/gpu/test_libtorch_gpu.sh does (one file: no install tree or cmake needed; a CUDA build of
# torch needs no CUDA toolkit). Rebuilt only when the source, the headers or libdcp changed.
# env: PYTHON (python3, else .venv/bin/python: the one whose torch is used),
#      LIBDCP_SO (target/release/libdcp.so), BENCH_BUILD (build/bench-cpp: where the binary goes)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="${PYTHON:-python3}"
if [ -z "${PYTHON:-}" ] && ! "$PY" -c 'import torch' 2>/dev/null && [ -x "$ROOT/.venv/bin/python" ]; then
    PY="$ROOT/.venv/bin/python"
fi
LIBDCP_SO="${LIBDCP_SO:-$ROOT/target/release/libdcp.so}"
[ -f "$LIBDCP_SO" ] || { echo "bench_train_cpp: $LIBDCP_SO is missing (cargo build --release, or set LIBDCP_SO)" >&2; exit 1; }
LIBDCP_DIR="$(cd "$(dirname "$LIBDCP_SO")" && pwd)"
BUILD="${BENCH_BUILD:-$ROOT/build/bench-cpp}"
mkdir -p "$BUILD"
BIN="$BUILD/libtorch_train_bench"
SRC=examples/libtorch_train_bench.cpp

TORCH_DIR="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"

up_to_date() {
    [ -x "$BIN" ] || return 1
    local f
    for f in "$SRC" include/dcp.h include/dcp.hpp include/dcp_torch.hpp "$LIBDCP_SO" scripts/bench_train_cpp.sh; do
        [ "$BIN" -nt "$f" ] || return 1
    done
}

build() {
    local abi std=-std=c++20
    abi="$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
    local torch_flags=(-isystem "$TORCH_DIR/include" -isystem "$TORCH_DIR/include/torch/csrc/api/include"
        -D_GLIBCXX_USE_CXX11_ABI="$abi")
    local torch_libs=(-L"$TORCH_DIR/lib" -ltorch -ltorch_cpu -lc10 -Wl,-rpath,"$TORCH_DIR/lib")
    # Nothing calls into libtorch_cuda directly: keep it loaded (its CUDA guard registers CUDA
    # support) where the linker defaults to --as-needed.
    [ -f "$TORCH_DIR/lib/libtorch_cuda.so" ] && torch_libs+=(-Wl,--no-as-needed -ltorch_cuda -lc10_cuda -Wl,--as-needed)
    local dcp=(-Iinclude -L"$LIBDCP_DIR" -l:"$(basename "$LIBDCP_SO")" -Wl,-rpath,"$LIBDCP_DIR")
    echo 'int main(){}' | g++ -std=c++20 -x c++ -fsyntax-only - 2>/dev/null || std=-std=c++17
    echo "building $BIN with g++ against torch at $TORCH_DIR" >&2
    g++ "$std" -O2 -Wall -Wextra -Werror "${torch_flags[@]}" "$SRC" -o "$BIN.tmp" "${dcp[@]}" "${torch_libs[@]}" -ldl -pthread
    mv "$BIN.tmp" "$BIN"
}

up_to_date || build
command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true
# BENCH_GDB=1: under gdb, printing every thread's backtrace if the bench crashes.
if [ "${BENCH_GDB:-0}" = 1 ] && command -v gdb >/dev/null 2>&1; then
    exec gdb -q -batch -ex run -ex "thread apply all bt 12" --args "$BIN" "$@"
fi
exec "$BIN" "$@"
