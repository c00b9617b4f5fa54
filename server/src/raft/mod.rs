//! Consensus: openraft glue (types, log storage, state machine, network).

pub mod log_store;
pub mod network;
pub mod state_machine;
pub mod types;

pub use types::{Command, CommandResult, Raft, TypeConfig};
