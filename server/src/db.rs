//! Opening the RocksDB instance that holds the applied state.
//!
//! One database, several column families, so a single `WriteBatch` can update
//! MVCC data and the applied index atomically.

use std::path::Path;
use std::sync::Arc;

use rocksdb::{BlockBasedOptions, ColumnFamilyDescriptor, Options, DB};

/// MVCC history: see [`crate::mvcc::encoding`].
pub const CF_KV: &str = "kv";
/// Revision index of the MVCC history: `main ‖ sub → tag ‖ user key`, so
/// watchers can replay events in revision order.
pub const CF_REV: &str = "rev";
/// Store-wide metadata: revisions, applied log id, membership, alarms, identity.
pub const CF_META: &str = "meta";
/// Leases (empty until the lease service lands; puts with a lease look here).
pub const CF_LEASE: &str = "lease";
/// Users, roles and the auth switch: see [`crate::auth::store`].
pub const CF_AUTH: &str = "auth";
/// This member's identity (member and cluster ids). The Raft log, vote and
/// commit index live in the WAL (`tessera_storage::wal`), not here.
pub const CF_RAFT_STATE: &str = "raft_state";
/// Each live key's current version: see [`crate::mvcc::latest`]. Derived from
/// `kv`, so not part of snapshots.
pub const CF_LATEST: &str = "latest";

/// Column families that make up the state machine (what snapshots carry).
/// (New families go at the end: a snapshot names them by position.)
pub const STATE_MACHINE_CFS: [&str; 5] = [CF_KV, CF_META, CF_LEASE, CF_REV, CF_AUTH];

const ALL_CFS: [&str; 7] = [
    CF_KV,
    CF_META,
    CF_LEASE,
    CF_REV,
    CF_AUTH,
    CF_RAFT_STATE,
    CF_LATEST,
];

/// Opens (creating if needed) the database under `dir`.
pub fn open(dir: &Path) -> Result<Arc<DB>, rocksdb::Error> {
    let mut opts = Options::default();
    opts.create_if_missing(true);
    opts.create_missing_column_families(true);
    opts.set_max_background_jobs(2);
    // Writes to the state machine are not synced individually: the Raft log
    // (synced) is the source of truth and RocksDB's WAL recovers a consistent
    // prefix after a process crash; on restart, entries after the persisted
    // applied index are applied again. The WAL is buffered in memory and
    // written once per applied batch of entries (`Store::flush_wal`) rather
    // than with a write syscall per request; synced writes still flush it.
    opts.set_manual_wal_flush(true);
    let cfs = ALL_CFS.iter().map(|name| {
        let mut cf_opts = Options::default();
        cf_opts.set_write_buffer_size(32 << 20);
        if *name == CF_KV || *name == CF_LATEST {
            // Puts look up exact keys here (a key's current version, then
            // that version's value): whole-key bloom filters let the lookup
            // skip every file that does not hold the key.
            let mut table = BlockBasedOptions::default();
            table.set_bloom_filter(10.0, false);
            cf_opts.set_block_based_table_factory(&table);
        }
        if *name == CF_LATEST {
            // Small entries (about 50 bytes a key): a smaller memtable keeps
            // the index from adding a full memtable's worth of memory.
            cf_opts.set_write_buffer_size(8 << 20);
        }
        ColumnFamilyDescriptor::new(*name, cf_opts)
    });
    let db = DB::open_cf_descriptors(&opts, dir, cfs)?;
    Ok(Arc::new(db))
}

/// Adds the deletion of every entry of `cf` to `batch`, so that emptying a
/// family commits atomically with whatever else the batch writes.
pub fn delete_all_into(
    db: &DB,
    cf: &rocksdb::ColumnFamily,
    batch: &mut rocksdb::WriteBatch,
) -> Result<(), rocksdb::Error> {
    let mut it = db.raw_iterator_cf(cf);
    it.seek_to_first();
    while let Some(k) = it.key() {
        batch.delete_cf(cf, k);
        it.next();
    }
    it.status()
}

/// Bytes the database occupies on disk: SST files plus memtables.
pub fn total_size(db: &DB) -> u64 {
    sum_property(db, "rocksdb.total-sst-files-size")
        + sum_property(db, "rocksdb.cur-size-all-mem-tables")
}

/// Estimated bytes of live data (what survives a full compaction).
pub fn live_size(db: &DB) -> u64 {
    sum_property(db, "rocksdb.estimate-live-data-size")
        + sum_property(db, "rocksdb.cur-size-all-mem-tables")
}

fn sum_property(db: &DB, name: &str) -> u64 {
    ALL_CFS
        .iter()
        .filter_map(|cf| db.cf_handle(cf))
        .filter_map(|h| db.property_int_value_cf(h, name).ok().flatten())
        .sum()
}
