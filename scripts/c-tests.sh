#!/usr/bin/env bash
# Builds and runs the C API tests against target/release/libdcp.so:
#   tests/c/test_capi.c    self-checking test of every function in include/dcp.h (C11)
#   tests/c/header_cpp.cpp the header from C++17 (included twice)
#   examples/save_load.c   the main example
#   tests/c/test_peer_death.c  a peer rank exiting or freezing mid-collective (default SIGPIPE)
# then runs test_capi again under valgrind (when installed), failing on errors or definite leaks.
#
#   usage: scripts/c-tests.sh            (from anywhere; builds libdcp first if it is missing)
#   env:   CC, CXX (default gcc, g++); KEEP_SCRATCH=1 keeps the scratch directory.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CC="${CC:-gcc}"
CXX="${CXX:-g++}"
LIBDIR="$ROOT/target/release"
OUT="$ROOT/build/c"
mkdir -p "$OUT"

step() { printf '%-44s' "$1 ..."; }
ok() { echo "ok${1:+ ($1)}"; }
die() {
    echo "FAILED"
    [ -n "${2:-}" ] && [ -f "$2" ] && sed 's/^/    /' "$2" >&2
    echo "c-tests: $1" >&2
    exit 1
}

SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/libdcp-c-tests.XXXXXX")"
cleanup() { if [ "${KEEP_SCRATCH:-0}" = 1 ]; then echo "scratch kept in $SCRATCH"; else rm -rf "$SCRATCH"; fi; }
trap cleanup EXIT

# 1. The library.
step "libdcp.so"
if [ ! -f "$LIBDIR/libdcp.so" ]; then
    cargo build --release >"$SCRATCH/cargo.log" 2>&1 || die "cargo build --release failed" "$SCRATCH/cargo.log"
    ok "built"
else
    ok "$LIBDIR/libdcp.so"
fi

# 2. Compile the three programs with warnings as errors.
LINK=(-L"$LIBDIR" -ldcp -Wl,-rpath,"$LIBDIR")
step "compile tests/c/test_capi.c (C11)"
"$CC" -std=c11 -Wall -Wextra -Werror -pedantic -g -pthread -Iinclude tests/c/test_capi.c \
    -o "$OUT/test_capi" "${LINK[@]}" >"$SCRATCH/cc1.log" 2>&1 || die "test_capi.c does not compile" "$SCRATCH/cc1.log"
ok
step "compile tests/c/header_cpp.cpp (C++17)"
"$CXX" -std=c++17 -Wall -Wextra -Werror -pedantic -Iinclude tests/c/header_cpp.cpp \
    -o "$OUT/header_cpp" "${LINK[@]}" >"$SCRATCH/cc2.log" 2>&1 || die "header_cpp.cpp does not compile" "$SCRATCH/cc2.log"
ok
step "compile examples/save_load.c (C11)"
"$CC" -std=c11 -Wall -Wextra -Werror -pedantic -g -Iinclude examples/save_load.c \
    -o "$OUT/save_load" "${LINK[@]}" >"$SCRATCH/cc3.log" 2>&1 || die "save_load.c does not compile" "$SCRATCH/cc3.log"
ok

step "compile tests/c/test_peer_death.c (C11)"
"$CC" -std=c11 -Wall -Wextra -Werror -pedantic -g -Iinclude tests/c/test_peer_death.c \
    -o "$OUT/test_peer_death" "${LINK[@]}" >"$SCRATCH/cc4.log" 2>&1 || die "test_peer_death.c does not compile" "$SCRATCH/cc4.log"
ok

# 3. Run.
step "run header_cpp"
"$OUT/header_cpp" >"$SCRATCH/hdr.log" 2>&1 || die "header_cpp failed" "$SCRATCH/hdr.log"
ok

step "run test_capi"
if "$OUT/test_capi" "$SCRATCH/run1" >"$SCRATCH/t1.log" 2>&1; then
    ok "$(grep '^test_capi:' "$SCRATCH/t1.log" | sed 's/^test_capi: //')"
else
    die "test_capi failed" "$SCRATCH/t1.log"
fi

step "run test_capi under valgrind"
if command -v valgrind >/dev/null 2>&1; then
    if valgrind --error-exitcode=1 --leak-check=full --errors-for-leak-kinds=definite \
        --track-origins=yes "$OUT/test_capi" "$SCRATCH/run2" >"$SCRATCH/vg.log" 2>&1; then
        ok "$(grep -E 'ERROR SUMMARY' "$SCRATCH/vg.log" | tail -1 | sed 's/^==[0-9]*== //')"
        grep -E 'definitely lost|indirectly lost|possibly lost|suppressed:' "$SCRATCH/vg.log" \
            | sed 's/^==[0-9]*== /    /' || true
    else
        die "valgrind reported errors or definite leaks (or the test failed)" "$SCRATCH/vg.log"
    fi
else
    echo "SKIPPED: valgrind not installed"
fi

step "run test_peer_death"
if "$OUT/test_peer_death" "$SCRATCH/peer" >"$SCRATCH/pd.log" 2>&1; then
    ok "$(grep '^test_peer_death:' "$SCRATCH/pd.log" | sed 's/^test_peer_death: //')"
else
    die "test_peer_death failed (exit $?)" "$SCRATCH/pd.log"
fi

step "run examples/save_load"
"$OUT/save_load" "$SCRATCH/example_ckpt" >"$SCRATCH/ex.log" 2>&1 || die "save_load failed" "$SCRATCH/ex.log"
ok "$(tail -1 "$SCRATCH/ex.log")"

echo "c-tests: all passed"
