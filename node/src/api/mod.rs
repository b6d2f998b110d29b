//! The client port: the etcd v3 gRPC API (KV, Watch, Lease, Cluster, Maintenance, Auth) plus
//! gRPC health, behind an edge layer that authenticates every request.

pub mod admin;
pub mod auth;
pub mod cluster;
pub mod connections;
pub mod convert;
pub mod coordination;
pub mod edge;
pub mod election;
pub mod forwarded;
pub mod kv;
pub mod lease;
pub mod lock;
pub mod maintenance;
pub mod status;
pub mod validate;
pub mod watch;

use crate::auth::{Authenticator, Caller};
use crate::consensus::{Consensus, Proposed};
use crate::crypto::Sealer;
use crate::metrics::Metrics;
use crate::model::{ApplyOutput, Command, Principal, Proposal, SealKey};
use crate::storage::auth_state::Grants;
use crate::storage::mvcc::Budget;
use raftkv_proto::etcdserverpb as pb;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use tonic::{Request, Status};

/// The metadata key etcd clients set to require a leader.
pub const REQUIRE_LEADER_KEY: &str = "hasleader";

/// Request limits, as etcd's flags of the same meaning.
#[derive(Debug, Clone)]
pub struct Limits {
    /// `--max-request-bytes`: largest accepted request (default 1.5 MiB).
    pub max_request_bytes: usize,
    /// `--max-txn-ops`: most operations per transaction level (default 128).
    pub max_txn_ops: usize,
    /// `--max-txn-total-ops`: most operations in one transaction over all its levels.
    pub max_txn_total_ops: usize,
    /// `--max-response-bytes`: most bytes of key-values one read may gather.
    pub max_response_bytes: u64,
    /// `--quota-backend-bytes`: writes are refused (NOSPACE alarm) above this database size.
    pub quota_bytes: u64,
    /// `--max-leases`: most leases the cluster holds at once.
    pub max_leases: usize,
    /// `--max-watchers-per-stream`: most watchers one watch stream may have.
    pub max_watchers_per_stream: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_request_bytes: 1536 * 1024,
            max_txn_ops: 128,
            max_txn_total_ops: 1024,
            max_response_bytes: 256 << 20,
            quota_bytes: 8 << 30,
            max_leases: 1_000_000,
            max_watchers_per_stream: 10_000,
        }
    }
}

/// Everything the API services share. Cheap to clone.
#[derive(Clone)]
pub struct Api {
    inner: Arc<ApiInner>,
}

pub struct ApiInner {
    /// The state machine's executor: its caches of the replicated auth state and key usage.
    pub executor: crate::apply::Executor,
    pub consensus: Consensus,
    pub authn: Authenticator,
    pub sealer: Sealer,
    pub limits: Limits,
    pub watches: watch::WatchHub,
    pub leases: lease::LeaseKeeper,
    pub metrics: Arc<Metrics>,
    /// Limits password guessing.
    pub logins: crate::auth::logins::LoginGuard,
    /// Bytes all reads on this member hold at once (`--max-inflight-read-bytes`).
    pub read_inflight: Arc<crate::storage::mvcc::InflightBytes>,
    /// Held while this member makes and streams a backup (one at a time).
    pub backup_slot: Arc<tokio::sync::Semaphore>,
    /// Set while the database is over its quota (etcd's NOSPACE alarm).
    pub nospace: AtomicBool,
    /// Becomes true when the member stops: long-lived streams end so that shutdown is prompt
    /// and their clients move to another member.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// Advertised client URLs and name of this member.
    pub client_urls: Vec<String>,
    pub name: String,
}

impl std::ops::Deref for Api {
    type Target = ApiInner;
    fn deref(&self) -> &ApiInner {
        &self.inner
    }
}

impl Api {
    pub fn new(inner: ApiInner) -> Api {
        Api {
            inner: Arc::new(inner),
        }
    }

    /// The principal the edge layer attached to this request.
    pub fn principal<T>(req: &Request<T>) -> Result<Principal, Status> {
        Self::caller(req).map(|c| c.principal)
    }

    /// Who made this request and what proved it, as the edge layer established.
    pub fn caller<T>(req: &Request<T>) -> Result<Caller, Status> {
        req.extensions()
            .get::<Caller>()
            .cloned()
            .ok_or_else(|| status::unauthenticated(&crate::auth::jwt::TokenError::Missing))
    }

    /// Resolves once the member is stopping.
    pub fn stopped(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut rx = self.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// True if the request asks for a leader (etcd's `hasleader` metadata, what clients set
    /// with `WithRequireLeader`).
    pub fn requires_leader(md: &tonic::metadata::MetadataMap) -> bool {
        md.get(REQUIRE_LEADER_KEY)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v == "true")
    }

    /// What one read may gather (`--max-response-bytes`), drawn from what all reads on this
    /// member may hold together.
    pub fn read_budget(&self) -> Budget {
        Budget::shared(self.limits.max_response_bytes, self.read_inflight.clone())
    }

