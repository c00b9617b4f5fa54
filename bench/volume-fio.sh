#!/usr/bin/env bash
# Volume I/O side by side: fio (libaio, direct I/O) on four block devices
# in one run, each built before its jobs and torn down after them:
#   (a) loop   a loop device over a local file: this machine's limit;
#   (b) attach the attach path alone: our FUSE file and loop device over a
#              local file (`tessera-store attach-local`), no store;
#   (c) tessera a Tessera 4+2 volume on six local tessera-store nodes;
#   (d) gluster a GlusterFS dispersed 4+2 volume (Debian's glusterfs-server)
#              in a network namespace of its own (Gluster refuses loopback
#              brick addresses), a loop device over a file on its mount.
# Every device is filled first, so reads read written data. The jobs and
# the report are `fio-volume` (bench/src/fio.rs); the tables go into
# BENCHMARKS.md. Needs root (loop devices, FUSE, namespaces). Leaves no
# mount, loop device, namespace or process behind, also when interrupted.
#
#   bench/volume-fio.sh                              # 15 s a job, 2 GiB devices
#   RUNTIME=5 SIZE=1G DEVICES="loop attach" bench/volume-fio.sh
#   WRITE=0 bench/volume-fio.sh                      # print, leave BENCHMARKS.md
set -euo pipefail
cd "$(dirname "$0")/.."
runtime=${RUNTIME:-15}
size=${SIZE:-2G}
read -r -a devices <<< "${DEVICES:-loop attach tessera gluster}"
if [ "$(id -u)" != 0 ]; then
  echo "volume-fio: needs root (loop devices, FUSE mounts, network namespaces)" >&2
  exit 1
