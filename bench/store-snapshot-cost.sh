#!/usr/bin/env bash
# Snapshot creation time: an empty volume against one with 1 GiB written,
# attached (the writer takes its last flush point) and detached (one
# control-plane transaction), side by side in one run. Starts its own
# control plane and six storage nodes on loopback, in a temporary
# directory. Needs root (loop devices, FUSE).
#
#   bench/store-snapshot-cost.sh [runs]     # default 5 runs of each
#   PROFILE=debug bench/store-snapshot-cost.sh   # use the dev-profile build
set -euo pipefail
cd "$(dirname "$0")/.."
runs=${1:-5}
profile=${PROFILE:-release}
scripts/prereqs.sh build >/dev/null
. scripts/cache-env.sh
if [ "$profile" = release ]; then
  cargo build -q --release -p tessera-server -p tessera-store --bins
else
  cargo build -q -p tessera-server -p tessera-store --bins
fi
bin="${CARGO_TARGET_DIR:-target}/$profile"
dir=$(mktemp -d)
pids=()
cleanup() {
  for v in empty full; do "$bin/tessera-store" volume detach "$v" --run-dir "$dir/run" >/dev/null 2>&1 || true; done
  for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  rm -rf "$dir"
}
trap cleanup EXIT
port=$((23000 + RANDOM % 2000))
export TESSERA_ENDPOINTS="http://127.0.0.1:$port"
"$bin/tessera" --name cp --data-dir "$dir/cp" --listen-client-urls "$TESSERA_ENDPOINTS" \
  --advertise-client-urls "$TESSERA_ENDPOINTS" --listen-peer-urls "http://127.0.0.1:$((port + 1))" \
  --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
  --initial-cluster "cp=http://127.0.0.1:$((port + 1))" >"$dir/cp.log" 2>&1 &
pids+=($!)
sleep 1
for i in 1 2 3 4 5 6; do
  "$bin/tessera-store" serve --name "n$i" --data-dir "$dir/n$i" \
    --listen "127.0.0.1:$((port + 10 + i))" --zone "z$((i % 3))" >"$dir/n$i.log" 2>&1 &
  pids+=($!)
done
sleep 2
S() { "$bin/tessera-store" "$@"; }
S volume create empty --size 1GiB >/dev/null
S volume create full --size 1GiB >/dev/null
dev=$(S volume attach full --run-dir "$dir/run")
echo "writing 1 GiB to the full volume..." >&2
dd if=/dev/urandom of="$dir/data" bs=1M count=1024 status=none
dd if="$dir/data" of="$dev" bs=1M oflag=direct conv=fsync status=none
rm -f "$dir/data"
S volume detach full --run-dir "$dir/run"

# Median of the wall times of `snapshot create` over $runs runs, ms.
measure() {
  local volume=$1 tag=$2 times=()
  for r in $(seq 1 "$runs"); do
    local start end
    start=$(date +%s%N)
    S snapshot create "$volume" "$volume-$tag-$r" >/dev/null
    end=$(date +%s%N)
    times+=($(( (end - start) / 1000000 )))
  done
  printf '%s\n' "${times[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
detached_empty=$(measure empty detached)
detached_full=$(measure full detached)
S volume attach empty --run-dir "$dir/run" >/dev/null
S volume attach full --run-dir "$dir/run" >/dev/null
attached_empty=$(measure empty attached)
attached_full=$(measure full attached)
echo "snapshot create, median of $runs runs ($profile build):"
printf '  %-10s empty %5s ms   1 GiB written %5s ms   ratio %s\n' \
  detached "$detached_empty" "$detached_full" "$(awk "BEGIN {printf \"%.2f\", $detached_full / $detached_empty}")" \
  attached "$attached_empty" "$attached_full" "$(awk "BEGIN {printf \"%.2f\", $attached_full / $attached_empty}")"
