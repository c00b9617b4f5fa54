#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, and integration tests that
# start the real tessera and tessera-store binaries next to Debian's etcd and
# etcdctl, with real loop devices and filesystems for volumes (as root).
#
# The whole suite runs with the default I/O of the logs (io_uring when the
# kernel allows it); then the tests of what writes through them (the WAL,
# the shard log, and the server tests that crash and restart members) run
# again with io_uring forced off (TESSERA_WAL_IO=syscall), so both ways to
# the disk are covered. Then each fuzz target runs for a bounded time
# (scripts/fuzz.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh test
. scripts/cache-env.sh
# A test run builds each checkout once: incremental caches (tens of GB in a
# shared target directory, one set per checkout path) would only fill the
# disk.
export CARGO_INCREMENTAL=0
cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# A hung test must fail the run, not eat CI's time limit: each pass gets a
# bound well above its usual 10 minutes (the test harness also aborts a test
# binary whose servers outlive 15 minutes, printing where they are stuck).
pass_limit=30m
run_pass() {
    local wal_io=$1; shift
    echo "=== test pass with TESSERA_WAL_IO=$wal_io: $* ===" | tee -a "$log"
    set +e
    # --no-fail-fast: every test binary runs, so the count below is complete.
    TESSERA_WAL_IO=$wal_io timeout --kill-after=30s $pass_limit cargo test --no-fail-fast "$@" -- --test-threads=2 2>&1 | tee -a "$log"
    local pass_status=${PIPESTATUS[0]}
    set -e
    if [ "$pass_status" -ne 0 ]; then status=$pass_status; fi
}
run_pass auto --workspace --lib --bins --tests
# What writes through the WAL or the shard log, again without io_uring.
run_pass syscall -p tessera-storage --lib
run_pass syscall -p tessera-store --lib
run_pass syscall -p tessera-server --lib --test crash --test safety --test cluster
# criterion benches run each benchmark once in test mode (they take no
# libtest flags): a smoke test that they still work.
set +e
timeout --kill-after=30s $pass_limit cargo test --workspace --benches --no-fail-fast 2>&1 | tee -a "$log"
bench_status=${PIPESTATUS[0]}
set -e
if [ "$bench_status" -ne 0 ]; then status=$bench_status; fi
# Coverage-guided fuzzing of request validation and WAL recovery, bounded
# (FUZZ_SECONDS each, 60 by default): any crash fails the run.
set +e
scripts/fuzz.sh 2>&1 | tee -a "$log"
fuzz_status=${PIPESTATUS[0]}
set -e
if [ "$fuzz_status" -ne 0 ]; then status=$fuzz_status; fi
# The Kubernetes manifests: rendered, schema-checked, accepted by kubectl.
set +e
deploy/validate.sh 2>&1 | tee -a "$log"
deploy_status=${PIPESTATUS[0]}
set -e
if [ "$deploy_status" -ne 0 ]; then status=$deploy_status; fi
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed (the WAL and shard log tests in both I/O modes)\n", p, f }' "$log"
exit "$status"
