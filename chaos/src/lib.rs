//! `tessera-chaos`: correctness checkers, a network of namespaces to run
//! clusters in, the servers on it, and the faults (nemeses) applied to
//! them. The `tessera-chaos run` binary puts them together.

pub mod blocks;
pub mod cluster;
pub mod lease;
pub mod linearizability;
pub mod list_append;
pub mod nemesis;
pub mod netns;
pub mod process;
pub mod watch;
