//! `tessera-storage`: the disk-facing pieces shared by both planes: the
//! write-ahead log that holds the Raft log ([`wal`], whose I/O backend the
//! storage nodes' shard log uses too), fault-injection points for tests
//! ([`failpoint`]) and the latency histograms both planes expose on
//! `/metrics` ([`histogram`]). The data plane itself (shard log, codec, nodes, volume
//! client) is the `tessera-store` crate in `storage/store`.

pub mod failpoint;
pub mod histogram;
pub mod wal;
