//! `tessera`: an etcd v3-compatible datastore. See `docs/ARCHITECTURE.md`.

pub mod alarms;
pub mod auth;
pub mod compactor;
pub mod config;
pub mod db;
pub mod errors;
pub mod gateway;
pub mod h2_authority;
pub mod http;
pub mod lease_expiry;
pub mod lessor;
pub mod members;
pub mod metrics;
pub mod mvcc;
pub mod node;
pub mod peer;
pub mod process_metrics;
pub mod proposals;
pub mod raft;
pub mod read_index;
pub mod server;
pub mod service;
pub mod snapshot;
pub mod tls;
pub mod validate;
pub mod watch_hub;
