//! Wire types for Tessera: etcd's v3 API (`etcdserverpb`, `mvccpb`, `authpb`,
//! `v3lockpb`, `v3electionpb`)
//! and the internal Raft command format (`tessera`); plus [`coalesce`], the
//! write coalescing both the server and the load generator put under their
//! HTTP/2 connections.
//!
//! The modules are siblings so the paths prost generates between packages
//! (`super::mvccpb::KeyValue`) resolve.

pub mod coalesce;

#[allow(clippy::all)]
pub mod mvccpb {
    tonic::include_proto!("mvccpb");
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

#[allow(clippy::all)]
pub mod authpb {
    tonic::include_proto!("authpb");
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

#[allow(clippy::all)]
pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

#[allow(clippy::all)]
pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}

#[allow(clippy::all)]
pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}

#[allow(clippy::all)]
pub mod tessera {
    tonic::include_proto!("tessera");
}

/// The storage node protocol (`tessera/store.proto`).
#[allow(clippy::all)]
pub mod store {
    tonic::include_proto!("tessera.store");
}

/// The Container Storage Interface (`csi/csi.proto`, package `csi.v1`).
#[allow(clippy::all)]
pub mod csi {
    tonic::include_proto!("csi.v1");
}
