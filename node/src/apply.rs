//! What the state machine does with one committed proposal: permission checks against the
//! replicated roles, then the etcd operation itself, staged into one atomic write batch.
//!
//! Everything here is deterministic: the same proposal on the same state gives the same batch
//! and the same response on every replica.

use crate::model::{ApplyError, ApplyOutput, ApplyResponse, Command, PermType, Proposal};
use crate::storage::auth_state::{self, AuthSource};
use crate::storage::mvcc::{self, Authorizer, Counters, Event, ReadError, ValueOpener, WriteTxn};
use crate::storage::{CF_META, StorageError, Store};
use rocksdb::WriteBatch;
use std::sync::Arc;

const KEY_USAGE_PREFIX: &[u8] = b"enc/usage/";
const KEY_FINGERPRINT_PREFIX: &[u8] = b"enc/fingerprint/";

/// The result of applying one proposal, before it is written.
pub struct Staged {
    pub batch: WriteBatch,
    pub counters: Counters,
    pub response: ApplyResponse,
    pub events: Vec<Event>,
}

/// Applies proposals. Holds what the state machine needs besides the database.
#[derive(Clone)]
pub struct Executor {
    opener: Arc<dyn ValueOpener + Send + Sync>,
}

impl Executor {
    pub fn new(opener: Arc<dyn ValueOpener + Send + Sync>) -> Executor {
        Executor { opener }
    }

    pub fn opener(&self) -> &(dyn ValueOpener + Send + Sync) {
        self.opener.as_ref()
    }

    /// Stages `proposal` on top of `counters`. Refusals produce an empty batch and an error
    /// response; only storage failures are errors.
    pub fn stage(
        &self,
        store: &Store,
        counters: Counters,
        proposal: &Proposal,
    ) -> Result<Staged, StorageError> {
        if let Some(k) = &proposal.key
            && let Some(known) = key_fingerprint(store, k.id)?
            && known != k.fingerprint
        {
            return Ok(refused(
                counters,
                ApplyError::Encryption(format!(
                    "the proposing node's encryption key {} differs from the key {} the cluster \
                     recorded; fix that node's keyring",
                    k.id, k.id
                )),
            ));
        }
        let grants = store.grants(proposal.principal.as_ref())?;
        let mut txn = WriteTxn::new(store, counters, self.opener.as_ref());
        let outcome = self.run(store, &mut txn, &grants, proposal);
        let outcome = match outcome {
            Ok(out) => Ok(out),
            Err(ReadError::Refused(e)) => Err(e),
            Err(ReadError::Storage(e)) => return Err(e),
        };
        match outcome {
            Ok(output) => {
                if let Some(k) = &proposal.key {
                    let sealed = sealed_values(&proposal.command);
                    if sealed > 0 {
                        let usage = key_usage(store, k.id)? + sealed;
                        let meta = store.cf(CF_META)?;
                        txn.batch.put_cf(meta, usage_key(k.id), usage.to_be_bytes());
                        txn.batch.put_cf(meta, fingerprint_key(k.id), k.fingerprint);
                    }
                }
                let (batch, counters, events) = txn.finish()?;
                Ok(Staged {
                    batch,
                    counters,
                    response: ApplyResponse {
                        revision: counters.revision,
                        result: Ok(output),
                    },
                    events,
                })
            }
            Err(e) => Ok(refused(counters, e)),
        }
    }

