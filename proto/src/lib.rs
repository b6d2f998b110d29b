//! The wire protocols raftkv speaks, generated from our `.proto` files: the etcd v3 API
//! (`etcdserverpb`, `mvccpb`, `authpb`, and the lock and election services `v3lockpb`,
//! `v3electionpb`) and the node-to-node peer protocol.

#![allow(clippy::all, missing_docs)]

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

pub mod peer {
    tonic::include_proto!("raftkv.peer.v1");
}

pub mod admin {
    tonic::include_proto!("raftkv.admin.v1");
}
