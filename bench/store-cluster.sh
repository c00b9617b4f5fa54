# Sourced by the data-plane benchmarks: one tessera control plane and
# tessera-store nodes on loopback, under "$dir", and the cleanup of
# whatever an interrupted run left there.
#
# Needs: $dir, and $tessera / $store (the binaries).
# Sets:  TESSERA_ENDPOINTS (exported), cp_pid, node_pids, node_port.

cp_pid=""
node_pids=()

# start_store_cluster NODES [extra `tessera-store serve` flags...]
start_store_cluster() {
  local nodes=$1
  shift
  local port=$((23000 + RANDOM % 2000))
  node_port=$((port + 10))
  export TESSERA_ENDPOINTS="http://127.0.0.1:$port"
  "$tessera" --name cp --data-dir "$dir/cp" --listen-client-urls "$TESSERA_ENDPOINTS" \
    --advertise-client-urls "$TESSERA_ENDPOINTS" --listen-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-advertise-peer-urls "http://127.0.0.1:$((port + 1))" \
    --initial-cluster "cp=http://127.0.0.1:$((port + 1))" >"$dir/cp.log" 2>&1 &
  cp_pid=$!
  # Nodes give up on a control plane that is not answering yet.
  for _ in $(seq 150); do
    "$store" node list >/dev/null 2>&1 && break
    sleep 0.2
  done
  for i in $(seq 1 "$nodes"); do start_store_node "$i" "$@"; done
  for _ in $(seq 150); do
    [ "$(alive_nodes)" -ge "$nodes" ] && return 0
    sleep 0.2
  done
  echo "store-cluster: $nodes nodes did not come up; see $dir/*.log" >&2
  return 1
}

# start_store_node I [extra flags...]: node nI (again, after a kill).
start_store_node() {
  local i=$1
  shift
  "$store" serve --name "n$i" --data-dir "$dir/n$i" --listen "127.0.0.1:$((node_port + i))" \
    --zone "z$((i % 3))" "$@" >>"$dir/n$i.log" 2>&1 &
  node_pids[$i]=$!
}

alive_nodes() {
  "$store" node list -o json 2>/dev/null | grep -c '"alive": true' || true
}

# Waits (up to $2 s) until process $1 is gone or a zombie (nothing here
# reaps daemons that were reparented to PID 1).
wait_gone() {
  local i
  for i in $(seq $(($2 * 10))); do
    local state
    state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null || true)
    [ -z "$state" ] || [ "$state" = Z ] && return 0
    sleep 0.1
  done
  return 0
}

stop_store_cluster() {
  for v in "$dir"/run/*/; do
    if [ -f "$v/state.json" ]; then
      "$store" volume detach "$(basename "$v")" --run-dir "$dir/run" >/dev/null 2>&1 || true
    fi
  done
  # Attach daemons still starting (no state yet) run in sessions of their
  # own, so an interrupt never reached them: stopped here, while the nodes
  # they flush to are still up.
  local daemon
  for daemon in $(pgrep -f -- "attach-daemon .* --run-dir $dir/run" || true); do
    kill -TERM "$daemon" 2>/dev/null || true
    wait_gone "$daemon" 30
  done
  for p in "${node_pids[@]}" $cp_pid; do { kill -9 "$p" && wait "$p"; } 2>/dev/null || true; done
  node_pids=()
  cp_pid=""
  return 0
}

# Loop devices backed by files under $dir, then mounts under it (deepest
# first): what an interrupted step may have left.
release_under_dir() {
  losetup -l -n -O NAME,BACK-FILE 2>/dev/null | awk -v d="$dir/" 'index($2, d) == 1 {print $1}' |
    while read -r dev; do losetup -d "$dev"; done
  awk -v d="$dir/" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r |
    while read -r m; do umount "$m" 2>/dev/null || umount -l "$m"; done
  return 0
}
