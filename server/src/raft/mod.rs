//! Consensus: openraft glue (types, log storage, state machine, network).

// openraft's traits fix the error type (`StorageError`, ~224 bytes); helpers
// return it too rather than boxing and unboxing at every trait boundary.
#![allow(clippy::result_large_err)]

pub mod log_store;
pub mod network;
pub mod snapshot_files;
pub mod state_machine;
pub mod types;

pub use types::{Command, CommandResult, Raft, TypeConfig};
