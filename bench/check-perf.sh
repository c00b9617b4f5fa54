#!/usr/bin/env bash
# `etcdctl check perf` against etcd and tessera, side by side in one run.
# For each load (s, m, l by default) and each of RUNS rounds, each server is
# started fresh (single member, its own new data directory, same flags), gets
# one `etcdctl check perf --load=X` (60 s of rate-limited puts from etcdctl
# itself), and is stopped. The two servers alternate within a round so a
# disturbance of the machine hits both alike. Prints one line per run (verdict,
# throughput, slowest request, stddev) and then a summary per load and server
# (passes out of runs, worst slowest, worst stddev) as a Markdown table.
# Usage: bench/check-perf.sh          (RUNS=10 LOADS="s m l" SERVERS="etcd tessera")
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh test
. scripts/cache-env.sh
export CARGO_INCREMENTAL=0
cargo build --release -p tessera-server --bin tessera
bin="${CARGO_TARGET_DIR:-target}/release"
runs=${RUNS:-10}
loads=${LOADS:-"s m l"}
servers=${SERVERS:-"etcd tessera"}
port=23990
ep="127.0.0.1:$port"
work=$(mktemp -d)
pid=""
cleanup() {
  trap '' INT TERM
  [ -n "$pid" ] && kill "$pid" 2>/dev/null && wait "$pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

. bench/single-server.sh

# One check perf run; prints "verdict throughput slowest_s stddev_s".
check_perf() {
  local out
  out=$(etcdctl --endpoints "$ep" check perf --load="$1" 2>&1 | tr '\r' '\n' || true)
  local verdict throughput slowest stddev
  verdict=$(echo "$out" | grep -E '^(PASS|FAIL)$' | tail -1)
  # etcdctl words its lines differently on failure ("Throughput too low: N
  # writes/s", "Slowest request took too long: Xs", "Stddev too high: Xs").
  throughput=$(echo "$out" | sed -nE 's/.*Throughput (is|too low:) ([0-9.]+) writes\/s.*/\2/p' | tail -1)
  slowest=$(echo "$out" | sed -nE 's/.*Slowest request took (too long: )?([0-9.]+)s.*/\2/p' | tail -1)
  stddev=$(echo "$out" | sed -nE 's/.*Stddev (is|too high:) ([0-9.]+)s.*/\2/p' | tail -1)
  echo "${verdict:-ERROR} ${throughput:-?} ${slowest:-?} ${stddev:-?}"
}

results="$work/results"
: >"$results"
printf '%-5s %-4s %-8s %-7s %12s %12s %10s\n' load run server verdict "writes/s" "slowest s" "stddev s"
for load in $loads; do
  for run in $(seq "$runs"); do
    for server in $servers; do
      case $server in
        etcd) binary=etcd ;;
        tessera) binary="$bin/tessera" ;;
      esac
      start_server "$server" "$binary"
      read -r verdict throughput slowest stddev < <(check_perf "$load")
      stop_server
      printf '%-5s %-4s %-8s %-7s %12s %12s %10s\n' "$load" "$run" "$server" "$verdict" "$throughput" "$slowest" "$stddev"
      echo "$load $server $verdict $slowest $stddev" >>"$results"
    done
  done
done

echo
echo "| load | server | passed | worst slowest request (s) | worst stddev (s) |"
echo "|------|--------|--------|---------------------------|------------------|"
for load in $loads; do
  for server in $servers; do
    awk -v l="$load" -v s="$server" '
      $1 == l && $2 == s { n++; if ($3 == "PASS") p++; if ($4 + 0 > ws) ws = $4 + 0; if ($5 + 0 > wd) wd = $5 + 0 }
      END { printf "| %s | %s | %d/%d | %.4f | %.4f |\n", l, s, p, n, ws, wd }' "$results"
  done
done
