#!/usr/bin/env bash
# The test command: sets up what the tests need (scripts/setup.sh), then runs every test.
# Usage: scripts/test.sh
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
source scripts/setup.sh

LOGDIR="$(mktemp -d "${TMPDIR:-/tmp}/libdcp-test.XXXXXX")"
PY="$ROOT/.venv/bin/python"
export LIBDCP_SO="$ROOT/target/release/libdcp.so"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
failed=()
T0=$(date +%s)

# ", N skipped" when the log shows skipped tests: unittest's "OK (skipped=N)" summaries, and the
# "SKIPPED: why" lines that the scripts print for a check they could not run.
skipped_in() {
    local n
    n=$(awk '/^(OK|FAILED) \(.*skipped=[0-9]+/ { match($0, /skipped=[0-9]+/); n += substr($0, RSTART + 8, RLENGTH - 8) }
             /SKIPPED: / { n++ }
             END { print n + 0 }' "$1")
    if [ "$n" -gt 0 ]; then echo ", $n skipped"; fi
}

run_step() {
    local name="$1"
    shift
    local log="$LOGDIR/$(echo "$name" | tr -c 'a-zA-Z0-9' '_').log"
    local t=$(date +%s)
    printf '%-62s' "$name ..."
    if "$@" >"$log" 2>&1; then
        echo "ok ($(($(date +%s) - t)) s$(skipped_in "$log"))"
    else
        echo "FAILED ($(($(date +%s) - t)) s)"
        tail -n 60 "$log" | sed 's/^/    /'
        failed+=("$name")
    fi
}

# Functions run by run_step are called as an `if` condition, where `set -e` is off: every
# command whose failure must fail the step ends in `|| return 1`.
mpi_example() {
    mkdir -p build || return 1
    mpicc -std=c11 -Wall -Wextra -Werror -Iinclude examples/mpi_save_load.c -o build/mpi_save_load \
        -Ltarget/release -ldcp -Wl,-rpath,"$ROOT/target/release" -lm || return 1
    local d n
    d="$(mktemp -d)" || return 1
    for n in 4 3; do
        timeout 300 mpirun --oversubscribe -np "$n" build/mpi_save_load "$d/ckpt" || {
            echo "mpi_example: mpirun -np $n failed"
            rm -rf "$d"
            return 1
        }
    done
    rm -rf "$d"
}

# test_s3.py starts a local S3 server and, against it, also runs the Rust storage tests that need
# one (the conformance suite): DCP_REQUIRE_S3=1 makes anything it would skip a failure. Its
# interrupted saves inject write errors through DCP_FAULT, which only a library built with the
# `fault-injection` feature reads: built apart (target/faults), used for those cases only.
s3_tests() {
    # Seeded from the main build the first time: only what the feature changes is rebuilt.
    if [ ! -d target/faults/release ]; then
        mkdir -p target/faults && cp -a target/release target/faults/ || return 1
    fi
    cargo build --release --lib --features fault-injection --target-dir target/faults || return 1
    DCP_REQUIRE_S3=1 LIBDCP_FAULT_SO="$ROOT/target/faults/release/libdcp.so" "$PY" tests/python/test_s3.py || return 1
}

# The reliability steps append their tables of figures here (DCP_FIGURES).
FIGURES="$LOGDIR/reliability.txt"

reliability_rust() {
    DCP_FIGURES="$FIGURES" cargo test --release --test corruption --test fuzz_corpus --test concurrency -- --nocapture
}

# The dcp tool is its own crate (cli/, package dcp-cli): its unit tests and cli/tests/cli.rs.
cli_tests() {
    cargo test --release -p dcp-cli &&
        DCP_BIN="$ROOT/target/release/dcp" "$PY" tests/python/test_cli.py -v
}

# The habits every change keeps: formatted, no clippy warnings in any target (tests, examples, the
# CLI), documentation that builds without warnings (broken links, missing docs).
rust_habits() {
    cargo fmt --all --check || return 1
    cargo clippy --workspace --all-targets -- -D warnings || return 1
    RUSTDOCFLAGS="-D warnings" cargo doc --no-deps -p libdcp || return 1
}

run_step "setup: OpenMPI, valgrind, cmake, Python venv with torch" bash -c "source scripts/setup.sh; setup_system; setup_venv"
run_step "cargo build --release" cargo build --release
run_step "cargo fmt --check, clippy -D warnings, cargo doc" rust_habits
run_step "cargo test (units, header is current, round trips, plan cache)" cargo test --release
run_step "C API tests, C++ header, valgrind, C example" scripts/c-tests.sh
run_step "dcp command-line tool (Rust; torch and safetensors)" cli_tests
run_step "MPI example through host callbacks (mpirun -np 4, 3)" mpi_example
run_step "interop with torch: both directions, corruption, zip64" "$PY" tests/python/test_interop.py
run_step "seed scenarios over N processes (TCP rendezvous)" "$PY" tests/python/test_multirank.py
run_step "interop with torch.distributed (gloo, DTensor layouts)" "$PY" tests/python/test_torch_distributed.py
run_step "C++ / LibTorch: headers, CMake package, resume, Python" scripts/cpp-tests.sh
run_step "S3: a local SeaweedFS server, save/load/reshard, faults, conformance" s3_tests
run_step "reliability: 1-byte corruption, fuzz corpus, concurrency (Rust)" reliability_rust
run_step "reliability: saves killed with SIGKILL (crash consistency)" env DCP_FIGURES="$FIGURES" "$PY" tests/python/test_crash.py
run_step "reliability: racing writers (2-4 processes, 2-rank jobs, overwrite, S3)" env DCP_FIGURES="$FIGURES" "$PY" tests/python/test_race.py
run_step "reliability: disk full (tmpfs and ext4 loop mounts; root)" env DCP_FIGURES="$FIGURES" "$PY" tests/python/test_diskfull.py
run_step "reliability: a rank killed or frozen mid-save/load" env DCP_FIGURES="$FIGURES" "$PY" tests/python/test_rank_death.py
run_step "reliability: C API under ASan, LSan and UBSan" scripts/asan.sh

echo "total: $(($(date +%s) - T0)) s; logs in $LOGDIR (reliability figures: $FIGURES)"
if [ ${#failed[@]} -gt 0 ]; then
    echo "FAILED: ${failed[*]}"
    exit 1
fi
echo "all tests passed"
