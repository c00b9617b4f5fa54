# Sourced by the scripts: reuse a build cache outside the checkout when the
# machine has one (a warm RocksDB build saves ~15 minutes); works without.
if [ -z "${CARGO_TARGET_DIR:-}" ] && [ -d /var/cache/tessera/target ]; then
  export CARGO_TARGET_DIR=/var/cache/tessera/target
fi