    fn run(
        &self,
        store: &Store,
        txn: &mut WriteTxn<'_>,
        grants: &auth_state::Grants,
        proposal: &Proposal,
    ) -> Result<ApplyOutput, ReadError> {
        let admin = || -> Result<(), ReadError> {
            if grants.root {
                Ok(())
            } else {
                Err(ApplyError::PermissionDenied.into())
            }
        };
        match &proposal.command {
            cmd @ (Command::Put(_) | Command::Delete(_) | Command::Txn(_)) => {
                if !mvcc::authorize_command(grants, cmd) {
                    return Err(ApplyError::PermissionDenied.into());
                }
                Ok(match cmd {
                    Command::Put(p) => ApplyOutput::Put(txn.put(p)?),
                    Command::Delete(d) => ApplyOutput::Delete(txn.delete(d)?),
                    Command::Txn(t) => ApplyOutput::Txn(txn.txn(t)?),
                    _ => ApplyOutput::None,
                })
            }
            Command::Compact { revision } => {
                admin()?;
                txn.compact(*revision)?;
                Ok(ApplyOutput::Compacted)
            }
            Command::Auth(cmd) => {
                admin()?;
                match auth_state::apply(store, &mut txn.batch, cmd)? {
                    Ok(()) => Ok(ApplyOutput::Auth),
                    Err(e) => Err(e.into()),
                }
            }
            Command::Reencrypt(items) => {
                admin()?;
                let replaced = txn.reencrypt(items)?;
                Ok(ApplyOutput::Reencrypted { replaced })
            }
            Command::LeaseGrant { id, ttl } => {
                if txn.lease_grant(*id, *ttl)? {
                    Ok(ApplyOutput::LeaseGranted { id: *id, ttl: *ttl })
                } else {
                    Err(ApplyError::LeaseExists.into())
                }
            }
            Command::LeaseRevoke { id } => {
                // Revoking deletes the attached keys: the requester must be allowed to.
                let view = store.read_view()?;
                for key in view.lease_keys(*id)? {
                    if !grants.permits(PermType::Write, &key, b"") {
                        return Err(ApplyError::PermissionDenied.into());
                    }
                }
                drop(view);
                if txn.lease_revoke(*id)? {
                    Ok(ApplyOutput::LeaseRevoked)
                } else {
                    Err(ApplyError::LeaseNotFound.into())
                }
            }
        }
    }
}

/// A refusal: nothing written but the applied marker the caller adds.
fn refused(counters: Counters, e: ApplyError) -> Staged {
    Staged {
        batch: WriteBatch::default(),
        counters,
        response: ApplyResponse {
            revision: counters.revision,
            result: Err(e),
        },
        events: Vec::new(),
    }
}

/// How many values a command sealed with the proposal's key (for the per-key usage limit).
fn sealed_values(cmd: &Command) -> u64 {
    fn ops(list: &[crate::model::RequestOp]) -> u64 {
        list.iter()
            .map(|op| match op {
                crate::model::RequestOp::Put(p) if !p.ignore_value => 1,
                crate::model::RequestOp::Txn(t) => ops(&t.success) + ops(&t.failure),
                _ => 0,
            })
            .sum()
    }
    match cmd {
        Command::Put(p) if !p.ignore_value => 1,
        Command::Txn(t) => ops(&t.success) + ops(&t.failure),
        Command::Reencrypt(items) => items.len() as u64,
        _ => 0,
    }
}

fn usage_key(id: u32) -> Vec<u8> {
    [KEY_USAGE_PREFIX, &id.to_be_bytes()].concat()
}

fn fingerprint_key(id: u32) -> Vec<u8> {
    [KEY_FINGERPRINT_PREFIX, &id.to_be_bytes()].concat()
}

/// The fingerprint of encryption key `id` as the cluster recorded it when first used.
pub fn key_fingerprint(store: &impl AuthSource, id: u32) -> Result<Option<[u8; 16]>, StorageError> {
    Ok(store
        .auth_meta(&fingerprint_key(id))?
        .and_then(|v| v.try_into().ok()))
}

/// Every key id the cluster has sealed values with, with its recorded fingerprint.
pub fn keys_in_use(store: &impl AuthSource) -> Result<Vec<(u32, [u8; 16])>, StorageError> {
    let mut out = Vec::new();
    for (k, v) in store.auth_prefix(KEY_FINGERPRINT_PREFIX)? {
        let id: [u8; 4] = k[KEY_FINGERPRINT_PREFIX.len()..]
            .try_into()
            .map_err(|_| crate::storage::codec::CorruptRecord("key fingerprint id"))?;
        let fp: [u8; 16] = v
            .as_slice()
            .try_into()
            .map_err(|_| crate::storage::codec::CorruptRecord("key fingerprint"))?;
        out.push((u32::from_be_bytes(id), fp));
    }
    Ok(out)
}

/// How many values have been sealed with encryption key `id`, cluster-wide.
pub fn key_usage(store: &impl AuthSource, id: u32) -> Result<u64, StorageError> {
    Ok(store
        .auth_meta(&usage_key(id))?
        .and_then(|v| v.try_into().ok().map(u64::from_be_bytes))
        .unwrap_or(0))
}
