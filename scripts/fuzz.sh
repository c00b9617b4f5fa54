#!/usr/bin/env bash
# Runs each coverage-guided fuzz target (chaos/fuzz, cargo-fuzz on libFuzzer)
# for a bounded time, FUZZ_SECONDS (default 60) each; fails on the first
# crash, leaving the input that caused it under chaos/fuzz/artifacts/.
# Installs cargo-fuzz when missing. Runs on stable Rust: --sanitizer none
# keeps libFuzzer's coverage guidance and drops the nightly-only sanitizers.
set -euo pipefail
cd "$(dirname "$0")/.."
secs=${FUZZ_SECONDS:-60}
if ! command -v cargo-fuzz >/dev/null 2>&1; then
  echo "installing cargo-fuzz" >&2
  cargo install cargo-fuzz --locked --version 0.13.2 --quiet
fi
# Instrumented builds go in their own target dir (outside the checkout when
# the machine has the shared cache).
target_dir=chaos/fuzz/target
if [ -d /var/cache/tessera ]; then target_dir=/var/cache/tessera/fuzz-target; fi
for t in request_validation wal_recovery; do
  echo "=== fuzz $t for ${secs}s ==="
  mkdir -p "chaos/fuzz/corpus/$t"
  log=$(mktemp)
  set +e
  cargo fuzz run --fuzz-dir chaos/fuzz --sanitizer none --target-dir "$target_dir" "$t" \
    "chaos/fuzz/corpus/$t" -- -max_total_time="$secs" -rss_limit_mb=2048 -print_final_stats=1 >"$log" 2>&1
  status=$?
  set -e
  grep -E "^#[0-9]+ +DONE|^stat::number_of_executed_units" "$log" || true
  if [ "$status" -ne 0 ]; then
    tail -n 60 "$log" >&2
    rm -f "$log"
    echo "fuzz: $t failed (exit $status); the input is under chaos/fuzz/artifacts/$t" >&2
    exit "$status"
  fi
  rm -f "$log"
  echo "fuzz: $t ran ${secs}s without a crash"
done
