//! Keys under a name, ordered by creation: what etcd's lock and election services are made of.
//! The keys, transactions and waits are the ones etcd's server builds with its `concurrency`
//! package (a key `<name>/<lease id in hex>` attached to the caller's lease; whoever holds the
//! oldest key owns the name), so clients that mix the services with client-side locks agree.
//! Everything runs as the caller: permissions are those of the KV calls it stands for.

use super::{Api, convert, status};
use crate::auth::Caller;
use crate::model::{
    Compare, CompareResult, CompareTarget, DeleteRequest, KeyValue, PutRequest, RangeRequest,
    RequestOp, ResponseOp, SortOrder, SortTarget, TxnRequest, prefix_end,
};
use raftkv_proto::etcdserverpb as pb;
use std::time::Duration;
use tonic::Status;

/// The caller's key under a name, as `claim` made or found it.
pub struct Claim {
    pub key: Vec<u8>,
    /// Its create revision: the caller's place in line.
    pub rev: i64,
    /// Whether the stored value already was the one asked for.
    pub value_current: bool,
    /// The store revision after the claim.
    pub header_rev: i64,
}

/// `name/`: the prefix every claim on `name` lives under.
pub fn prefix(name: &[u8]) -> Vec<u8> {
    let mut p = name.to_vec();
    p.push(b'/');
    p
}

/// `name/<lease in hex>`: the caller's key.
pub fn claim_key(name: &[u8], lease: i64) -> Vec<u8> {
    let mut k = prefix(name);
    k.extend_from_slice(format!("{lease:x}").as_bytes());
    k
}

fn create_revision_is(key: &[u8], rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal,
        target: CompareTarget::Create(rev),
        key: key.to_vec(),
        range_end: Vec::new(),
    }
}

fn get(key: &[u8]) -> RequestOp {
    RequestOp::Range(RangeRequest {
        key: key.to_vec(),
        ..Default::default()
    })
}

impl Api {
    /// Creates the caller's key under `name` attached to `lease`, or finds it if this lease
    /// already made it.
    pub async fn claim(
        &self,
        caller: &Caller,
        name: &[u8],
        lease: i64,
        value: &[u8],
    ) -> Result<Claim, Status> {
        if name.is_empty() {
            return Err(status::invalid(status::EMPTY_KEY));
        }
        if name.len() + value.len() > self.limits.max_request_bytes {
            return Err(status::invalid(status::REQUEST_TOO_LARGE));
        }
        let key = claim_key(name, lease);
        let t = TxnRequest {
            compare: vec![create_revision_is(&key, 0)],
            success: vec![RequestOp::Put(PutRequest {
                key: key.clone(),
                value: value.to_vec(),
                lease,
                ..Default::default()
            })],
            failure: vec![get(&key)],
        };
        let (result, header_rev) = self.write_txn(caller, &t).await?;
        if result.succeeded {
            return Ok(Claim {
                key,
                rev: header_rev,
                value_current: true,
                header_rev,
            });
        }
        let existing = match result.responses.first() {
            Some(ResponseOp::Range(r)) => r.kvs.first().cloned(),
            _ => None,
        };
        let Some(kv) = existing else {
            return Err(Status::aborted(
                "etcdserver: the claim key changed while it was read; retry",
            ));
        };
        let current = self.open(&kv.key, kv.value.clone())? == value;
        Ok(Claim {
            key,
            rev: kv.create_revision,
            value_current: current,
            header_rev,
        })
    }

    /// The key under `name` created first: the lock's holder, the election's leader.
    pub async fn first_created(
        &self,
        caller: &Caller,
        name: &[u8],
        serializable: bool,
    ) -> Result<Option<KeyValue>, Status> {
        let p = prefix(name);
        let r = RangeRequest {
            key: p.clone(),
            range_end: prefix_end(&p),
            sort_order: SortOrder::Ascend,
            sort_target: SortTarget::Create,
            limit: 1,
            ..Default::default()
        };
        let res = self
            .read_range(&caller.principal, &r, serializable, &mut self.read_budget())
            .await?;
        Ok(res.kvs.into_iter().next())
    }

