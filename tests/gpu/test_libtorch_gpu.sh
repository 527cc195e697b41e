#!/usr/bin/env bash
# The C++ / LibTorch layer on a CUDA machine (the lent GPU machine: no Rust, no network; torch,
# g++ and maybe cmake). libdcp.so comes prebuilt at target/release/libdcp.so.
#   1. scripts/install.sh (DCP_NO_BUILD=1) into $OUT/dcp-install
#   2. builds examples/libtorch_train.cpp, tests/cpp/test_dcp_torch.cpp and test_dcp_hpp.cpp with
#      cmake when there is one (find_package(dcp), find_package(Torch)), else with g++ directly
#      from torch's include and lib directories
#   3. test_dcp_hpp; test_dcp_torch (its CUDA part runs when a GPU is present)
#   4. libtorch_train --device cuda: async save at step 5 of 12, resume in a new process, the
#      losses from step 5 on bit-identical to the uninterrupted run's (CUBLAS_WORKSPACE_CONFIG set)
#   5. tests/python/test_libtorch.py against this machine's torch (key sets, cross-language)
# Usage: tests/gpu/test_libtorch_gpu.sh        env: PYTHON (python3), OUT (build/gpu), JOBS (8)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/build/gpu}"
JOBS="${JOBS:-8}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"
t() { date +%s; }

[ -f target/release/libdcp.so ] || { echo "target/release/libdcp.so is missing (build it with cargo where Rust is)" >&2; exit 1; }
TORCH_DIR="$("$PY" -c 'import os, torch; print(os.path.dirname(torch.__file__))')"
echo "torch $("$PY" -c 'import torch; print(torch.__version__, "cuda", torch.version.cuda, "gpu", torch.cuda.is_available())') at $TORCH_DIR"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || true

DCP_NO_BUILD=1 scripts/install.sh "$OUT/dcp-install" >/dev/null
P="$OUT/dcp-install"
BIN="$OUT/bin"
mkdir -p "$BIN"

build_cmake() {
    echo "building with $(cmake --version | head -1)"
    cmake -S examples -B "$OUT/cpp" -Ddcp_DIR="$P/lib/cmake/dcp" -DCMAKE_PREFIX_PATH="$TORCH_DIR/share/cmake" >"$OUT/cmake.log" 2>&1 ||
        { tail -n 30 "$OUT/cmake.log"; return 1; }
    cmake --build "$OUT/cpp" -j "$JOBS" >"$OUT/build.log" 2>&1 || { tail -n 80 "$OUT/build.log"; return 1; }
    cp "$OUT/cpp/libtorch_train" "$OUT/cpp/test_dcp_torch" "$OUT/cpp/test_dcp_hpp" "$BIN/"
}

build_gxx() {
    echo "building with g++ from $TORCH_DIR/include and lib"
    local abi std=-std=c++20
    abi="$("$PY" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
    local torch_flags=(-isystem "$TORCH_DIR/include" -isystem "$TORCH_DIR/include/torch/csrc/api/include"
        -D_GLIBCXX_USE_CXX11_ABI="$abi" -DUSE_DISTRIBUTED)
    local torch_libs=(-L"$TORCH_DIR/lib" -ltorch -ltorch_cpu -lc10 -Wl,-rpath,"$TORCH_DIR/lib")
    # Keep CUDA support loaded where the linker defaults to --as-needed (Ubuntu).
    [ -f "$TORCH_DIR/lib/libtorch_cuda.so" ] && torch_libs+=(-Wl,--no-as-needed -ltorch_cuda -lc10_cuda -Wl,--as-needed)
    local dcp=(-I"$P/include" -L"$P/lib" -ldcp -Wl,-rpath,"$P/lib")
    echo 'int main(){}' | g++ -std=c++20 -x c++ -fsyntax-only - 2>/dev/null || std=-std=c++17
    g++ "$std" -O2 -Wall -Wextra -Werror "${torch_flags[@]}" -isystem "$P/include/dcp/third_party" -DUSE_C10D_GLOO \
        -DDCP_EXAMPLE_GLOO examples/libtorch_train.cpp -o "$BIN/libtorch_train" "${dcp[@]}" "${torch_libs[@]}" &
    local p1=$!
    g++ "$std" -O2 -Wall -Wextra -Werror "${torch_flags[@]}" tests/cpp/test_dcp_torch.cpp -o "$BIN/test_dcp_torch" \
        "${dcp[@]}" "${torch_libs[@]}" &
    local p2=$!
    g++ -std=c++17 -Wall -Wextra -Werror -pedantic -pthread tests/cpp/test_dcp_hpp.cpp -o "$BIN/test_dcp_hpp" "${dcp[@]}"
    wait "$p1" && wait "$p2"
}

