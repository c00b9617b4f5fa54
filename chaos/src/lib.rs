//! `tessera-chaos`: fault injection, workload generators and correctness
//! checkers.
//!
//! Empty for now. The single-member checks that exist today (differential
//! test against etcd, SIGKILL crash test) live in `server/tests/`.
