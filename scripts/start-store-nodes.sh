#!/usr/bin/env bash
# Starts N (default 6) tessera-store nodes on loopback, in three zones,
# with their data under ./store-nodes/<name> and logs next to it, against
# the control plane at $TESSERA_ENDPOINTS (default http://127.0.0.1:2379,
# where scripts/start.sh serves). Builds tessera-store first. Stop them
# with: pkill -f 'tessera-store serve'
set -euo pipefail
cd "$(dirname "$0")/.."
n=${1:-6}
scripts/prereqs.sh build
. scripts/cache-env.sh
cargo build --release -p tessera-store --bin tessera-store
bin="${CARGO_TARGET_DIR:-target}/release/tessera-store"
export TESSERA_ENDPOINTS=${TESSERA_ENDPOINTS:-http://127.0.0.1:2379}
mkdir -p store-nodes
for i in $(seq 1 "$n"); do
  name="node$i"
  "$bin" serve --name "$name" --data-dir "store-nodes/$name" \
    --listen "127.0.0.1:$((7100 + i))" --metrics-listen "127.0.0.1:$((7200 + i))" \
    --zone "zone$(( (i - 1) % 3 + 1 ))" >"store-nodes/$name.log" 2>&1 &
  echo "started $name on 127.0.0.1:$((7100 + i)) (log: store-nodes/$name.log)"
done
sleep 1
"$bin" node list
