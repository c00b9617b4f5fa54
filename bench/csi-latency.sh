#!/usr/bin/env bash
# CreateVolume → NodePublishVolume latency, as a pod waits for it: a
# tessera control plane, six tessera-store nodes and `tessera-csi --mode
# all` on loopback; `csi-latency` (bench/src/bin/csi-latency.rs) creates,
# stages and publishes volumes one after the other and takes each down.
# Needs root (loop devices, FUSE, mounts); leaves nothing behind, also
# when interrupted.
#
#   bench/csi-latency.sh [runs]        # default 10 runs, 1 GiB ext4
#   FS=xfs bench/csi-latency.sh 5
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-10}
if [ "$(id -u)" != 0 ]; then
  echo "csi-latency: needs root (loop devices, FUSE, mounts)" >&2
  exit 1
fi
scripts/prereqs.sh test >/dev/null
. scripts/cache-env.sh
cargo build -q --release -p tessera-store -p tessera-csi -p tessera-bench --bins
cargo build -q -p tessera-server --bin tessera
target="${CARGO_TARGET_DIR:-target}"
store="$target/release/tessera-store"
tessera="$target/debug/tessera"
dir=$(mktemp -d /var/tmp/tessera-csi-latency.XXXXXX)
. bench/store-cluster.sh
csi_pid=""
cleanup() {
  set +e
  trap '' INT TERM # a second Ctrl-C must not cut the cleanup short
  [ -n "$csi_pid" ] && { kill "$csi_pid" && wait "$csi_pid"; } 2>/dev/null
  release_under_dir
  stop_store_cluster
  release_under_dir
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start_store_cluster 6
mkdir -p "$dir/managed"
"$target/release/tessera-csi" --endpoint "unix://$dir/csi.sock" --node-id bench --mode all \
  --endpoints "$TESSERA_ENDPOINTS" --run-dir "$dir/run" --managed-dir "$dir/managed" \
  --store-binary "$store" >"$dir/csi.log" 2>&1 &
csi_pid=$!
for _ in $(seq 100); do [ -S "$dir/csi.sock" ] && break; sleep 0.1; done
"$target/release/csi-latency" --socket "$dir/csi.sock" --managed-dir "$dir/managed" \
  --runs "$runs" --fs-type "${FS:-ext4}"
