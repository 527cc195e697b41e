#!/usr/bin/env bash
# Installs libdcp for C and C++ users under PREFIX:
#   PREFIX/lib/libdcp.so, libdcp.a
#   PREFIX/include/dcp.h, dcp.hpp (C++17 RAII layer), dcp_torch.hpp (LibTorch), dcp_c10d.hpp (c10d)
#   PREFIX/include/dcp/third_party/gloo/   headers for constructing a c10d::ProcessGroupGloo
#   PREFIX/lib/cmake/dcp/                  find_package(dcp): dcp::dcp, dcp::dcp_static, dcp::gloo_headers
#   PREFIX/lib/pkgconfig/dcp.pc            pkg-config --cflags --libs dcp
# Builds the library first with `cargo build --release` when cargo is available (set
# DCP_NO_BUILD=1 to install target/release as it is, e.g. on a machine without Rust).
# Files that did not change keep their timestamps (builds against PREFIX are not redone).
# Usage: scripts/install.sh PREFIX          (e.g. /usr/local, $HOME/.local, build/dcp-install)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: scripts/install.sh PREFIX" >&2
    exit 2
fi
mkdir -p "$1"
PREFIX="$(cd "$1" && pwd)"
cd "$ROOT"

if [ "${DCP_NO_BUILD:-0}" != 1 ] && command -v cargo >/dev/null 2>&1; then
    cargo build --release --quiet
fi
if [ ! -f target/release/libdcp.so ]; then
    echo "install: target/release/libdcp.so is missing (run cargo build --release)" >&2
    exit 1
fi

VERSION="$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)"
MAJOR="${VERSION%%.*}"
MINOR="$(echo "$VERSION" | cut -d. -f2)"

install -d "$PREFIX/lib" "$PREFIX/include" "$PREFIX/lib/cmake/dcp" "$PREFIX/lib/pkgconfig"
install -C -m 755 target/release/libdcp.so "$PREFIX/lib/libdcp.so"
[ -f target/release/libdcp.a ] && install -C -m 644 target/release/libdcp.a "$PREFIX/lib/libdcp.a"
install -C -m 644 include/dcp.h include/dcp.hpp include/dcp_torch.hpp include/dcp_c10d.hpp "$PREFIX/include/"
install -d "$PREFIX/include/dcp/third_party"
cp -R -p third_party/gloo/include/gloo "$PREFIX/include/dcp/third_party/"
install -C -m 644 third_party/gloo/LICENSE "$PREFIX/include/dcp/third_party/gloo/LICENSE"
install -C -m 644 cmake/dcpConfig.cmake "$PREFIX/lib/cmake/dcp/dcpConfig.cmake"
sed -e "s/@VERSION@/$VERSION/g" -e "s/@VERSION_MAJOR@/$MAJOR/g" -e "s/@VERSION_MINOR@/$MINOR/g" \
    cmake/dcpConfigVersion.cmake.in >"$PREFIX/lib/cmake/dcp/dcpConfigVersion.cmake"
sed -e "s|@PREFIX@|$PREFIX|g" -e "s/@VERSION@/$VERSION/g" cmake/dcp.pc.in >"$PREFIX/lib/pkgconfig/dcp.pc"
echo "installed libdcp $VERSION under $PREFIX (CMake: -Ddcp_DIR=$PREFIX/lib/cmake/dcp; pkg-config: PKG_CONFIG_PATH=$PREFIX/lib/pkgconfig)"