T0=$(t)
if command -v cmake >/dev/null 2>&1 && build_cmake; then
    :
else
    command -v cmake >/dev/null 2>&1 && echo "cmake build failed: trying g++ directly"
    build_gxx
fi
echo "build: ok ($(($(t) - T0)) s)"

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/libdcp-gpu-cpp.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
mkdir -p "$SCRATCH/hpp" "$SCRATCH/torch"
"$BIN/test_dcp_hpp" "$SCRATCH/hpp" | tail -1
"$BIN/test_dcp_torch" "$SCRATCH/torch"

# Two checkpoints hold the same keys, the same tensor bytes and the same other values (read by
# torch's own DCP reader).
same_checkpoint() {
    "$PY" - "$1" "$2" "$SCRATCH" <<'EOF'
import os, sys, warnings
import torch
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
warnings.filterwarnings("ignore")

def flat(d, name):
    f = os.path.join(sys.argv[3], name + ".pt")
    dcp_to_torch_save(d, f)
    return flatten_state_dict(torch.load(f, weights_only=False))[0]

a, b = flat(sys.argv[1], "a"), flat(sys.argv[2], "b")
assert sorted(a) == sorted(b), f"keys differ: {sorted(set(a) ^ set(b))}"
n = 0
for k, v in a.items():
    if torch.is_tensor(v):
        w = b[k]
        assert (v.dtype, v.shape) == (w.dtype, w.shape), f"{k}: {v.dtype} {v.shape} vs {w.dtype} {w.shape}"
        same = torch.equal(v.contiguous().reshape(-1).view(torch.uint8), w.contiguous().reshape(-1).view(torch.uint8))
        assert same, f"{k}: the bytes differ"
        n += 1
    else:
        assert v == b[k], f"{k}: {v!r} vs {b[k]!r}"
assert n > 0, "no tensors compared"
print(f"{sys.argv[2]}: {n} tensors bit-identical to {sys.argv[1]}")
EOF
}

export CUBLAS_WORKSPACE_CONFIG=:4096:8
if "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    T0=$(t)
    "$BIN/libtorch_train" --device cuda --steps 12 --save-at 5 --save "$SCRATCH/cuda-ckpt" >"$SCRATCH/full.txt"
    "$BIN/libtorch_train" --device cuda --steps 12 --resume "$SCRATCH/cuda-ckpt" >"$SCRATCH/resumed.txt"
    # 12 losses, the last 7 (steps 5..11) identical after the resume.
    if [ "$(grep -c '^step ' "$SCRATCH/full.txt")" -ne 12 ] || [ "$(grep -c '^step ' "$SCRATCH/resumed.txt")" -ne 7 ]; then
        echo "FAILED: expected 12 and 7 loss lines, got:" >&2
        cat "$SCRATCH/full.txt" "$SCRATCH/resumed.txt" >&2
        exit 1
    fi
    if ! diff <(tail -n 7 "$SCRATCH/full.txt") "$SCRATCH/resumed.txt"; then
        echo "FAILED: CUDA resume differs from the uninterrupted run" >&2
        exit 1
    fi
    # The CUDA checkpoint resumes on CPU too: saved again at once from CPU memory, it holds the
    # same bytes; training on runs (its arithmetic differs from CUDA's, so no loss comparison).
    "$BIN/libtorch_train" --device cpu --steps 5 --resume "$SCRATCH/cuda-ckpt" --save-at 5 --save "$SCRATCH/cpu-ckpt" >/dev/null
    same_checkpoint "$SCRATCH/cuda-ckpt" "$SCRATCH/cpu-ckpt"
    "$BIN/libtorch_train" --device cpu --steps 8 --resume "$SCRATCH/cuda-ckpt" >"$SCRATCH/cpu.txt"
    [ "$(grep -c '^step ' "$SCRATCH/cpu.txt")" -eq 3 ] || { echo "FAILED: the CPU resume trained no steps 5..7" >&2; exit 1; }
    echo "libtorch_train --device cuda: resumed losses of steps 5..11 bit-identical ($(($(t) - T0)) s)"
    sed 's/^/    /' "$SCRATCH/resumed.txt"
else
    echo "no GPU: skipped the --device cuda run"
fi

T0=$(t)
LIBTORCH_TRAIN="$BIN/libtorch_train" "$PY" tests/python/test_libtorch.py -v 2>&1 | tail -n 15
echo "tests/python/test_libtorch.py ($(($(t) - T0)) s)"
