#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, and integration tests that
# start the real tessera binary next to Debian's etcd and etcdctl.
#
# The suite runs twice: once with the WAL's default I/O (io_uring when the
# kernel allows it) and once with io_uring forced off (TESSERA_WAL_IO=syscall),
# so both ways to the disk are covered. Then each fuzz target runs for a
# bounded time (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh test
. scripts/cache-env.sh
cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# A hung test must fail the run, not eat CI's time limit: each pass gets a
# bound well above its usual 10 minutes (the test harness also aborts a test
# binary whose servers outlive 15 minutes, printing where they are stuck).
pass_limit=30m
for wal_io in auto syscall; do
    echo "=== test pass with TESSERA_WAL_IO=$wal_io ===" | tee -a "$log"
    # --no-fail-fast: every test binary runs, so the count below is complete.
    set +e
    TESSERA_WAL_IO=$wal_io timeout --kill-after=30s $pass_limit cargo test --workspace --lib --bins --tests --no-fail-fast -- --test-threads=2 2>&1 | tee -a "$log"
    pass_status=${PIPESTATUS[0]}
    # criterion benches run each benchmark once in test mode (they take no
    # libtest flags): a smoke test that they still work.
    TESSERA_WAL_IO=$wal_io timeout --kill-after=30s $pass_limit cargo test --workspace --benches --no-fail-fast 2>&1 | tee -a "$log"
    bench_status=${PIPESTATUS[0]}
    set -e
    if [ "$pass_status" -ne 0 ]; then status=$pass_status; fi
    if [ "$bench_status" -ne 0 ]; then status=$bench_status; fi
done
# Coverage-guided fuzzing of request validation and WAL recovery, bounded
# (FUZZ_SECONDS each, 60 by default): any crash fails the run.
set +e
scripts/fuzz.sh 2>&1 | tee -a "$log"
fuzz_status=${PIPESTATUS[0]}
set -e
if [ "$fuzz_status" -ne 0 ]; then status=$fuzz_status; fi
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed (both WAL I/O modes)\n", p, f }' "$log"
exit "$status"
