#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, and integration tests that
# start the real tessera binary next to Debian's etcd and etcdctl.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh test
. scripts/cache-env.sh
cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
# --no-fail-fast: every test binary runs, so the count below is complete.
set +e
cargo test --workspace --all-targets --no-fail-fast -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
# One closing line for the whole run (cargo prints one per test binary).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
