#!/usr/bin/env bash
# etcd's documented one-member put benchmark (etcd's performance guide:
# --conns=100 --clients=1000 put --key-size=8 --sequential-keys
# --total=100000 --val-size=256), run with tessera-bench against a fresh
# etcd and a fresh tessera in turn, REPEAT times each. Prints one line per
# run: server, req/s, p50, p99, and the server's CPU per request; then the
# server's peak RSS.
# Usage: bench/guide-put.sh [key-space-size (default 1, as etcd's)]
# TESSERA_BINS="old/tessera new/tessera" runs each of those binaries in turn
# after etcd (an A/B of two builds in one run) instead of the one built here.
# ROUNDS=N (below) repeats the workload on the same data directory.
# ETCD_BENCHMARK=path/to/benchmark drives the load with etcd's own benchmark
# tool (see bench/build-etcd-benchmark.sh) instead of tessera-bench.
# PIN=1 runs the server on CPU 0 and the load generator on CPU 1, so the two
# do not take CPU from each other (both servers get the same one core).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/prereqs.sh test
. scripts/cache-env.sh
cargo build --release --workspace --bins
bin="${CARGO_TARGET_DIR:-target}/release"
key_space=${1:-1}
repeat=${REPEAT:-3}
# ROUNDS=N runs the workload N times on each server's one data directory
# (one line per round): how the put cost grows with the history.
rounds=${ROUNDS:-1}
total=${TOTAL:-100000}
port=23790
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
ticks_per_sec=$(getconf CLK_TCK)
server_cpus=()
loadgen_cpus=()
if [ "${PIN:-0}" = 1 ]; then
  server_cpus=(taskset -c 0)
  loadgen_cpus=(taskset -c 1)
fi

# One put workload against the server on $port, etcd's report on stdout.
load() {
  if [ -n "${ETCD_BENCHMARK:-}" ]; then
    "${loadgen_cpus[@]}" "$ETCD_BENCHMARK" --endpoints "127.0.0.1:$port" --conns 100 --clients 1000 \
      put --total "$total" --key-size 8 --val-size 256 --sequential-keys \
      --key-space-size "$key_space"
  else
    "${loadgen_cpus[@]}" "$bin/tessera-bench" --endpoints "127.0.0.1:$port" --conns 100 --clients 1000 \
      put --total "$total" --key-size 8 --val-size 256 --sequential-keys \
      --key-space-size "$key_space"
  fi
}

run_once() {
  local server=$1 binary=$2
  rm -rf "$work/data"
  "${server_cpus[@]}" "$binary" --data-dir "$work/data" \
    --listen-client-urls "http://127.0.0.1:$port" --advertise-client-urls "http://127.0.0.1:$port" \
    --listen-peer-urls "http://127.0.0.1:$((port + 10))" >"$work/server.log" 2>&1 &
  local pid=$!
  for _ in $(seq 50); do
    curl -sf "http://127.0.0.1:$port/health" >/dev/null 2>&1 && break
    sleep 0.2
  done
  local round
  for round in $(seq "$rounds"); do
    # utime + stime of the server, in clock ticks, before and after.
    local before after
    before=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    load >"$work/report.txt" 2>/dev/null
    after=$(awk '{print $14 + $15}' "/proc/$pid/stat")
    awk -v s="$server" -v r="$([ "$rounds" -gt 1 ] && echo " round $round")" \
      -v cpu="$(( (after - before) * 1000000 / ticks_per_sec / total ))" '
      /Requests\/sec:/ { rps = $2 }
      /50% in/ { p50 = $3 * 1000 }
      /99% in/ { p99 = $3 * 1000 }
      END { printf "%-8s%s %10.0f req/s  p50 %6.1f ms  p99 %6.1f ms  server CPU %4d us/req\n", s, r, rps, p50, p99, cpu }
    ' "$work/report.txt"
  done
  awk -v s="$server" '/^VmHWM:/ { printf "%-8s peak RSS %.1f MiB\n", s, $2 / 1024 }' "/proc/$pid/status"
  kill "$pid"
  wait "$pid" 2>/dev/null || true
}

echo "put, key space $key_space, $total requests, 1000 clients over 100 connections," \
  "load from ${ETCD_BENCHMARK:-tessera-bench}$([ "${PIN:-0}" = 1 ] && echo ', server on CPU 0, load on CPU 1')"
for _ in $(seq "$repeat"); do
  run_once etcd "$(command -v etcd)"
  for tessera in ${TESSERA_BINS:-$bin/tessera}; do
    run_once "$([ -n "${TESSERA_BINS:-}" ] && echo "$tessera" || echo tessera)" "$tessera"
  done
done
