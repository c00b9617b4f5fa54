//! `tessera-csi`: the CSI plugin that presents Tessera volumes to pods.
//!
//! One binary serves the CSI Identity, Controller and Node services (spec
//! v1.9+, `csi.v1`) on a unix socket; `--mode` picks controller, node or
//! both. The controller side is the store's own volume and snapshot
//! operations (`tessera_store::cli`, `tessera_store::snapshots`) over the
//! control plane. The node side attaches a volume with the store's attach
//! daemon (`tessera-store attach-daemon`, one process per volume, in its own
//! session so it outlives a restart of this plugin), formats it only when
//! it has read it as blank, and mounts it.
//!
//! Nothing is kept in this process between calls: what is attached lives
//! in the attach daemons' state files under `--run-dir`, what is mounted
//! lives in the kernel's mount table. A plugin that restarts finds both as
//! they were.
//!
//! Modules: [`capability`] (which volume capabilities are served),
//! [`status`] (store errors as gRPC codes), [`locks`] (one call per volume
//! at a time), [`paging`] (list tokens), [`mounts`] and [`filesystem`]
//! (the node's mount, format and resize steps), [`identity`],
//! [`controller`], [`node`] (the three services), [`server`] (the socket).

pub mod capability;
pub mod controller;
pub mod filesystem;
pub mod identity;
pub mod locks;
pub mod mounts;
pub mod node;
pub mod paging;
pub mod server;
pub mod status;

/// The driver name Kubernetes objects (CSIDriver, StorageClass) refer to.
pub const DRIVER_NAME: &str = "csi.tessera.dev";

/// Volume size when a request names none.
pub const DEFAULT_VOLUME_SIZE: u64 = 1 << 30;
