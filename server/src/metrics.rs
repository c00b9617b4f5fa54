//! Prometheus metrics, under etcd's metric names where etcd has one.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};

use tessera_storage::histogram::Histogram;
use tessera_storage::wal::WalStats;

#[derive(Default)]
pub struct Metrics {
    pub puts: AtomicU64,
    pub deletes: AtomicU64,
    pub txns: AtomicU64,
    pub ranges: AtomicU64,
    pub proposals_applied: AtomicU64,
    pub proposals_failed: AtomicU64,
    pub proposals_pending: AtomicU64,
    pub leader_changes: AtomicU64,
    /// Committed commands skipped because they did not decode (a bug).
    pub undecodable_commands: AtomicU64,
}

/// Point-in-time values owned elsewhere, gathered when `/metrics` is scraped.
pub struct Gauges {
    pub has_leader: bool,
    pub is_leader: bool,
    pub committed_index: u64,
    pub db_size: u64,
    pub db_size_in_use: u64,
    pub quota_bytes: Option<u64>,
    pub current_revision: i64,
    pub compact_revision: i64,
}

/// The disk's metrics, owned by the WAL and the backend.
pub struct Disk<'a> {
    pub wal: &'a WalStats,
    pub backend_commit: &'a Histogram,
}

impl Metrics {
    pub fn inc(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    pub fn render(&self, g: &Gauges, disk: &Disk) -> String {
        let mut out = String::new();
        let mut metric = |name: &str, kind: &str, help: &str, value: String| {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}"
            );
        };
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed).to_string();
        metric(
            "etcd_server_has_leader",
            "gauge",
            "Whether or not a leader exists. 1 is existence, 0 is not.",
            u8::from(g.has_leader).to_string(),
        );
        metric(
            "etcd_server_is_leader",
            "gauge",
            "Whether or not this member is a leader. 1 if is, 0 otherwise.",
            u8::from(g.is_leader).to_string(),
        );
        metric(
            "etcd_server_leader_changes_seen_total",
            "counter",
            "The number of leader changes seen.",
            get(&self.leader_changes),
        );
        metric(
            "etcd_server_proposals_committed_total",
            "gauge",
            "The total number of consensus proposals committed.",
            g.committed_index.to_string(),
        );
        metric(
            "etcd_server_proposals_applied_total",
            "gauge",
            "The total number of consensus proposals applied.",
            get(&self.proposals_applied),
        );
        metric(
            "etcd_server_proposals_pending",
            "gauge",
            "The current number of pending proposals to commit.",
            get(&self.proposals_pending),
        );
        metric(
            "etcd_server_proposals_failed_total",
            "counter",
            "The total number of failed proposals seen.",
            get(&self.proposals_failed),
        );
        metric(
            "tessera_server_undecodable_commands_total",
            "counter",
            "Committed commands skipped on apply because they could not be decoded (a bug; the same on every member).",
            get(&self.undecodable_commands),
        );
        metric(
            "etcd_mvcc_db_total_size_in_bytes",
            "gauge",
            "Total size of the underlying database physically allocated in bytes.",
            g.db_size.to_string(),
        );
        metric(
            "etcd_mvcc_db_total_size_in_use_in_bytes",
            "gauge",
            "Total size of the underlying database logically in use in bytes.",
            g.db_size_in_use.to_string(),
        );
        metric(
            "etcd_server_quota_backend_bytes",
            "gauge",
            "Current backend storage quota size in bytes.",
            g.quota_bytes.map_or(-1, |q| q as i64).to_string(),
        );
        metric(
            "etcd_mvcc_put_total",
            "counter",
            "Total number of puts seen by this member.",
            get(&self.puts),
        );
        metric(
            "etcd_mvcc_delete_total",
            "counter",
            "Total number of deletes seen by this member.",
            get(&self.deletes),
        );
        metric(
            "etcd_mvcc_txn_total",
            "counter",
            "Total number of txns seen by this member.",
            get(&self.txns),
        );
        metric(
            "etcd_mvcc_range_total",
            "counter",
            "Total number of ranges seen by this member.",
            get(&self.ranges),
        );
        metric(
            "etcd_debugging_mvcc_current_revision",
            "gauge",
            "The current revision of store.",
            g.current_revision.to_string(),
        );
        metric(
            "etcd_debugging_mvcc_compact_revision",
            "gauge",
            "The revision of the last compaction in store.",
            g.compact_revision.to_string(),
        );
        metric(
            "etcd_disk_wal_write_bytes_total",
            "gauge",
            "Total number of bytes written in WAL.",
            get(&disk.wal.bytes),
        );
        let _ = writeln!(
            out,
            "# HELP etcd_server_version Which version is running. 1 for 'server_version' label with current version.\n# TYPE etcd_server_version gauge\netcd_server_version{{server_version=\"{}\"}} 1",
            crate::config::ETCD_VERSION
        );
        disk.wal.sync_seconds.render(
            &mut out,
            "etcd_disk_wal_fsync_duration_seconds",
            "The latency distributions of fsync called by WAL.",
        );
        disk.backend_commit.render(
            &mut out,
            "etcd_disk_backend_commit_duration_seconds",
            "The latency distributions of commit called by backend.",
        );
        crate::process_metrics::render(&mut out);
        out
    }
}
