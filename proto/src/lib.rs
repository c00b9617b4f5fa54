//! Wire types for Tessera: etcd's v3 API (`etcdserverpb`, `mvccpb`, `authpb`,
//! `v3lockpb`, `v3electionpb`)
//! and the internal Raft command format (`tessera`).
//!
//! The modules are siblings so the paths prost generates between packages
//! (`super::mvccpb::KeyValue`) resolve.

#![allow(clippy::all)]

pub mod mvccpb {
    tonic::include_proto!("mvccpb");
}

pub mod authpb {
    tonic::include_proto!("authpb");
}

pub mod etcdserverpb {
    tonic::include_proto!("etcdserverpb");
}

pub mod v3lockpb {
    tonic::include_proto!("v3lockpb");
}

pub mod v3electionpb {
    tonic::include_proto!("v3electionpb");
}

pub mod tessera {
    tonic::include_proto!("tessera");
}