fi
scripts/prereqs.sh test >/dev/null
missing=()
command -v fio >/dev/null || missing+=(fio)
command -v glusterd >/dev/null || missing+=(glusterfs-server)
if [ ${#missing[@]} -gt 0 ]; then
  echo "volume-fio: installing ${missing[*]}" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
. scripts/cache-env.sh
# The data path in release; the control plane (not on the I/O path) in
# the dev profile the tests build anyway.
cargo build -q --release -p tessera-store -p tessera-bench --bins
cargo build -q -p tessera-server --bin tessera
target="${CARGO_TARGET_DIR:-target}"
store="$target/release/tessera-store"
fiov="$target/release/fio-volume"
tessera="$target/debug/tessera"

dir=$(mktemp -d /var/tmp/tessera-fio.XXXXXX)
results="$dir/results"
mkdir -p "$results"
gl_vol="tfio$$"
gl_ns="tfio-gl-$$"
gl_host="tf$$h"
gl_peer="tf$$n"
gl_ip=10.213.7.2

# Per-device state, emptied by each teardown (every teardown is safe to
# run twice, and the EXIT trap runs them all).
loop_dev=""
attach_pid=""
gl_loop=""
. bench/store-cluster.sh

teardown_loop() {
  [ -n "$loop_dev" ] && losetup -d "$loop_dev" 2>/dev/null || true
  loop_dev=""
  rm -f "$dir/loop.img"
}

teardown_attach() {
  if [ -n "$attach_pid" ]; then
    kill -TERM "$attach_pid" 2>/dev/null || true
    wait "$attach_pid" 2>/dev/null || true
  fi
  attach_pid=""
  rm -f "$dir/attach.img"
}

teardown_tessera() {
  stop_store_cluster
  rm -rf "$dir"/n[1-6] "$dir/cp"
}

teardown_gluster() {
  [ -n "$gl_loop" ] && losetup -d "$gl_loop" 2>/dev/null || true
  gl_loop=""
  if mountpoint -q "$dir/gl/mnt" 2>/dev/null; then umount "$dir/gl/mnt" || umount -l "$dir/gl/mnt"; fi
  # Only what this run started: its glusterd (by its own volfile), the
  # bricks and self-heal daemon of its volume, its FUSE client.
  local glusterd
  glusterd=$(pgrep -f -- "glusterd -f $dir/gl/glusterd.vol" || true)
  if [ -n "$glusterd" ]; then
    gluster --mode=script volume stop "$gl_vol" force >/dev/null 2>&1 || true
    gluster --mode=script volume delete "$gl_vol" >/dev/null 2>&1 || true
  fi
  local p
  for p in $glusterd \
    $(pgrep -f -- "--volfile-id $gl_vol\.$gl_ip" || true) \
    $(pgrep -f -- "--volfile-id shd/$gl_vol -" || true) \
    $(pgrep -f -- "--volfile-id=/$gl_vol $dir/gl/mnt" || true); do
    kill "$p" 2>/dev/null || true
    wait_gone "$p" 10
  done
  ip netns del "$gl_ns" 2>/dev/null || true
  ip link del "$gl_host" 2>/dev/null || true
  rm -rf "/var/run/gluster/vols/$gl_vol" "$dir/gl"
}

cleanup() {
  set +e
  trap '' INT TERM # a second Ctrl-C must not cut the cleanup short
  teardown_gluster
  teardown_tessera
  teardown_attach
  teardown_loop
  release_under_dir
  rm -rf "$dir"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

fill() {
  echo "volume-fio: $1: filling $size..." >&2
  fio --name=fill --filename="$2" --ioengine=libaio --direct=1 --rw=write --bs=1M \
    --iodepth=16 --size="$size" --output=/dev/null
}

measure() {
  local label=$1 device=$2
  shift 2
  fill "$label" "$device"
  local pids=()
  for p in "$@"; do pids+=(--pid "$p"); done
  "$fiov" run --label "$label" --device "$device" --results "$results" \
    --runtime "$runtime" --size "$size" "${pids[@]}"
}

run_loop() {
  fallocate -l "$size" "$dir/loop.img"
  loop_dev=$(losetup --find --show --direct-io=on --sector-size 4096 "$dir/loop.img")
  measure loop "$loop_dev"
  teardown_loop
}

run_attach() {
  "$store" attach-local --file "$dir/attach.img" --size "$size" \
    --mountpoint "$dir/attach-mnt" >"$dir/attach.out" 2>"$dir/attach.log" &
  attach_pid=$!
  local dev=""
  for _ in $(seq 100); do
    dev=$(head -1 "$dir/attach.out" 2>/dev/null || true)
    [ -n "$dev" ] && break
    kill -0 "$attach_pid" 2>/dev/null || { cat "$dir/attach.log" >&2; return 1; }
    sleep 0.1
  done
  [ -n "$dev" ] || { echo "volume-fio: attach-local did not start" >&2; return 1; }
  measure attach "$dev" "$attach_pid"
  teardown_attach
}

run_tessera() {
  start_store_cluster 6
  "$store" volume create fio --size "$size" --data-shards 4 --parity-shards 2 >/dev/null
  local dev daemon
  dev=$("$store" volume attach fio --run-dir "$dir/run")
  daemon=$(pgrep -f "attach-daemon fio --run-dir $dir/run" | head -1)
  measure tessera "$dev" "${node_pids[@]}" "$daemon"
  teardown_tessera
}

run_gluster() {
  # The gluster CLI talks to whichever glusterd owns the machine's socket:
  # with another one running, ours would not be the one asked.
  if pgrep -x glusterd >/dev/null; then
    echo "volume-fio: a glusterd is already running here; stop it to measure GlusterFS (skipped)" >&2
    return 0
  fi
  mkdir -p "$dir/gl/wd" "$dir/gl/mnt"
  ip netns add "$gl_ns"
  ip link add "$gl_host" type veth peer name "$gl_peer"
  ip link set "$gl_peer" netns "$gl_ns"
  ip addr add 10.213.7.1/24 dev "$gl_host"
  ip link set "$gl_host" up
  ip netns exec "$gl_ns" ip addr add "$gl_ip/24" dev "$gl_peer"
  ip netns exec "$gl_ns" ip link set "$gl_peer" up
  ip netns exec "$gl_ns" ip link set lo up
  sed "s|/var/lib/glusterd|$dir/gl/wd|" /etc/glusterfs/glusterd.vol >"$dir/gl/glusterd.vol"
  ip netns exec "$gl_ns" glusterd -f "$dir/gl/glusterd.vol" -p "$dir/gl/glusterd.pid" \
    -l "$dir/gl/glusterd.log"
  for _ in $(seq 50); do gluster --mode=script pool list >/dev/null 2>&1 && break; sleep 0.2; done
  local bricks=()
  for i in 1 2 3 4 5 6; do
    mkdir -p "$dir/gl/b$i"
    bricks+=("$gl_ip:$dir/gl/b$i")
  done
  # `force`: six bricks of one server, on the root filesystem.
  gluster --mode=script volume create "$gl_vol" disperse 6 redundancy 2 "${bricks[@]}" force >/dev/null
  gluster --mode=script volume start "$gl_vol" >/dev/null
  mount -t glusterfs -o "log-file=$dir/gl/client.log" "$gl_ip:/$gl_vol" "$dir/gl/mnt"
  truncate -s "$size" "$dir/gl/mnt/disk"
  gl_loop=$(losetup --find --show --direct-io=on --sector-size 4096 "$dir/gl/mnt/disk")
  local pids
  mapfile -t pids < <(pgrep -f -- "--volfile-id $gl_vol\.$gl_ip|--volfile-id=/$gl_vol $dir/gl/mnt")
  measure gluster "$gl_loop" "${pids[@]}"
  teardown_gluster
}

for d in "${devices[@]}"; do
  case $d in
    loop | attach | tessera | gluster) "run_$d" ;;
    *) echo "volume-fio: unknown device $d (loop, attach, tessera, gluster)" >&2; exit 2 ;;
  esac
done

preamble="## Data plane: volume I/O with fio, side by side ($(date -u +%Y-%m-%d))

\`RUNTIME=$runtime SIZE=$size bench/volume-fio.sh\` on this machine (2 cores, one
virtio disk): each device filled, then each job $runtime s after a 2 s warm-up over
its first $size ($(fio --version), libaio, direct I/O). Latencies are completion
latencies; the sync job's are the write's plus its fsync's. Server CPU is
the user + system time of the processes serving the device (the FUSE
process for (b); the six nodes and the attach daemon for (c); the six
bricks and the FUSE client for (d); the kernel's loop and page cache work
is not counted anywhere), per GiB moved.
"
if [ "${WRITE:-1}" = 1 ]; then
  "$fiov" report --results "$results" --preamble "$preamble" --write BENCHMARKS.md
else
  "$fiov" report --results "$results" --preamble "$preamble"
fi
