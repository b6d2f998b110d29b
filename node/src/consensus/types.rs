//! The openraft type configuration and the encoding of openraft values for disk and wire.

use crate::model::{ApplyResponse, Proposal};
use serde::{Deserialize, Serialize};
use std::fmt;

/// What the cluster knows about a member: how peers and clients reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct MemberNode {
    /// Human-readable name; empty until the member has started and published it.
    pub name: String,
    /// Where peers reach this member's Raft port, e.g. `http://10.0.0.1:2380`.
    pub peer_url: String,
    /// Where clients reach it; empty until the member has started and published them.
    pub client_urls: Vec<String>,
}

impl fmt::Display for MemberNode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.name, self.peer_url)
    }
}

openraft::declare_raft_types!(
    /// raftkv's Raft type configuration.
    pub TypeConfig:
        D = Proposal,
        R = ApplyResponse,
        NodeId = u64,
        Node = MemberNode,
);

pub type NodeId = u64;
pub type LogId = openraft::alias::LogIdOf<TypeConfig>;
pub type Vote = openraft::alias::VoteOf<TypeConfig>;
pub type Entry = openraft::alias::EntryOf<TypeConfig>;
pub type StoredMembership = openraft::alias::StoredMembershipOf<TypeConfig>;
pub type SnapshotMeta = openraft::alias::SnapshotMetaOf<TypeConfig>;

/// Encodes an openraft value (or any of our serde types) for disk or wire.
pub fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>, std::io::Error> {
    postcard::to_stdvec(v).map_err(|e| std::io::Error::other(format!("encode: {e}")))
}

pub fn decode<T: for<'de> Deserialize<'de>>(b: &[u8]) -> Result<T, std::io::Error> {
    postcard::from_bytes(b)
        .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidData, format!("decode: {e}")))
}
