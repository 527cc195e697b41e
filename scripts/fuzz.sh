#!/usr/bin/env bash
# Runs every fuzz target (fuzz/fuzz_targets/, bodies in fuzz/harness.rs) with cargo-fuzz
# (libFuzzer) for a bounded time each, keeping the growing corpus in fuzz/work/<target>/, then
# refreshes the small committed corpus (fuzz/corpus/<target>/: seeds plus 64 minimised
# inputs), which `cargo test --test fuzz_corpus` replays with fuzz/regressions/ (and
# fuzz/work/ when present). Not part of scripts/test.sh: it needs cargo-fuzz and takes minutes.
#
#   usage: scripts/fuzz.sh [SECONDS_PER_TARGET] [TARGET...]     (default 60 s, every target)
#   env:   FUZZ_JOBS=N     parallel fuzzing processes per target (default 1)
#          FUZZ_MERGE=0    leave fuzz/corpus/ alone; FUZZ_KEEP=N minimised inputs kept there (64)
#          FUZZ_RSS_MB=N   libFuzzer's -rss_limit_mb: a run whose RSS passes N MiB is a crash (2048)
#          FUZZ_MALLOC_MB=N  -malloc_limit_mb: so is any single allocation over N MiB (256)
#
# Memory counts: the readers must stay within a small multiple of their input (an input that
# expands, such as a pickle of shared references, is a crash under these limits, and its file
# belongs in fuzz/regressions/<target>/, which tests/fuzz_corpus.rs replays with a bound on the
# peak it allocates). The corpus inputs are at most a few hundred KB, so 256 MiB for one
# allocation and 2 GiB of RSS (AddressSanitizer's shadow memory included) are far above what a
# correct reader needs and far below what an amplification takes.
#
# Needs cargo-fuzz (`cargo install cargo-fuzz`). Only stable Rust is needed: libFuzzer's
# sanitizer-coverage flags are nightly-only, so the script sets RUSTC_BOOTSTRAP=1.
# The growing working corpus is fuzz/work/<target>/ (not committed); crashes land in
# fuzz/artifacts/<target>/. Prints one line per target: runs, executions, exec/s, corpus size.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT/fuzz"
SECS="${1:-60}"
shift || true
TARGETS=("$@")
if [ ${#TARGETS[@]} -eq 0 ]; then
    TARGETS=(pickle metadata zipitem sidecar plan)
fi
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: cargo-fuzz is not installed (cargo install cargo-fuzz)" >&2
    exit 2
fi
LOGS="$ROOT/fuzz/logs"
mkdir -p "$LOGS"
# Built like `cargo fuzz build`: release, debug assertions and overflow checks on.
cargo fuzz build >"$LOGS/build.log" 2>&1 || { tail -n 30 "$LOGS/build.log"; exit 1; }
BIN="$ROOT/fuzz/target/$(rustc -vV | sed -n 's/^host: //p')/release"
LIMITS=(-rss_limit_mb="${FUZZ_RSS_MB:-2048}" -malloc_limit_mb="${FUZZ_MALLOC_MB:-256}")
JOBARGS=()
if [ "${FUZZ_JOBS:-1}" -gt 1 ]; then
    JOBARGS=(-jobs="$FUZZ_JOBS" -workers="$FUZZ_JOBS")
fi
status=0
printf '%-10s %8s %12s %10s %8s  %s\n' target seconds executions exec/s corpus result
for t in "${TARGETS[@]}"; do
    mkdir -p "work/$t" "corpus/$t" "artifacts/$t"
    log="$LOGS/$t.log"
    set +e
    "$BIN/$t" "work/$t" "corpus/$t" -max_total_time="$SECS" "${JOBARGS[@]}" "${LIMITS[@]}" -print_final_stats=1 -artifact_prefix="artifacts/$t/" >"$log" 2>&1
    rc=$?
    set -e
    # With -jobs, libFuzzer writes each worker's output to fuzz-N.log.
    cat fuzz-*.log >>"$log" 2>/dev/null && rm -f fuzz-*.log
    execs=$(grep -h 'stat::number_of_executed_units' "$log" | awk '{s += $2} END {print s + 0}')
    eps=$(grep -h 'stat::average_exec_per_sec' "$log" | awk '{s += $2} END {print s + 0}')
    result="ok"
    if [ $rc -ne 0 ]; then
        result="FAILED (rc $rc; see $log and fuzz/artifacts/$t/)"
        status=1
    fi
    printf '%-10s %8s %12s %10s %8s  %s\n' "$t" "$SECS" "$execs" "$eps" "$(ls "work/$t" | wc -l)" "$result"
    if [ "${FUZZ_MERGE:-1}" = 1 ] && [ $rc -eq 0 ]; then
        # The committed corpus stays small: the seeds (seed-*) and FUZZ_KEEP (default 64) inputs
        # of a set-cover minimisation of everything found so far, spread over its sizes (min-*).
        tmp="$(mktemp -d)"
        "$BIN/$t" -set_cover_merge=1 "${LIMITS[@]}" "$tmp" "corpus/$t" "work/$t" >"$LOGS/$t.merge.log" 2>&1 || true
        rm -f "corpus/$t"/min-*
        sha1sum "corpus/$t"/seed-* 2>/dev/null | cut -d' ' -f1 >"$tmp.seeds"
        for f in $(ls -Sr "$tmp" | awk -v k="${FUZZ_KEEP:-64}" '{a[NR] = $0} END {s = NR / k; if (s < 1) s = 1; for (i = 1; i <= NR && n < k; i += s) {print a[int(i)]; n++}}'); do
            grep -qx "$f" "$tmp.seeds" || cp "$tmp/$f" "corpus/$t/min-$f"
        done
        rm -f "$tmp.seeds"
        rm -rf "$tmp"
    fi
done
exit $status