    /// Waits until no key under `name` created before `rev` is left, keeping `lease` alive
    /// meanwhile (as etcd's server session does for the caller). Like etcd, it waits for the
    /// deletion of the one key just ahead, so that writes elsewhere cost it nothing.
    pub async fn wait_turn(
        &self,
        caller: &Caller,
        name: &[u8],
        rev: i64,
        lease: i64,
    ) -> Result<(), Status> {
        let p = prefix(name);
        // Once this member has applied everything up to now, local reads see every key created
        // before ours; only deletions are left to wait for.
        self.linearize().await?;
        let mut keepalive = tokio::time::interval(Duration::from_secs(1));
        loop {
            let r = RangeRequest {
                key: p.clone(),
                range_end: prefix_end(&p),
                max_create_revision: rev - 1,
                sort_order: SortOrder::Descend,
                sort_target: SortTarget::Create,
                limit: 1,
                keys_only: true,
                ..Default::default()
            };
            let ahead = self
                .read_range(&caller.principal, &r, true, &mut self.read_budget())
                .await?;
            let Some(kv) = ahead.kvs.into_iter().next() else {
                return Ok(());
            };
            // Registered before looking again, so a deletion in between is not missed.
            let mut gone = self.watches.key_changed(&kv.key);
            let still = self
                .read_range(
                    &caller.principal,
                    &RangeRequest {
                        key: kv.key.clone(),
                        keys_only: true,
                        ..Default::default()
                    },
                    true,
                    &mut self.read_budget(),
                )
                .await?;
            if still.kvs.first().map(|k| k.create_revision) != Some(kv.create_revision) {
                continue;
            }
            loop {
                tokio::select! {
                    _ = &mut gone => break,
                    _ = keepalive.tick() => {
                        if lease != 0 {
                            let ttl = self.leases.keep_alive(lease).await?;
                            if ttl <= 0 {
                                return Err(Status::not_found(
                                    crate::model::ApplyError::LeaseNotFound.to_string(),
                                ));
                            }
                            let every = Duration::from_secs((ttl as u64 / 3).max(1));
                            keepalive = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
                        }
                    }
                }
            }
        }
    }

    /// Deletes `key` if it still has create revision `rev`; true if it did.
    pub async fn release(&self, caller: &Caller, key: &[u8], rev: i64) -> Result<bool, Status> {
        let t = TxnRequest {
            compare: vec![create_revision_is(key, rev)],
            success: vec![RequestOp::Delete(DeleteRequest {
                key: key.to_vec(),
                ..Default::default()
            })],
            failure: vec![],
        };
        Ok(self.write_txn(caller, &t).await?.0.succeeded)
    }

    /// Resolves at the next change of a key under `name`.
    pub fn name_changed(&self, name: &[u8]) -> tokio::sync::oneshot::Receiver<()> {
        let p = prefix(name);
        self.watches.range_changed(&p, &prefix_end(&p))
    }

    /// A stored key-value in the wire form, its value decrypted.
    pub fn kv_for_client(&self, kv: KeyValue) -> Result<raftkv_proto::mvccpb::KeyValue, Status> {
        let open = |k: &[u8], v: Vec<u8>| self.open(k, v);
        convert::kv_out(kv, &open)
    }

    pub fn header_now(&self, rev: i64) -> Option<pb::ResponseHeader> {
        self.header(rev)
    }
}

/// Deletes a claim when the call that made it ends before its owner got it (the client went
/// away or timed out), as etcd's server does on a cancelled Lock or Campaign.
pub struct ReleaseOnDrop {
    api: Api,
    caller: Caller,
    key: Vec<u8>,
    rev: i64,
    armed: bool,
}

impl ReleaseOnDrop {
    pub fn new(api: &Api, caller: &Caller, claim: &Claim) -> ReleaseOnDrop {
        ReleaseOnDrop {
            api: api.clone(),
            caller: caller.clone(),
            key: claim.key.clone(),
            rev: claim.rev,
            armed: true,
        }
    }

    /// The claim is the caller's to keep.
    pub fn keep(mut self) {
        self.armed = false;
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (api, caller, key, rev) = (
            self.api.clone(),
            self.caller.clone(),
            std::mem::take(&mut self.key),
            self.rev,
        );
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                if let Err(e) = api.release(&caller, &key, rev).await {
                    tracing::debug!(error = %e.message(), "releasing an abandoned claim");
                }
            });
        }
    }
}
