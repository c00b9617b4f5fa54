#!/usr/bin/env bash
# Builds tessera and the bench tools in release mode, then runs tessera and
# Debian's etcd side by side (1 and 3 members) and rewrites the generated
# section of BENCHMARKS.md. Extra arguments go to bench-compare, e.g.
#   bench/compare.sh --total 20000 --rss-keys 100000
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh test
. scripts/cache-env.sh
cargo build --release --workspace --bins
target="${CARGO_TARGET_DIR:-target}/release"
"$target/bench-compare" --tessera "$target/tessera" --write BENCHMARKS.md "$@"
