//! The etcd data model as raftkv's layers share it: key-values with revisions, the requests that
//! read and change them, and the commands that travel through the Raft log.
//!
//! These types know nothing of gRPC (the API layer converts) nor of RocksDB (the storage layer
//! persists them); they are what the API proposes, what Raft replicates and what the state machine
//! applies.

use serde::{Deserialize, Serialize};
use std::fmt;

// Byte fields are (de)serialized with `serde_bytes`: postcard writes the same length-prefixed
// bytes either way, so stored logs and snapshots are unaffected, but as a sequence every byte
// went through the serializer one at a time.

/// A key-value pair at some revision, in etcd's sense. `value` is the stored form: ciphertext when
/// encryption at rest is on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct KeyValue {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub lease: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SortOrder {
    #[default]
    None,
    Ascend,
    Descend,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum SortTarget {
    #[default]
    Key,
    Version,
    Create,
    Mod,
    Value,
}

/// etcd's RangeRequest, minus the consistency flag (which the API layer handles before reading).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RangeRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub limit: i64,
    pub revision: i64,
    pub sort_order: SortOrder,
    pub sort_target: SortTarget,
    pub keys_only: bool,
    pub count_only: bool,
    pub min_mod_revision: i64,
    pub max_mod_revision: i64,
    pub min_create_revision: i64,
    pub max_create_revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct RangeResult {
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    pub count: i64,
    /// The store revision the range was served at.
    pub revision: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PutRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub value: Vec<u8>,
    pub lease: i64,
    pub prev_kv: bool,
    pub ignore_value: bool,
    pub ignore_lease: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct PutResult {
    pub prev_kv: Option<KeyValue>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeleteRequest {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
    pub prev_kv: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct DeleteResult {
    pub deleted: i64,
    pub prev_kvs: Vec<KeyValue>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareResult {
    Equal,
    Greater,
    Less,
    NotEqual,
}

/// What a compare looks at, with the operand to compare against.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    Version(i64),
    Create(i64),
    Mod(i64),
    /// Compared against the plaintext value; the state machine decrypts stored values for this.
    Value(#[serde(with = "serde_bytes")] Vec<u8>),
    Lease(i64),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub result: CompareResult,
    pub target: CompareTarget,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RequestOp {
    Range(RangeRequest),
    Put(PutRequest),
    Delete(DeleteRequest),
    Txn(TxnRequest),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResponseOp {
    Range(RangeResult),
    Put(PutResult),
    Delete(DeleteResult),
    Txn(TxnResult),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct TxnResult {
    pub succeeded: bool,
    pub responses: Vec<ResponseOp>,
}

/// Who asked for a change: carried in every proposal so that permission checks happen in the
/// state machine, against the replicated role definitions, identically on every replica.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Principal {
    /// The token subject (a user name for tokens from `Authenticate`).
    pub name: String,
    /// Roles named by the token itself.
    pub roles: Vec<String>,
}

/// A permission type in etcd's RBAC.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum PermType {
    Read,
    Write,
    ReadWrite,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Permission {
    pub perm_type: PermType,
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub range_end: Vec<u8>,
}

/// Changes to the replicated users and roles, mirroring etcd's Auth API.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthCommand {
    Enable,
    Disable,
    UserAdd {
        name: String,
        /// bcrypt hash; `None` for a user created with `no_password`.
        password_hash: Option<String>,
    },
    UserDelete {
        name: String,
    },
    UserChangePassword {
        name: String,
        password_hash: String,
    },
    UserGrantRole {
        user: String,
        role: String,
    },
    UserRevokeRole {
        user: String,
        role: String,
    },
    RoleAdd {
        name: String,
    },
    RoleDelete {
        name: String,
    },
    RoleGrantPermission {
        name: String,
        perm: Permission,
    },
    RoleRevokePermission {
        name: String,
        #[serde(with = "serde_bytes")]
        key: Vec<u8>,
        #[serde(with = "serde_bytes")]
        range_end: Vec<u8>,
    },
}

/// One value re-encrypted under the active key, replacing the stored ciphertext at exactly that
/// revision (no new revision is created: re-encryption is invisible to readers and watchers).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reencrypted {
    #[serde(with = "serde_bytes")]
    pub key: Vec<u8>,
    pub mod_revision: i64,
    /// The ciphertext that was read; the replacement only happens if it is still stored, so a
    /// concurrent change is never overwritten.
    #[serde(with = "serde_bytes")]
    pub old_value: Vec<u8>,
    #[serde(with = "serde_bytes")]
    pub new_value: Vec<u8>,
}

/// What the state machine is asked to do.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Put(PutRequest),
    Delete(DeleteRequest),
    Txn(TxnRequest),
    Compact { revision: i64 },
    Auth(AuthCommand),
    Reencrypt(Vec<Reencrypted>),
    LeaseGrant { id: i64, ttl: i64 },
    LeaseRevoke { id: i64 },
}

/// Identifies an encryption key without revealing it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SealKey {
    pub id: u32,
    pub fingerprint: [u8; 16],
}

/// An entry of the replicated log: a command and who asked for it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Proposal {
    pub principal: Option<Principal>,
    /// The encryption key the values in this proposal were sealed with, if any, so the state
    /// machine can count key usage and detect a node with a wrong key, deterministically.
    pub key: Option<SealKey>,
    pub command: Command,
}

impl fmt::Display for Proposal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let what = match &self.command {
            Command::Put(_) => "put",
            Command::Delete(_) => "delete",
            Command::Txn(_) => "txn",
            Command::Compact { .. } => "compact",
            Command::Auth(_) => "auth",
            Command::Reencrypt(_) => "reencrypt",
            Command::LeaseGrant { .. } => "lease-grant",
            Command::LeaseRevoke { .. } => "lease-revoke",
        };
        f.write_str(what)
    }
}

