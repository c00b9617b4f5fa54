//! `tessera-bench`: load generators and side-by-side comparisons with etcd.
//!
//! - `watch-rss`: resident memory of a server holding many idle watchers
//!   and one stalled watch stream, for tessera and etcd in the same run.

pub mod server;