    pub fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            cluster_id: self.consensus.cluster_id(),
            member_id: self.consensus.id(),
            revision,
            raft_term: self.consensus.term(),
        })
    }

    /// Waits until this node can serve a linearizable read.
    pub async fn linearize(&self) -> Result<(), Status> {
        self.consensus
            .read_barrier()
            .await
            .map_err(|e| status::from_propose(&e))
    }

    /// Refuses a token found revoked in the state a read is about to use: the edge checked it
    /// against what this member had applied then, which may have been behind the change.
    pub fn check_token(&self, principal: &Principal) -> Result<(), Status> {
        match self.executor.auth().get().token_standing(principal) {
            crate::storage::auth_state::TokenStanding::Revoked => Err(status::unauthenticated(
                &crate::auth::jwt::TokenError::Revoked,
            )),
            _ => Ok(()),
        }
    }

    /// What `principal` may do, per this node's current replicated roles.
    pub fn grants(&self, principal: &Principal) -> Grants {
        self.executor.auth().get().grants(Some(principal))
    }

    /// Decrypts a stored value for a response.
    pub fn open(&self, key: &[u8], stored: Vec<u8>) -> Result<Vec<u8>, Status> {
        self.sealer.open(key, &stored).map_err(|e| {
            self.metrics
                .crypto_errors
                .with_label_values(&["decrypt"])
                .inc();
            status::undecryptable(key, &e)
        })
    }

    /// The key new values are sealed with, refusing writes once it reached its usage limit.
    pub fn sealing_key(&self) -> Result<Option<SealKey>, Status> {
        let Some((id, fingerprint)) = self.sealer.active_key() else {
            return Ok(None);
        };
        let used = self
            .executor
            .sealed_count(self.consensus.store(), id)
            .map_err(|e| status::from_storage(&e))?;
        if used >= self.sealer.usage_limit {
            self.metrics
                .crypto_errors
                .with_label_values(&["key_exhausted"])
                .inc();
            return Err(Status::resource_exhausted(format!(
                "encryption key {id} has sealed {used} values, its limit of {}; add a new key to \
                 the keyring, make it active and retry",
                self.sealer.usage_limit
            )));
        }
        Ok(Some(SealKey { id, fingerprint }))
    }

    pub fn seal(&self, key: &[u8], value: &[u8]) -> Result<Vec<u8>, Status> {
        self.sealer.seal(key, value).map_err(|e| {
            self.metrics
                .crypto_errors
                .with_label_values(&["encrypt"])
                .inc();
            Status::internal(format!("etcdserver: encrypting the value failed: {e}"))
        })
    }

    pub fn seal_operand(&self, key: &[u8], operand: &[u8]) -> Result<Vec<u8>, Status> {
        let plain = crate::crypto::Sealer::disabled()
            .open_operand(key, operand)
            .map_err(|e| Status::internal(format!("etcdserver: compare operand: {e}")))?;
        self.sealer.seal_operand(key, &plain).map_err(|e| {
            self.metrics
                .crypto_errors
                .with_label_values(&["encrypt"])
                .inc();
            Status::internal(format!(
                "etcdserver: encrypting a compare operand failed: {e}"
            ))
        })
    }

    /// Refuses requests larger than `--max-request-bytes` (measured as encoded on the wire).
    pub fn check_size(&self, msg: &impl prost::Message) -> Result<(), Status> {
        if msg.encoded_len() > self.limits.max_request_bytes {
            return Err(status::invalid(status::REQUEST_TOO_LARGE));
        }
        Ok(())
    }

    /// Refuses writes while the database is over its quota.
    pub fn check_space(&self) -> Result<(), Status> {
        if self.nospace.load(Ordering::Relaxed) {
            return Err(Status::resource_exhausted(status::NO_SPACE));
        }
        Ok(())
    }

    /// Proposes a command for `caller` and returns its output and revision, mapping refusals
    /// to statuses. `None` is the leader's own housekeeping (lease expiry), which a follower
    /// cannot forward.
    pub async fn propose(
        &self,
        caller: Option<&Caller>,
        key: Option<SealKey>,
        command: Command,
    ) -> Result<(ApplyOutput, i64), Status> {
        let proposal = Proposal {
            principal: caller.map(|c| c.principal.clone()),
            key,
            command,
        };
        let credential = caller.map(|c| c.credential.clone());
        let Proposed { response, .. } = self
            .consensus
            .propose(proposal, credential)
            .await
            .map_err(|e| {
                self.metrics.proposals_failed.inc();
                status::from_propose(&e)
            })?;
        match response.result {
            Ok(out) => Ok((out, response.revision)),
            Err(e) => {
                if matches!(e, crate::model::ApplyError::PermissionDenied) {
                    self.metrics.permission_denials.inc();
                }
                Err(status::from_apply(&e))
            }
        }
    }

    /// Requires the administrator role (membership, compaction, maintenance).
    pub fn require_admin(&self, principal: &Principal) -> Result<(), Status> {
        if self.grants(principal).root {
            Ok(())
        } else {
            self.metrics.permission_denials.inc();
            Err(status::denied())
        }
    }
}
