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

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct TxnRequest {
    pub compare: Vec<Compare>,
    pub success: Vec<RequestOp>,
    pub failure: Vec<RequestOp>,
}

/// How deeply transactions may nest. The client API cannot go deeper (protobuf decoding stops
/// at 100 message levels, two per transaction level); the bound also keeps a decoded log
/// entry or peer frame from recursing without limit.
pub const MAX_TXN_DEPTH: usize = 64;

thread_local! {
    static TXN_DEPTH: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// The wire form of `TxnRequest`; decoding goes through it so that nesting is counted.
#[derive(Deserialize)]
#[serde(rename = "TxnRequest")]
struct TxnRequestRepr {
    compare: Vec<Compare>,
    success: Vec<RequestOp>,
    failure: Vec<RequestOp>,
}

impl<'de> Deserialize<'de> for TxnRequest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<TxnRequest, D::Error> {
        let depth = TXN_DEPTH.with(|c| {
            let v = c.get() + 1;
            c.set(v);
            v
        });
        let out = if depth > MAX_TXN_DEPTH {
            Err(serde::de::Error::custom(format!(
                "transactions nested deeper than {MAX_TXN_DEPTH} levels"
            )))
        } else {
            TxnRequestRepr::deserialize(d).map(|r| TxnRequest {
                compare: r.compare,
                success: r.success,
                failure: r.failure,
            })
        };
        TXN_DEPTH.with(|c| c.set(c.get().saturating_sub(1)));
        out
    }
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
    /// For a token a member issued to a stored user (`Authenticate`): the user's token revision
    /// when it was issued. The token is void once the user is deleted, re-created or changes
    /// password, because the stored user's revision then differs.
    pub user_rev: Option<u64>,
}

/// What proves who a caller is, carried with a proposal a follower forwards to the leader so
/// the leader authenticates and authorizes the caller itself. Never written to the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Credential {
    /// The caller's JWT, which the leader verifies again.
    Token(String),
    /// The common name of a client certificate the forwarding member verified; believed only
    /// from a member that authenticated itself with its peer certificate.
    Certificate(String),
}

/// etcd's largest lease TTL (`MaxLeaseTTL`), in seconds.
pub const MAX_LEASE_TTL: i64 = 9_000_000_000;

/// Bounds on the work one committed entry can make every replica do. They are constants, not
/// flags: every replica must reach the same verdict on the same entry.
pub mod apply_limits {
    /// Operations in one transaction, counted over every nesting level.
    pub const MAX_TXN_TOTAL_OPS: usize = 16_384;
    /// Bytes of range results one write transaction may return.
    pub const MAX_RESPONSE_BYTES: u64 = 16 << 20;
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

/// What applying did to the leases, for the leader's expiry clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange {
    Granted {
        id: i64,
        ttl: i64,
    },
    Revoked {
        id: i64,
    },
    /// The state was replaced (a snapshot was installed): read every lease again.
    Reset,
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
    #[error("etcdserver: too many operations in txn request")]
    TooManyOps,
    #[error(
        "etcdserver: the ranges of this request return more than {0} bytes; narrow them, use a limit, or read outside a write transaction"
    )]
    ResponseTooLarge(u64),
    #[error("etcdserver: too large lease TTL")]
    LeaseTtlTooLarge,
    /// Reads on this member already hold as much memory as it allows (not from the log).
    #[error("etcdserver: too many reads in progress on this member; retry, or read less at a time")]
    Busy,
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
    fn decoding_stops_at_the_nesting_bound() {
        let mut t = TxnRequest::default();
        for _ in 0..(MAX_TXN_DEPTH - 1) {
            t = TxnRequest {
                success: vec![RequestOp::Txn(t)],
                ..Default::default()
            };
        }
        let bytes = postcard::to_stdvec(&t).unwrap();
        assert_eq!(postcard::from_bytes::<TxnRequest>(&bytes).unwrap(), t);
        let deeper = TxnRequest {
            success: vec![RequestOp::Txn(t)],
            ..Default::default()
        };
        let bytes = postcard::to_stdvec(&deeper).unwrap();
        assert!(postcard::from_bytes::<TxnRequest>(&bytes).is_err());
        // A forged frame of a million levels is refused without exhausting the stack.
        let mut forged = Vec::new();
        for _ in 0..1_000_000 {
            // compare: 0 entries; success: 1 entry; RequestOp::Txn (variant 3)
            forged.extend_from_slice(&[0, 1, 3]);
        }
        assert!(postcard::from_bytes::<TxnRequest>(&forged).is_err());
        // And a refusal leaves the depth count where it was.
        assert!(
            postcard::from_bytes::<TxnRequest>(
                &postcard::to_stdvec(&TxnRequest::default()).unwrap()
            )
            .is_ok()
        );
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
