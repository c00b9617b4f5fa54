#!/usr/bin/env bash
# Self-healing and memory, as users ask about them: a full 1 GiB 4+2
# volume on seven nodes; one node SIGKILLed; how long until full
# redundancy is back (from the kill, and from the moment repair may start:
# the node's liveness lease is 10 s and --repair-delay follows), then proof
# that it is back (two more nodes killed, the volume still reads back
# byte for byte). Along the way: the attach daemon's RSS (idle, after
# writing 1 GiB, after reading it) and the nodes'. Needs root (loop
# devices, FUSE); leaves nothing behind, also when interrupted.
#
#   bench/store-repair-time.sh
#   BANDWIDTH=0 bench/store-repair-time.sh     # --repair-bandwidth (default 64MiB)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ "$(id -u)" != 0 ]; then
  echo "store-repair-time: needs root (loop devices, FUSE mounts)" >&2
  exit 1
fi
bandwidth=${BANDWIDTH:-64MiB}
delay=${DELAY:-1s}
scripts/prereqs.sh test >/dev/null
. scripts/cache-env.sh
cargo build -q --release -p tessera-store --bins
cargo build -q -p tessera-server --bin tessera
target="${CARGO_TARGET_DIR:-target}"
store="$target/release/tessera-store"
tessera="$target/debug/tessera"
dir=$(mktemp -d /var/tmp/tessera-repair.XXXXXX)
. bench/store-cluster.sh
cleanup() {
  set +e
  trap '' INT TERM # a second Ctrl-C must not cut the cleanup short
  stop_store_cluster
  release_under_dir
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

rss_mib() { awk '/^VmRSS/ {printf "%.0f", $2 / 1024}' "/proc/$1/status"; }
now() { date +%s.%N; }
S() { "$store" "$@"; }

start_store_cluster 7 --repair-delay "$delay" --repair-bandwidth "$bandwidth"
S volume create r --size 1GiB --data-shards 4 --parity-shards 2 >/dev/null
dev=$(S volume attach r --run-dir "$dir/run")
daemon=$(pgrep -f "attach-daemon r --run-dir $dir/run" | head -1)
idle_rss=$(rss_mib "$daemon")
echo "store-repair-time: writing 1 GiB of random data..." >&2
head -c 1G /dev/urandom >"$dir/data"
dd if="$dir/data" of="$dev" bs=1M oflag=direct conv=fsync status=none
written_rss=$(rss_mib "$daemon")
dd if="$dev" of=/dev/null bs=1M iflag=direct status=none
read_rss=$(rss_mib "$daemon")
node_rss=()
for i in 1 2 3 4 5 6 7; do node_rss+=("$(rss_mib "${node_pids[$i]}")"); done
S node list >&2
S volume detach r --run-dir "$dir/run"
used=$(du -smc "$dir"/n[1-7] | awk 'END {print $1}')
lost=$(du -sm "$dir/n7" | awk '{print $1}')

echo "store-repair-time: SIGKILL n7" >&2
t_kill=$(now)
kill -9 "${node_pids[7]}"
wait "${node_pids[7]}" 2>/dev/null || true
t_dead="" t_repairing="" t_done=""
while :; do
  status=$(S repair status -o json 2>/dev/null || true)
  state=$(printf '%s' "$status" | grep -o '"state": "[a-z]*"' | cut -d'"' -f4 || true)
  t=$(now)
  [ -z "$t_dead" ] && [ -n "$state" ] && [ "$state" != healthy ] && t_dead=$t
  [ -z "$t_repairing" ] && [ "$state" = repairing ] && t_repairing=$t
  if [ -n "$t_dead" ] && [ "$state" = healthy ]; then t_done=$t; break; fi
  if awk -v a="$t" -v b="$t_kill" 'BEGIN {exit !(a - b > 300)}'; then
    echo "store-repair-time: not healthy 300 s after the kill: $status" >&2
    exit 1
  fi
  sleep 0.1
done
# Redundancy is back if the volume survives losing two more nodes.
kill -9 "${node_pids[5]}" "${node_pids[6]}"
dev=$(S volume attach r --run-dir "$dir/run")
cmp "$dir/data" "$dev" || { echo "store-repair-time: the data differs after repair" >&2; exit 1; }
S volume detach r --run-dir "$dir/run"

secs() { awk -v a="$1" -v b="$2" 'BEGIN {printf "%.1f", b - a}'; }
start=${t_repairing:-$t_dead}
cat <<EOF
| measure | value |
|---|---|
| shard data on the seven nodes (1 GiB volume, 4+2) / on n7, the node lost | $used / $lost MiB |
| node seen dead after the SIGKILL (liveness lease 10 s) | $(secs "$t_kill" "$t_dead") s |
| full redundancy back, from the first repair status showing it in repair ($([ -n "$t_repairing" ] && echo "repairing" || echo "degraded, repair never seen running")) | $(secs "$start" "$t_done") s |
| full redundancy back, from the SIGKILL (--repair-delay $delay, --repair-bandwidth $bandwidth) | $(secs "$t_kill" "$t_done") s |
| then n5 and n6 killed too: the volume reads back | identical (cmp) |
| attach daemon RSS: idle / after writing 1 GiB / after reading it | $idle_rss / $written_rss / $read_rss MiB |
| node RSS after the write (n1..n7) | ${node_rss[*]} MiB |
EOF
