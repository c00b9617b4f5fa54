//! `tessera-storage`: the disk-facing pieces shared by both planes: the
//! write-ahead log that holds the Raft log ([`wal`], whose I/O backend the
//! storage nodes' shard log uses too) and fault-injection points for tests
//! ([`failpoint`]). The data plane itself (shard log, codec, nodes, volume
//! client) is the `tessera-store` crate in `storage/store`.

pub mod failpoint;
pub mod wal;
