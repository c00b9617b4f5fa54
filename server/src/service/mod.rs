//! gRPC services of the etcd v3 API.

pub mod auth;
pub mod cluster;
pub mod election;
pub mod kv;
pub mod kv_unary;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod recipes;
pub mod watch;
