//! `tessera-storage`: everything of Tessera's that touches a disk directly.
//!
//! For now the write-ahead log that holds the Raft log ([`wal`]). The
//! checksummed block files, the Reed-Solomon codec and the `tessera-store`
//! node daemon will live here too.

pub mod failpoint;
pub mod wal;
