#!/usr/bin/env bash
# Put latency while a long history is compacted (etcd vs tessera, same run).
# Each server starts fresh and gets HISTORY revisions (default 1,000,000
# puts over 1,000 keys). Then a steady, rate-limited put load (RATE puts/s
# for SECONDS) runs twice: alone (baseline), and with `etcdctl compact` of
# the whole history issued COMPACT_AFTER seconds in. Prints, per server and
# phase, put p50/p99/slowest, how long the Compact request took to be
# answered, and how long the deletion took (both servers log "finished
# scheduled compaction" with it).
# Usage: bench/compaction-put-latency.sh      (HISTORY=, RATE=, SECONDS_=, SERVERS=)
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh test
. scripts/cache-env.sh
export CARGO_INCREMENTAL=0
cargo build --release -p tessera-server --bin tessera -p tessera-bench --bin tessera-bench
bin="${CARGO_TARGET_DIR:-target}/release"
history=${HISTORY:-1000000}
rate=${RATE:-500}
seconds=${SECONDS_:-20}
compact_after=${COMPACT_AFTER:-3}
servers=${SERVERS:-"etcd tessera"}
port=23890
ep="127.0.0.1:$port"
work=$(mktemp -d)
pid=""
load=""
cleanup() {
  trap '' INT TERM
  [ -n "$load" ] && pkill -P "$load" 2>/dev/null; [ -n "$load" ] && kill "$load" 2>/dev/null
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

now() { date +%s.%N; }
since() { echo "$(now) - $1" | bc; }

. bench/single-server.sh

# Rate-limited puts for $seconds; prints "p50 p99 slowest" in ms.
steady_puts() {
  "$bin/tessera-bench" --endpoints "$ep" --conns 4 --clients 16 --output json \
    put --total $((rate * seconds)) --rate "$rate" --key-size 8 --val-size 64 \
    --key-space-size 1000 >"$work/steady.json"
  jq -r '[(.percentiles[] | select(.[0] == 50) | .[1]), (.percentiles[] | select(.[0] == 99) | .[1]), .slowest_secs]
         | map(. * 1000 | . * 100 | round / 100) | "\(.[0]) \(.[1]) \(.[2])"' "$work/steady.json"
}

printf '%-8s %-22s %10s %10s %12s %s\n' server phase "p50 ms" "p99 ms" "slowest ms" notes
for server in $servers; do
  case $server in
    etcd) binary=etcd ;;
    tessera) binary="$bin/tessera" ;;
  esac
  start_server "$server" "$binary" --quota-backend-bytes=$((8 << 30)) --logger=zap
  echo "filling $server with $history revisions..." >&2
  "$bin/tessera-bench" --endpoints "$ep" --conns 16 --clients 64 --output json \
    put --total "$history" --key-size 8 --val-size 64 --key-space-size 1000 >/dev/null
  rev=$(etcdctl --endpoints "$ep" endpoint status -w json | jq '.[0].Status.header.revision')
  read -r p50 p99 slow < <(steady_puts)
  printf '%-8s %-22s %10s %10s %12s %s\n' "$server" "puts alone" "$p50" "$p99" "$slow" "history $rev revisions"
  steady_puts >"$work/during" &
  load=$!
  sleep "$compact_after"
  t0=$(now)
  etcdctl --endpoints "$ep" --command-timeout=600s compact "$rev" >/dev/null
  answered=$(since "$t0")
  wait "$load"
  load=""
  took=""
  for _ in $(seq 600); do
    took=$( (grep -h '"finished scheduled compaction"' "$work/$server.log" || true) | jq -r '.took' | tail -1)
    [ -n "$took" ] && break
    sleep 1
  done
  read -r p50 p99 slow <"$work/during"
  printf '%-8s %-22s %10s %10s %12s %s\n' "$server" "puts while compacting" "$p50" "$p99" "$slow" \
    "$(printf 'compact answered in %.3f s; deletion took %s' "$answered" "${took:-?}")"
  stop_server
done