/// A deterministic refusal by the state machine: every replica reaches the same verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ApplyError {
    #[error("etcdserver: mvcc: required revision has been compacted")]
    Compacted,
    #[error("etcdserver: mvcc: required revision is a future revision")]
    FutureRevision,
    #[error("etcdserver: key not found")]
    KeyNotFound,
    #[error("etcdserver: requested lease not found")]
    LeaseNotFound,
    #[error("etcdserver: lease already exists")]
    LeaseExists,
    #[error("etcdserver: permission denied")]
    PermissionDenied,
    /// Auth management refusals carry etcd's exact message and gRPC code name.
    #[error("{message}")]
    Auth {
        code: AuthErrorCode,
        message: String,
    },
    #[error("encryption: {0}")]
    Encryption(String),
    #[error("etcdserver: mvcc: database space exceeded")]
    NoSpace,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum AuthErrorCode {
    InvalidArgument,
    FailedPrecondition,
}

/// What applying a proposal produced.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyOutput {
    Put(PutResult),
    Delete(DeleteResult),
    Txn(TxnResult),
    Compacted,
    Auth,
    Reencrypted {
        replaced: u64,
    },
    LeaseGranted {
        id: i64,
        ttl: i64,
    },
    LeaseRevoked,
    /// Blank and membership entries.
    None,
}

/// The response openraft hands back to the proposer once the entry is applied.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApplyResponse {
    /// The store revision after applying.
    pub revision: i64,
    pub result: Result<ApplyOutput, ApplyError>,
}

/// Turns etcd's range conventions into an explicit interval. `None` as end means "to the end of
/// the keyspace" (the `"\0"` form); a single key is `[key, key\0)`.
pub fn key_interval(key: &[u8], range_end: &[u8]) -> (Vec<u8>, Option<Vec<u8>>) {
    if range_end.is_empty() {
        let mut end = key.to_vec();
        end.push(0);
        (key.to_vec(), Some(end))
    } else if range_end == [0] {
        (key.to_vec(), None)
    } else {
        (key.to_vec(), Some(range_end.to_vec()))
    }
}

/// The `range_end` that selects every key with the given prefix, as etcd clients compute it.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All bytes were 0xff (or the prefix is empty): the prefix covers the rest of the keyspace.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_matches_etcd_convention() {
        assert_eq!(prefix_end(b"aa"), b"ab");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b"\xff\xff"), vec![0]);
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn key_interval_forms() {
        assert_eq!(
            key_interval(b"a", b""),
            (b"a".to_vec(), Some(b"a\0".to_vec()))
        );
        assert_eq!(key_interval(b"a", b"\0"), (b"a".to_vec(), None));
        assert_eq!(
            key_interval(b"a", b"c"),
            (b"a".to_vec(), Some(b"c".to_vec()))
        );
    }
}
