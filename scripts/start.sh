#!/usr/bin/env bash
# Starts a single-member tessera on 127.0.0.1:2379 with the default data
# directory (./default.etcd), building it first. Extra arguments are passed on.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh build
. scripts/cache-env.sh
cargo build --release -p tessera-server --bin tessera
bin="${CARGO_TARGET_DIR:-target}/release/tessera"
exec "$bin" --listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 "$@"
