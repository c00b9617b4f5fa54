//! `tessera-bench`: load generators and side-by-side comparisons with etcd.
//!
//! - `tessera-bench`: etcd's `benchmark` tool, same subcommands and flags
//!   ([`workload`]), driven by [`load`] over lean HTTP/2 connections
//!   ([`unary`]) and reported by [`report`];
//! - `bench-compare`: tessera and etcd started in turn with the same flags,
//!   the same workloads run against each, ratios written to BENCHMARKS.md;
//! - `watch-rss`: resident memory of a server holding many idle watchers
//!   and one stalled watch stream, for tessera and etcd in the same run;
//! - `fio-volume`: fio jobs on block devices and their report ([`fio`]),
//!   driven by `bench/volume-fio.sh`.

pub mod connect;
pub mod fio;
pub mod load;
pub mod progress;
pub mod report;
pub mod sections;
pub mod server;
pub mod unary;
pub mod workload;
