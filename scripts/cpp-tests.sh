#!/usr/bin/env bash
# Builds and runs the tests of the C++ layer (include/dcp.hpp, dcp_torch.hpp, dcp_c10d.hpp):
#   1. scripts/install.sh build/dcp-install   (library, headers, CMake package, dcp.pc)
#   2. a pkg-config consumer: tests/cpp/test_dcp_hpp.cpp with `pkg-config --cflags --libs dcp`
#      (C++17, -Wall -Wextra -Werror -pedantic, no LibTorch), run
#   3. examples/CMakeLists.txt with find_package(dcp) from the install tree and LibTorch from
#      .venv, built in build/cpp (kept between runs): libtorch_train, test_dcp_torch, and
#      test_dcp_hpp against libdcp.so and libdcp.a (dcp::dcp, dcp::dcp_static)
#   4. test_dcp_torch, then tests/python/test_libtorch.py (resume at other world sizes over
#      gloo, key sets against Python's get_state_dict, training continued across languages)
# Usage: scripts/cpp-tests.sh        env: PYTHON (default .venv/bin/python), JOBS (default 2)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
JOBS="${JOBS:-2}"
CMAKE="$(command -v cmake || true)"
[ -z "$CMAKE" ] && [ -x "$ROOT/.venv/bin/cmake" ] && CMAKE="$ROOT/.venv/bin/cmake"
if [ -z "$CMAKE" ]; then
    echo "cpp-tests: cmake not found (scripts/setup.sh installs it into .venv)" >&2
    exit 1
fi
PREFIX="$ROOT/build/dcp-install"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/libdcp-cpp-tests.XXXXXX")"
trap 'rm -rf "$SCRATCH"' EXIT
t() { date +%s; }

T0=$(t)
scripts/install.sh "$PREFIX" >/dev/null
echo "installed into $PREFIX ($(($(t) - T0)) s)"

T0=$(t)
# shellcheck disable=SC2046
g++ -std=c++17 -Wall -Wextra -Werror -pedantic -pthread tests/cpp/test_dcp_hpp.cpp -o "$SCRATCH/test_dcp_hpp" \
    $(PKG_CONFIG_PATH="$PREFIX/lib/pkgconfig" pkg-config --cflags --libs dcp)
mkdir -p "$SCRATCH/hpp"
"$SCRATCH/test_dcp_hpp" "$SCRATCH/hpp"
echo "test_dcp_hpp (pkg-config build): ok ($(($(t) - T0)) s)"

T0=$(t)
TORCH_CMAKE="$("$PY" -c 'import torch; print(torch.utils.cmake_prefix_path)')"
"$CMAKE" -S examples -B build/cpp -Ddcp_DIR="$PREFIX/lib/cmake/dcp" -DCMAKE_PREFIX_PATH="$TORCH_CMAKE" >"$SCRATCH/cmake.log" 2>&1 ||
    { cat "$SCRATCH/cmake.log"; exit 1; }
"$CMAKE" --build build/cpp -j "$JOBS" >"$SCRATCH/build.log" 2>&1 || { tail -n 80 "$SCRATCH/build.log"; exit 1; }
echo "cmake build of examples/ (find_package(dcp), LibTorch): ok ($(($(t) - T0)) s)"

T0=$(t)
mkdir -p "$SCRATCH/hpp2" "$SCRATCH/torch"
build/cpp/test_dcp_hpp "$SCRATCH/hpp2" | tail -1
mkdir -p "$SCRATCH/hpp3"
build/cpp/test_dcp_hpp_static "$SCRATCH/hpp3" | tail -1 | sed 's/^test_dcp_hpp/test_dcp_hpp_static (libdcp.a)/'
build/cpp/test_dcp_torch "$SCRATCH/torch"
echo "C++ tests: ok ($(($(t) - T0)) s)"

T0=$(t)
LIBTORCH_TRAIN="$ROOT/build/cpp/libtorch_train" "$PY" tests/python/test_libtorch.py -v
echo "tests/python/test_libtorch.py: ok ($(($(t) - T0)) s)"
