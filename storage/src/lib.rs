//! `tessera-storage`: everything of Tessera's that touches a disk directly.
//!
//! Empty for now. It will hold the io_uring write-ahead log that replaces the
//! RocksDB-backed Raft log (cluster issue), then the checksummed block files,
//! the Reed-Solomon codec and the `tessera-store` node daemon.
