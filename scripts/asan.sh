#!/usr/bin/env bash
# Runs the C API test (tests/c/test_capi.c: every function of include/dcp.h with NULL and
# out-of-range arguments, round trips, corruption, threads) under AddressSanitizer,
# LeakSanitizer and UndefinedBehaviorSanitizer, and reports leaks.
#
# The C side is instrumented (gcc or clang -fsanitize=address,undefined); libdcp.so is the normal
# release build: its heap allocations go through the sanitizer's malloc, so leaks of libdcp
# objects are reported, and its bulk copies (memcpy/memmove/memset) are checked, but its own
# loads and stores are not instrumented. With ASAN_RUST=1 the script also runs the Rust
# integration tests (round trips, damaged checkpoints, one-byte corruption) with libdcp itself
# compiled with -Zsanitizer=address (stable rustc through RUSTC_BOOTSTRAP=1; a separate build in
# target/asan, several minutes).
#
#   usage: scripts/asan.sh            env: CC (default gcc), ASAN_RUST=1, KEEP_SCRATCH=1
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CC="${CC:-gcc}"
LIBDIR="$ROOT/target/release"
OUT="$ROOT/build/asan"
mkdir -p "$OUT"
SCRATCH="$(mktemp -d "${TMPDIR:-/tmp}/libdcp-asan.XXXXXX")"
cleanup() { if [ "${KEEP_SCRATCH:-0}" = 1 ]; then echo "scratch kept in $SCRATCH"; else rm -rf "$SCRATCH"; fi; }
trap cleanup EXIT

[ -f "$LIBDIR/libdcp.so" ] || cargo build --release >"$SCRATCH/cargo.log" 2>&1 || {
    tail -n 30 "$SCRATCH/cargo.log"
    exit 1
}

if ! echo 'int main(void){return 0;}' | "$CC" -x c -fsanitize=address,undefined - -o "$SCRATCH/probe" 2>"$SCRATCH/probe.log"; then
    echo "asan: $CC cannot build with -fsanitize=address,undefined (install libasan / libubsan, or libclang-rt for clang):"
    sed 's/^/    /' "$SCRATCH/probe.log"
    exit 2
fi

printf '%-60s' "compile test_capi.c with -fsanitize=address,undefined ..."
"$CC" -std=c11 -Wall -Wextra -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -pthread -Iinclude tests/c/test_capi.c -o "$OUT/test_capi" -L"$LIBDIR" -ldcp -Wl,-rpath,"$LIBDIR" \
    >"$SCRATCH/cc.log" 2>&1 || {
    echo "FAILED"
    sed 's/^/    /' "$SCRATCH/cc.log"
    exit 1
}
echo ok

printf '%-60s' "run test_capi (ASan + LSan + UBSan) ..."
export ASAN_OPTIONS="detect_leaks=1:halt_on_error=1:abort_on_error=0:detect_stack_use_after_return=1:check_initialization_order=1"
export UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1"
export LSAN_OPTIONS="report_objects=1"
if "$OUT/test_capi" "$SCRATCH/run" >"$SCRATCH/asan.log" 2>&1; then
    echo "ok ($(grep '^test_capi:' "$SCRATCH/asan.log" | sed 's/^test_capi: //'))"
    leaks=$(grep -c 'leak of' "$SCRATCH/asan.log" || true)
    echo "    leaks reported by LeakSanitizer: $leaks; sanitizer errors: 0"
else
    echo "FAILED"
    grep -E 'ERROR: |SUMMARY: |leak of|runtime error|FAIL' "$SCRATCH/asan.log" | head -n 40 | sed 's/^/    /'
    echo "    full log: $SCRATCH/asan.log (KEEP_SCRATCH=1 keeps it)"
    exit 1
fi

printf '%-60s' "test_peer_death (ASan + LSan + UBSan) ..."
"$CC" -std=c11 -Wall -Wextra -g -O1 -fno-omit-frame-pointer -fsanitize=address,undefined -fno-sanitize-recover=undefined \
    -Iinclude tests/c/test_peer_death.c -o "$OUT/test_peer_death" -L"$LIBDIR" -ldcp -Wl,-rpath,"$LIBDIR" >"$SCRATCH/cc2.log" 2>&1 || {
    echo "FAILED (compile)"
    sed 's/^/    /' "$SCRATCH/cc2.log"
    exit 1
}
if "$OUT/test_peer_death" "$SCRATCH/peer" >"$SCRATCH/pd.log" 2>&1; then
    echo "ok ($(grep '^test_peer_death:' "$SCRATCH/pd.log" | sed 's/^test_peer_death: //'); leaks: $(grep -c 'leak of' "$SCRATCH/pd.log" || true))"
else
    echo "FAILED"
    grep -E 'ERROR: |SUMMARY: |leak of|runtime error|FAIL' "$SCRATCH/pd.log" | head -n 40 | sed 's/^/    /'
    exit 1
fi

if [ "${ASAN_RUST:-0}" = 1 ]; then
    host="$(rustc -vV | sed -n 's/^host: //p')"
    printf '%-60s' "Rust tests with libdcp built with -Zsanitizer=address ..."
    if RUSTC_BOOTSTRAP=1 RUSTFLAGS="-Zsanitizer=address -Cdebug-assertions=on -Coverflow-checks=on" \
        ASAN_OPTIONS="detect_leaks=1" cargo test --release --target "$host" --target-dir target/asan \
        --test roundtrip --test corruption --test fuzz_corpus --test plan_cache >"$SCRATCH/rust.log" 2>&1; then
        echo "ok ($(grep -c '^test .* ok$' "$SCRATCH/rust.log") tests)"
    else
        echo "FAILED"
        grep -E 'ERROR: |SUMMARY: |panicked|FAILED|error' "$SCRATCH/rust.log" | head -n 40 | sed 's/^/    /'
        exit 1
    fi
fi
echo "asan: all passed"
