#!/usr/bin/env bash
# Snapshot creation time against data written (0, 1, 4 GiB),
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
tessera="$bin/tessera"
store="$bin/tessera-store"
. bench/store-cluster.sh
cleanup() {
  set +e
  trap '' INT TERM
  stop_store_cluster
  release_under_dir
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM
start_store_cluster 6
S() { "$bin/tessera-store" "$@"; }
# Volumes with 0, 1 and 4 GiB written (random data, through the device);
# SIZES="0 1" for a shorter run.
read -r -a sizes <<< "${SIZES:-0 1 4}"
first=${sizes[0]}
last=${sizes[${#sizes[@]}-1]}
for g in "${sizes[@]}"; do
  S volume create "v${g}g" --size 4GiB >/dev/null
  if [ "$g" -gt 0 ]; then
    dev=$(S volume attach "v${g}g" --run-dir "$dir/run")
    echo "writing $g GiB to v${g}g..." >&2
    dd if=/dev/urandom of="$dev" bs=1M count=$((g * 1024)) oflag=direct conv=fsync status=none
    S volume detach "v${g}g" --run-dir "$dir/run"
  fi
done

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
declare -A detached attached
for g in "${sizes[@]}"; do detached[$g]=$(measure "v${g}g" detached); done
for g in "${sizes[@]}"; do S volume attach "v${g}g" --run-dir "$dir/run" >/dev/null; done
for g in "${sizes[@]}"; do attached[$g]=$(measure "v${g}g" attached); done
echo "snapshot create, median of $runs runs, ms ($profile build):"
printf '  %-9s' "written"; for g in "${sizes[@]}"; do printf '%8s' "${g} GiB"; done; echo
printf '  %-9s' detached; for g in "${sizes[@]}"; do printf '%8s' "${detached[$g]}"; done; echo
printf '  %-9s' attached; for g in "${sizes[@]}"; do printf '%8s' "${attached[$g]}"; done; echo
printf '  ratio %s GiB / %s GiB written: detached %s, attached %s\n' "$last" "$first" \
  "$(awk "BEGIN {printf \"%.2f\", ${detached[$last]} / ${detached[$first]}}")" \
  "$(awk "BEGIN {printf \"%.2f\", ${attached[$last]} / ${attached[$first]}}")"
