//! Wire types for Tessera: etcd's v3 API (`etcdserverpb`, `mvccpb`, `authpb`,
//! `v3lockpb`, `v3electionpb`)
//! and the internal Raft command format (`tessera`).
//!
//! The modules are siblings so the paths prost generates between packages
//! (`super::mvccpb::KeyValue`) resolve.

#![allow(clippy::all)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
    include!(concat!(env!("OUT_DIR"), "/mvccpb.serde.rs"));
}

pub mod authpb {
    tonic::include_proto!("authpb");
    include!(concat!(env!("OUT_DIR"), "/authpb.serde.rs"));
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
    include!(concat!(env!("OUT_DIR"), "/etcdserverpb.serde.rs"));
}

pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
    include!(concat!(env!("OUT_DIR"), "/v3lockpb.serde.rs"));
}

pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
    include!(concat!(env!("OUT_DIR"), "/v3electionpb.serde.rs"));
}

pub mod tessera {
    tonic::include_proto!("tessera");
}
