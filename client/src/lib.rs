//! raftkv-client: the Rust client for raftkv (and any etcd v3 cluster).
//!
//! ```no_run
//! # async fn demo() -> Result<(), raftkv_client::Error> {
//! use raftkv_client::{Client, ConnectOptions};
//! let client = Client::connect(["http://127.0.0.1:2379"], ConnectOptions::default().with_token("…")).await?;
//! client.set("greeting", "hello").await?;
//! let kv = client.get("greeting").await?;
//! # Ok(()) }
//! ```
//!
//! Requests spread over the cluster: the client learns the members (`MemberList`) and the
//! leader (`Status`), sends reads round-robin to healthy members and writes to the leader, and
//! retries with bounded backoff when a member is down or leadership moves. A write is retried
//! only when it certainly did not take effect; when its outcome is unknown the call fails with
//! [`Error::OutcomeUnknown`] instead of guessing.

pub mod backup;
mod balancer;
mod error;
pub mod s3;
pub mod token;
pub mod txn;

pub use balancer::{ConnectOptions, TlsOptions};
pub use error::Error;
pub use raftkv_proto::etcdserverpb as pb;
pub use raftkv_proto::mvccpb::KeyValue;
pub use txn::{Compare, Op, Txn, TxnOutcome};

use balancer::{Balancer, Route};
use std::sync::Arc;

/// A connection to a cluster. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    lb: Arc<Balancer>,
}

/// Options for reads.
#[derive(Debug, Clone, Default)]
pub struct GetOptions {
    /// Treat the key as a prefix.
    pub prefix: bool,
    /// Read at this revision (0: the newest).
    pub revision: i64,
    /// At most this many keys (0: no limit).
    pub limit: i64,
    /// Serve from the contacted member without a quorum round (possibly stale).
    pub serializable: bool,
    pub keys_only: bool,
    pub count_only: bool,
}

/// The answer to a read.
#[derive(Debug, Clone, Default)]
pub struct GetResult {
    pub kvs: Vec<KeyValue>,
    pub more: bool,
    pub count: i64,
    pub revision: i64,
}

/// One member's status, as `kvctl status` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MemberStatus {
    pub endpoint: String,
    pub id: u64,
    pub leader: u64,
    pub term: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    pub db_size: i64,
    pub db_size_in_use: i64,
    pub is_learner: bool,
    pub version: String,
    pub errors: Vec<String>,
}

/// A cluster member.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Member {
    pub id: u64,
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

