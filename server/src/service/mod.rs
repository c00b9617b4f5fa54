//! gRPC services of the etcd v3 API.

pub mod cluster;
pub mod election;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod not_served;
pub mod recipes;
pub mod watch;
