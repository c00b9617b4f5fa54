#!/usr/bin/env bash
# Runs every test of the workspace: unit tests, and integration tests that
# start the real tessera binary next to Debian's etcd and etcdctl.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh test
. scripts/cache-env.sh
cargo build --workspace --all-targets
cargo test --workspace -- --test-threads=2