/// The range end that selects every key starting with `prefix`.
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl Client {
    /// Connects to the cluster at `endpoints` (URLs such as `http://10.0.0.1:2379`, or DNS names
    /// that resolve to several members).
    pub async fn connect<I, S>(endpoints: I, options: ConnectOptions) -> Result<Client, Error>
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        let lb = Arc::new(
            Balancer::connect(endpoints.into_iter().map(Into::into).collect(), options).await?,
        );
        Balancer::spawn_refresh(&lb);
        Ok(Client { lb })
    }

    /// Stores `value` at `key`; returns the store revision of the write.
    pub async fn set(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<i64, Error> {
        let req = pb::PutRequest {
            key: key.as_ref().to_vec(),
            value: value.as_ref().to_vec(),
            ..Default::default()
        };
        let resp = self.put_raw(req).await?;
        Ok(resp.header.map(|h| h.revision).unwrap_or(0))
    }

    /// Sends a raw Put (for options such as leases or `prev_kv`).
    pub async fn put_raw(&self, req: pb::PutRequest) -> Result<pb::PutResponse, Error> {
        self.lb
            .call(Route::Write, move |ch, meta| {
                let req = req.clone();
                async move { pb::kv_client::KvClient::new(ch).put(meta.wrap(req)).await }
            })
            .await
    }

    /// The key-value at `key`, if present.
    pub async fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<KeyValue>, Error> {
        Ok(self
            .get_with(key, GetOptions::default())
            .await?
            .kvs
            .into_iter()
            .next())
    }

    /// Every key-value under `prefix`, in key order.
    pub async fn get_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<Vec<KeyValue>, Error> {
        Ok(self
            .get_with(
                prefix,
                GetOptions {
                    prefix: true,
                    ..Default::default()
                },
            )
            .await?
            .kvs)
    }

    pub async fn get_with(
        &self,
        key: impl AsRef<[u8]>,
        opts: GetOptions,
    ) -> Result<GetResult, Error> {
        let key = key.as_ref().to_vec();
        let (key, range_end) = if opts.prefix {
            if key.is_empty() {
                (vec![0], vec![0])
            } else {
                let end = prefix_end(&key);
                (key, end)
            }
        } else {
            (key, Vec::new())
        };
        let req = pb::RangeRequest {
            key,
            range_end,
            limit: opts.limit,
            revision: opts.revision,
            serializable: opts.serializable,
            keys_only: opts.keys_only,
            count_only: opts.count_only,
            ..Default::default()
        };
        let resp = self.range_raw(req).await?;
        Ok(GetResult {
            revision: resp.header.map(|h| h.revision).unwrap_or(0),
            kvs: resp.kvs,
            more: resp.more,
            count: resp.count,
        })
    }

    /// Sends a raw Range.
    pub async fn range_raw(&self, req: pb::RangeRequest) -> Result<pb::RangeResponse, Error> {
        self.lb
            .call(Route::Read, move |ch, meta| {
                let req = req.clone();
                async move { pb::kv_client::KvClient::new(ch).range(meta.wrap(req)).await }
            })
            .await
    }

    /// Deletes `key`; returns how many keys were deleted (0 or 1).
    pub async fn delete(&self, key: impl AsRef<[u8]>) -> Result<i64, Error> {
        self.delete_raw(pb::DeleteRangeRequest {
            key: key.as_ref().to_vec(),
            ..Default::default()
        })
        .await
        .map(|r| r.deleted)
    }

    /// Deletes every key under `prefix`; returns how many.
    pub async fn delete_prefix(&self, prefix: impl AsRef<[u8]>) -> Result<i64, Error> {
        let p = prefix.as_ref().to_vec();
        let (key, range_end) = if p.is_empty() {
            (vec![0], vec![0])
        } else {
            let end = prefix_end(&p);
            (p, end)
        };
        self.delete_raw(pb::DeleteRangeRequest {
            key,
            range_end,
            ..Default::default()
        })
        .await
        .map(|r| r.deleted)
    }

    pub async fn delete_raw(
        &self,
        req: pb::DeleteRangeRequest,
    ) -> Result<pb::DeleteRangeResponse, Error> {
        self.lb
            .call(Route::Write, move |ch, meta| {
                let req = req.clone();
                async move {
                    pb::kv_client::KvClient::new(ch)
                        .delete_range(meta.wrap(req))
                        .await
                }
            })
            .await
    }

    /// Sets `key` to `new` only if its current value is `expected` (`None`: only if the key
    /// does not exist). Returns whether the swap happened.
    pub async fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        expected: Option<&[u8]>,
        new: impl AsRef<[u8]>,
    ) -> Result<bool, Error> {
        let key = key.as_ref().to_vec();
        let compare = match expected {
            Some(v) => Compare::value(key.clone(), txn::Cmp::Equal, v.to_vec()),
            None => Compare::version(key.clone(), txn::Cmp::Equal, 0),
        };
        let outcome = self
            .txn(
                Txn::new()
                    .when([compare])
                    .and_then([Op::put(key, new.as_ref().to_vec())]),
            )
            .await?;
        Ok(outcome.succeeded)
    }

    /// Runs a transaction.
    pub async fn txn(&self, t: Txn) -> Result<TxnOutcome, Error> {
        let read_only = t.is_read_only();
        let req = t.into_request();
        let resp = self.txn_raw(req, read_only).await?;
        Ok(TxnOutcome::from(resp))
    }

    pub async fn txn_raw(
        &self,
        req: pb::TxnRequest,
        read_only: bool,
    ) -> Result<pb::TxnResponse, Error> {
        let route = if read_only { Route::Read } else { Route::Write };
        self.lb
            .call(route, move |ch, meta| {
                let req = req.clone();
                async move { pb::kv_client::KvClient::new(ch).txn(meta.wrap(req)).await }
            })
            .await
    }

    /// Compacts history at or below `revision`.
    pub async fn compact(&self, revision: i64) -> Result<i64, Error> {
        let resp = self
            .lb
            .call(Route::Write, move |ch, meta| async move {
                pb::kv_client::KvClient::new(ch)
                    .compact(meta.wrap(pb::CompactionRequest {
                        revision,
                        physical: true,
                    }))
                    .await
            })
            .await?;
        Ok(resp.header.map(|h| h.revision).unwrap_or(0))
    }

    /// Re-seals every stored value not sealed with the cluster's active encryption key
    /// (root only). Returns how many values were re-sealed and the active key id.
    pub async fn reencrypt(&self, batch_size: u32) -> Result<(u64, u32), Error> {
        let resp = self
            .lb
            .call_with_timeout(
                Route::Write,
                std::time::Duration::from_secs(3600),
                move |ch, meta| async move {
                    raftkv_proto::admin::admin_client::AdminClient::new(ch)
                        .reencrypt(meta.wrap(raftkv_proto::admin::ReencryptRequest { batch_size }))
                        .await
                },
            )
            .await?;
        Ok((resp.reencrypted, resp.active_key))
    }

    /// The cluster's members.
    pub async fn members(&self) -> Result<Vec<Member>, Error> {
        let resp = self
            .lb
            .call(Route::Read, |ch, meta| async move {
                pb::cluster_client::ClusterClient::new(ch)
                    .member_list(meta.wrap(pb::MemberListRequest { linearizable: true }))
                    .await
            })
            .await?;
        Ok(members_of(resp.members))
    }

    /// Adds a member as a learner (it receives the log but does not vote) and returns the
    /// membership after the change. `id` 0 lets the cluster derive one from the peer URL.
    pub async fn add_learner(&self, id: u64, peer_url: &str) -> Result<Vec<Member>, Error> {
        let peer_url = peer_url.to_string();
        let resp = self
            .lb
            .call(Route::Write, move |ch, meta| {
                let peer_ur_ls = vec![peer_url.clone()];
                async move {
                    pb::cluster_client::ClusterClient::new(ch)
                        .member_add(meta.wrap(pb::MemberAddRequest {
                            peer_ur_ls,
                            is_learner: true,
                            member_id: id,
                        }))
                        .await
                }
            })
            .await?;
        Ok(members_of(resp.members))
    }

    /// Makes a learner a voting member.
    pub async fn promote(&self, id: u64) -> Result<Vec<Member>, Error> {
        let resp = self
            .lb
            .call(Route::Write, move |ch, meta| async move {
                pb::cluster_client::ClusterClient::new(ch)
                    .member_promote(meta.wrap(pb::MemberPromoteRequest { id }))
                    .await
            })
            .await?;
        Ok(members_of(resp.members))
    }

    /// Removes a member from the cluster.
    pub async fn remove_member(&self, id: u64) -> Result<Vec<Member>, Error> {
        let resp = self
            .lb
            .call(Route::Write, move |ch, meta| async move {
                pb::cluster_client::ClusterClient::new(ch)
                    .member_remove(meta.wrap(pb::MemberRemoveRequest { id }))
                    .await
            })
            .await?;
        Ok(members_of(resp.members))
    }

    /// Hands leadership to the voting member `to` and waits until it leads.
    pub async fn move_leader(&self, to: u64) -> Result<(), Error> {
        self.lb
            .call(Route::Write, move |ch, meta| async move {
                pb::maintenance_client::MaintenanceClient::new(ch)
                    .move_leader(meta.wrap(pb::MoveLeaderRequest { target_id: to }))
                    .await
            })
            .await?;
        Ok(())
    }

    /// The status of every endpoint this client knows (unreachable ones as errors).
    pub async fn status(&self) -> Vec<(String, Result<MemberStatus, Error>)> {
        self.lb.status_all().await
    }

    /// The id of the current leader, as the cluster reports it.
    pub async fn leader(&self) -> Result<u64, Error> {
        self.lb.refresh_leader().await
    }

    /// Endpoints this client currently balances over.
    pub fn endpoints(&self) -> Vec<String> {
        self.lb.endpoint_urls()
    }
}

fn members_of(members: Vec<pb::Member>) -> Vec<Member> {
    members
        .into_iter()
        .map(|m| Member {
            id: m.id,
            name: m.name,
            peer_urls: m.peer_ur_ls,
            client_urls: m.client_ur_ls,
            is_learner: m.is_learner,
        })
        .collect()
}
