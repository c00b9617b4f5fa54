//! `tessera-bench`: load generators mirroring etcd's `benchmark` tool and
//! side-by-side comparisons with etcd.
//!
//! Empty for now (see the bench issue).
