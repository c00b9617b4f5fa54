# Sourced by the benchmark scripts that compare one fresh single-member
# server at a time: `start_server NAME BINARY [FLAG...]` starts BINARY (etcd
# or tessera) on a new data directory `$work/data`, client URL `$ep`, peer
# port `$port + 10`, its output in `$work/NAME.log`, and waits for /health;
# `stop_server` stops it. Expects `work`, `ep` and `port` set; sets `pid`.

start_server() {
  local name=$1 binary=$2
  shift 2
  rm -rf "$work/data"
  "$binary" --data-dir "$work/data" --listen-client-urls "http://$ep" \
    --advertise-client-urls "http://$ep" --listen-peer-urls "http://127.0.0.1:$((port + 10))" \
    "$@" >"$work/$name.log" 2>&1 &
  pid=$!
  for _ in $(seq 100); do
    curl -sf "http://$ep/health" >/dev/null 2>&1 && return
    sleep 0.1
  done
  echo "$name did not start" >&2
  exit 1
}

stop_server() {
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  pid=""
}
