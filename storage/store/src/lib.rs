//! `tessera-store`: the data plane. Storage nodes keep erasure-coded shards
//! in a checksummed append-only log ([`shardlog`], served by [`node`]);
//! volumes are cut into segments placed on `k + m` nodes ([`placement`],
//! metadata in the control plane: [`meta`]); the volume client writes
//! blocks as log-structured stripes ([`volume`], [`codec`]) and
//! [`attach`] makes a volume a block device on this machine.

pub mod attach;
pub mod cli;
pub mod codec;
pub mod daemon;
pub mod meta;
pub mod metrics;
pub mod node;
pub mod placement;
pub mod rebuild;
pub mod repair;
pub mod scrub;
pub mod shardlog;
pub mod snapshots;
pub mod volume;
