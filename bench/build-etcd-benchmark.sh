#!/usr/bin/env bash
# Builds etcd's own load generator, `benchmark` (etcd's tools/benchmark), so
# the comparisons can be driven by the tool users measure etcd with.
# Debian's golang-etcd-server-dev ships etcd 3.4's Go sources and their
# dependencies, but not tools/; this compiles tools/benchmark from an etcd
# source tree against them (GOPATH mode, no network).
# Usage: bench/build-etcd-benchmark.sh ETCD_SOURCE_DIR [OUTPUT]
#   ETCD_SOURCE_DIR: an etcd checkout at Debian's version (v3.4.23)
#   OUTPUT: where the binary goes (default /usr/local/bin/benchmark, on PATH,
#           where bench-compare looks for it)
set -euo pipefail
src=${1:?usage: $0 ETCD_SOURCE_DIR [OUTPUT]}
out=${2:-/usr/local/bin/benchmark}
[ -d "$src/tools/benchmark" ] || { echo "no tools/benchmark in $src" >&2; exit 2; }
if ! command -v go >/dev/null || [ ! -d /usr/share/gocode/src/go.etcd.io/etcd ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q golang-go golang-etcd-server-dev
fi
gopath=$(mktemp -d)
trap 'rm -rf "$gopath"' EXIT
mkdir -p "$gopath/src/go.etcd.io/etcd/tools"
cp -r "$src/tools/benchmark" "$gopath/src/go.etcd.io/etcd/tools/"
out=$(realpath -m "$out")
(cd "$gopath/src/go.etcd.io/etcd/tools/benchmark" &&
  GO111MODULE=off GOPATH="$gopath:/usr/share/gocode" go build -o "$out" .)
echo "built $out"
