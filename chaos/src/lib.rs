//! `tessera-chaos`: correctness checkers and fault-injection helpers for
//! Tessera's tests.

pub mod linearizability;
