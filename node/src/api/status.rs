//! How refusals become gRPC statuses: etcd's codes and messages, so etcd clients recognise them
//! (their retry and token-refresh logic matches on them), with detail added where etcd's
//! message would leave a person guessing.

use crate::auth::jwt::TokenError;
use crate::consensus::ProposeError;
use crate::crypto::CryptoError;
use crate::model::{ApplyError, AuthErrorCode};
use crate::storage::StorageError;
use crate::storage::mvcc::ReadError;
use tonic::Status;

pub const EMPTY_KEY: &str = "etcdserver: key is not provided";
pub const VALUE_PROVIDED: &str = "etcdserver: value is provided";
pub const LEASE_PROVIDED: &str = "etcdserver: lease is provided";
pub const TOO_MANY_OPS: &str = "etcdserver: too many operations in txn request";
pub const DUPLICATE_KEY: &str = "etcdserver: duplicate key given in txn request";
pub const REQUEST_TOO_LARGE: &str = "etcdserver: request is too large";
pub const INVALID_SORT: &str = "etcdserver: invalid sort option";
pub const MEMBER_NOT_FOUND: &str = "etcdserver: member not found";
pub const MEMBER_EXISTS: &str = "etcdserver: member ID already exist";
pub const PEER_URL_EXISTS: &str = "etcdserver: Peer URLs already exists";
pub const BAD_URLS: &str = "etcdserver: given member URLs are invalid";
pub const NOT_LEARNER: &str = "etcdserver: can only promote a learner member";
pub const AUTH_NOT_ENABLED: &str = "etcdserver: authentication is not enabled";
pub const AUTH_FAILED: &str = "etcdserver: authentication failed, invalid user ID or password";
pub const USER_EMPTY: &str = "etcdserver: user name is empty";
pub const ROLE_EMPTY: &str = "etcdserver: role name is empty";
pub const PERMISSION_DENIED: &str = "etcdserver: permission denied";
pub const INVALID_TOKEN: &str = "etcdserver: invalid auth token";
pub const NO_SPACE: &str = "etcdserver: mvcc: database space exceeded";
pub const STOPPED: &str = "etcdserver: server stopped";
pub const NO_LEADER: &str = "etcdserver: no leader";

pub fn invalid(msg: &str) -> Status {
    Status::invalid_argument(msg)
}

pub fn denied() -> Status {
    Status::permission_denied(PERMISSION_DENIED)
}

/// Refusal of a request's token. An expired token gets etcd's exact message, which makes etcd
/// clients that logged in with a password log in again and retry; the reason is still in the
/// `raftkv-auth-reason` trailer and the server log.
pub fn unauthenticated(e: &TokenError) -> Status {
    let msg = match e {
        TokenError::Missing => e.to_string(),
        TokenError::Expired => INVALID_TOKEN.to_string(),
        other => format!("{INVALID_TOKEN}: {other}"),
    };
    let mut s = Status::unauthenticated(msg);
    if let Ok(v) = e.to_string().parse() {
        s.metadata_mut().insert("raftkv-auth-reason", v);
    }
    s
}

pub fn from_apply(e: &ApplyError) -> Status {
    let msg = e.to_string();
    match e {
        ApplyError::Compacted | ApplyError::FutureRevision => Status::out_of_range(msg),
        ApplyError::KeyNotFound => Status::invalid_argument(msg),
        ApplyError::LeaseNotFound => Status::not_found(msg),
        ApplyError::LeaseExists => Status::failed_precondition(msg),
        ApplyError::PermissionDenied => Status::permission_denied(msg),
        ApplyError::Auth { code, .. } => match code {
            AuthErrorCode::InvalidArgument => Status::invalid_argument(msg),
            AuthErrorCode::FailedPrecondition => Status::failed_precondition(msg),
        },
        ApplyError::Encryption(_) => Status::failed_precondition(msg),
        ApplyError::NoSpace | ApplyError::ResponseTooLarge(_) | ApplyError::Busy => {
            Status::resource_exhausted(msg)
        }
        ApplyError::TooManyOps => Status::invalid_argument(msg),
        ApplyError::LeaseTtlTooLarge => Status::out_of_range(msg),
    }
}

pub fn from_propose(e: &ProposeError) -> Status {
    match e {
        ProposeError::NoLeader => Status::unavailable(e.to_string()),
        ProposeError::OutcomeUnknown(_) => Status::unavailable(e.to_string()),
        ProposeError::Unavailable(_) | ProposeError::Stopped => Status::unavailable(e.to_string()),
        ProposeError::Rejected(m) => Status::failed_precondition(format!("etcdserver: {m}")),
        ProposeError::Unauthenticated(m) => Status::unauthenticated(m.clone()),
        ProposeError::PermissionDenied => Status::permission_denied(PERMISSION_DENIED),
    }
}

pub fn from_storage(e: &StorageError) -> Status {
    tracing::error!(error = %e, "storage failure while serving a request");
    Status::internal(format!("etcdserver: storage failure: {e}"))
}

pub fn from_read(e: &ReadError) -> Status {
    match e {
        ReadError::Refused(a) => from_apply(a),
        ReadError::Storage(s) => from_storage(s),
    }
}

/// A stored value that cannot be decrypted: never returned as garbage.
pub fn undecryptable(key: &[u8], e: &CryptoError) -> Status {
    tracing::error!(key = %String::from_utf8_lossy(key), error = %e, "value cannot be decrypted");
    Status::data_loss(format!(
        "etcdserver: the value of key {:?} cannot be decrypted: {e}",
        String::from_utf8_lossy(key)
    ))
}
