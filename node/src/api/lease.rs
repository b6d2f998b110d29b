//! etcd's Lease service. Leases live in the replicated state; their expiry is kept by the
//! leader's clock: keep-alives and time-to-live queries go to the leader, which revokes expired
//! leases through Raft. A new leader restarts every lease's full TTL, as etcd does.

use super::{Api, status};
use crate::consensus::{Consensus, LeaderHandler};
use crate::model::{ApplyOutput, Command, MAX_LEASE_TTL, PermType};
use crate::storage::mvcc::Authorizer;
use futures::{Stream, StreamExt};
use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::etcdserverpb::lease_server::Lease;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeSet, HashMap};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Serialize, Deserialize)]
enum LeaderRequest {
    KeepAlive(i64),
    TimeToLive(i64),
}

pub use crate::model::LeaseChange;

/// The leases as the state machine holds them, kept in step with it by `LeaseChange`s, and
/// while this member leads, each lease's deadline. Every operation costs O(log n) in the number
/// of leases: a keep-alive never reads them all.
#[derive(Default)]
struct Clock {
    /// Granted TTLs of the stored leases (mirrors the state machine once `loaded`).
    ttls: HashMap<i64, i64>,
    loaded: bool,
    /// The term whose leadership the deadlines belong to (0: none kept).
    term: u64,
    deadlines: HashMap<i64, Instant>,
    /// The same deadlines in time order (entries whose lease moved on are skipped lazily).
    queue: BTreeSet<(Instant, i64)>,
}

impl Clock {
    fn set_deadline(&mut self, id: i64, at: Instant) {
        self.deadlines.insert(id, at);
        self.queue.insert((at, id));
    }

    fn apply(&mut self, change: LeaseChange) {
        match change {
            LeaseChange::Granted { id, ttl } => {
                self.ttls.insert(id, ttl);
                if self.term != 0 {
                    self.set_deadline(id, deadline(Instant::now(), ttl));
                }
            }
            LeaseChange::Revoked { id } => {
                self.ttls.remove(&id);
                self.deadlines.remove(&id);
            }
            LeaseChange::Reset => {
                self.loaded = false;
                self.term = 0;
                self.deadlines.clear();
                self.queue.clear();
            }
        }
    }
}

/// When a lease granted `ttl` seconds at `now` expires. TTLs are bounded when granted, but a
/// deadline past what the clock can represent still means "not in this process's lifetime",
/// never an overflow.
fn deadline(now: Instant, ttl: i64) -> Instant {
    let ttl = Duration::from_secs(ttl.clamp(0, MAX_LEASE_TTL) as u64);
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// Locks a mutex even if a thread panicked while holding it: a half-updated clock is reset and
/// rebuilt from the replicated leases.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The lease clock, shared by the state machine's hook and the `LeaseKeeper`.
#[derive(Clone, Default)]
pub struct LeaseClock(Arc<Mutex<Clock>>);

impl LeaseClock {
    /// What the state machine calls after applying a lease change.
    pub fn hook(&self) -> Arc<dyn Fn(LeaseChange) + Send + Sync> {
        let clock = self.0.clone();
        Arc::new(move |change| lock(&clock).apply(change))
    }
}

/// The leader's expiry clock for leases.
#[derive(Clone)]
pub struct LeaseKeeper {
    consensus: Consensus,
    clock: Arc<Mutex<Clock>>,
    pub min_ttl: i64,
}

impl LeaseKeeper {
    pub fn new(consensus: Consensus, election_timeout: Duration, clock: LeaseClock) -> LeaseKeeper {
        // etcd's minimum: one and a half election timeouts, so a lease survives a leader change.
        let min_ttl = ((election_timeout.as_millis() as i64 * 3 / 2) + 999) / 1000;
        LeaseKeeper {
            consensus,
            clock: clock.0,
            min_ttl: min_ttl.max(1),
        }
    }

    /// The handler consensus runs on the leader for keep-alives and TTL queries.
    pub fn leader_handler(&self) -> LeaderHandler {
        let this = self.clone();
        Arc::new(move |data: Vec<u8>| {
            let this = this.clone();
            Box::pin(async move {
                let req: LeaderRequest =
                    postcard::from_bytes(&data).map_err(|e| format!("bad lease request: {e}"))?;
                let ttl = match req {
                    LeaderRequest::KeepAlive(id) => this.renew_local(id),
                    LeaderRequest::TimeToLive(id) => this.remaining_local(id),
                }
                .map_err(|e| e.to_string())?;
                postcard::to_stdvec(&ttl).map_err(|e| e.to_string())
            })
        })
    }

    /// The clock, loaded from the store if needed, and with fresh deadlines if this member
    /// became leader in a new term (a new leader restarts every lease's full TTL, as etcd's).
    fn synced(&self) -> Result<std::sync::MutexGuard<'_, Clock>, crate::storage::StorageError> {
        let mut c = lock(&self.clock);
        if !c.loaded {
            let view = self.consensus.store().read_view()?;
            c.ttls = view.leases()?.into_iter().collect();
            c.loaded = true;
            c.term = 0;
        }
        let term = self.consensus.term();
        if c.term != term {
            c.term = term;
            c.deadlines.clear();
            c.queue.clear();
            let now = Instant::now();
            let all: Vec<(i64, i64)> = c.ttls.iter().map(|(id, ttl)| (*id, *ttl)).collect();
            for (id, ttl) in all {
                c.set_deadline(id, deadline(now, ttl));
            }
        }
        Ok(c)
    }

    /// How many leases exist.
    pub fn count(&self) -> Result<usize, crate::storage::StorageError> {
        Ok(self.synced()?.ttls.len())
    }

    fn renew_local(&self, id: i64) -> Result<i64, crate::storage::StorageError> {
        let mut c = self.synced()?;
        let Some(ttl) = c.ttls.get(&id).copied() else {
            return Ok(0);
        };
        c.set_deadline(id, deadline(Instant::now(), ttl));
        Ok(ttl)
    }

    fn remaining_local(&self, id: i64) -> Result<i64, crate::storage::StorageError> {
        let c = self.synced()?;
        Ok(match c.deadlines.get(&id) {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .as_secs_f64()
                .ceil() as i64,
            None => -1,
        })
    }

    /// Leases whose deadline passed (each once per expiry: revoking takes a round of Raft).
    fn expired(&self) -> Result<Vec<i64>, crate::storage::StorageError> {
        let mut c = self.synced()?;
        let now = Instant::now();
        let mut out = Vec::new();
        while let Some(&(at, id)) = c.queue.first() {
            if at > now {
                break;
            }
            c.queue.pop_first();
            if c.deadlines.get(&id) == Some(&at) {
                out.push(id);
                // Retried after an election timeout if the revoke does not land.
                let retry = now + Duration::from_secs(1);
                c.set_deadline(id, retry);
            }
        }
        Ok(out)
    }

    /// Renews lease `id` on the leader; its TTL, or 0 if it does not exist.
    pub async fn keep_alive(&self, id: i64) -> Result<i64, Status> {
        self.ask_leader(LeaderRequest::KeepAlive(id)).await
    }

    async fn ask_leader(&self, req: LeaderRequest) -> Result<i64, Status> {
        let data = postcard::to_stdvec(&req).map_err(|e| Status::internal(e.to_string()))?;
        let resp = self
            .consensus
            .call_leader(data)
            .await
            .map_err(|e| status::from_propose(&e))?;
        postcard::from_bytes(&resp).map_err(|e| Status::internal(e.to_string()))
    }

    /// Revokes expired leases while this node leads. Runs until the process ends (under
    /// `supervise`, which restarts it should it ever panic).
    pub async fn run_expiry(self, api: Api) {
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        loop {
            tick.tick().await;
            if !self.consensus.is_leader() {
                let mut c = lock(&self.clock);
                c.term = 0;
                c.deadlines.clear();
                c.queue.clear();
                continue;
            }
            let Ok(expired) = self.expired() else {
                continue;
            };
            for id in expired {
                match api.propose(None, None, Command::LeaseRevoke { id }).await {
                    Ok(_) => tracing::info!(lease = id, "lease expired and was revoked"),
                    Err(s) => {
                        tracing::warn!(lease = id, error = %s.message(), "revoking an expired lease")
                    }
                }
            }
        }
    }
}

pub struct LeaseService {
    api: Api,
}

impl LeaseService {
    pub fn new(api: Api) -> LeaseService {
        LeaseService { api }
    }
}

type KeepAliveStream =
    Pin<Box<dyn Stream<Item = Result<pb::LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for LeaseService {
    async fn lease_grant(
        &self,
        req: Request<pb::LeaseGrantRequest>,
    ) -> Result<Response<pb::LeaseGrantResponse>, Status> {
        let caller = Api::caller(&req)?;
        let r = req.into_inner();
        // Leases hold state on every member (and a deadline on the leader): a grant is a write.
        self.api.check_space()?;
        let count = self
            .api
            .leases
            .count()
            .map_err(|e| status::from_storage(&e))?;
        if count >= self.api.limits.max_leases {
            return Err(Status::resource_exhausted(format!(
                "etcdserver: the cluster holds {count} leases, its limit (--max-leases); revoke some first"
            )));
        }
        if r.ttl > MAX_LEASE_TTL {
            return Err(Status::out_of_range(
                crate::model::ApplyError::LeaseTtlTooLarge.to_string(),
            ));
        }
        let id = if r.id == 0 {
            (rand::random::<u64>() >> 1).max(1) as i64
        } else {
            r.id
        };
        if id < 0 {
            return Err(status::invalid("etcdserver: lease ID must be positive"));
        }
        let ttl = r.ttl.max(self.api.leases.min_ttl);
        let (out, rev) = self
            .api
            .propose(Some(&caller), None, Command::LeaseGrant { id, ttl })
            .await?;
        let ApplyOutput::LeaseGranted { id, ttl } = out else {
            return Err(Status::internal("unexpected lease grant result"));
        };
        Ok(Response::new(pb::LeaseGrantResponse {
            header: self.api.header(rev),
            id,
            ttl,
            error: String::new(),
        }))
    }

    async fn lease_revoke(
        &self,
        req: Request<pb::LeaseRevokeRequest>,
    ) -> Result<Response<pb::LeaseRevokeResponse>, Status> {
        let caller = Api::caller(&req)?;
        let id = req.into_inner().id;
        let (_, rev) = self
            .api
            .propose(Some(&caller), None, Command::LeaseRevoke { id })
            .await?;
        Ok(Response::new(pb::LeaseRevokeResponse {
            header: self.api.header(rev),
        }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        req: Request<Streaming<pb::LeaseKeepAliveRequest>>,
    ) -> Result<Response<Self::LeaseKeepAliveStream>, Status> {
        Api::principal(&req)?;
        let api = self.api.clone();
        // The stream ends when the member stops, so its client moves to another at once.
        let out = req
            .into_inner()
            .take_until(self.api.stopped())
            .then(move |item| {
                let api = api.clone();
                async move {
                    let r = item?;
                    let ttl = api
                        .leases
                        .ask_leader(LeaderRequest::KeepAlive(r.id))
                        .await?;
                    let rev = api
                        .consensus
                        .store()
                        .revisions()
                        .map(|(r, _)| r)
                        .unwrap_or(0);
                    Ok(pb::LeaseKeepAliveResponse {
                        header: api.header(rev),
                        id: r.id,
                        ttl,
                    })
                }
            });
        Ok(Response::new(Box::pin(out)))
    }

    async fn lease_time_to_live(
        &self,
        req: Request<pb::LeaseTimeToLiveRequest>,
    ) -> Result<Response<pb::LeaseTimeToLiveResponse>, Status> {
        let principal = Api::principal(&req)?;
        let r = req.into_inner();
        let ttl = self
            .api
            .leases
            .ask_leader(LeaderRequest::TimeToLive(r.id))
            .await?;
        let view = self
            .api
            .consensus
            .store()
            .read_view()
            .map_err(|e| status::from_storage(&e))?;
        let granted = view
            .leases()
            .map_err(|e| status::from_storage(&e))?
            .into_iter()
            .find(|(id, _)| *id == r.id)
            .map(|(_, t)| t);
        let keys = if r.keys && granted.is_some() {
            let keys = view
                .lease_keys(r.id)
                .map_err(|e| status::from_storage(&e))?;
            // Key names are data too: listing them needs read permission on every one, as in
            // etcd since CVE-2023-32082.
            let grants = self.api.grants(&principal);
            if !keys.iter().all(|k| grants.permits(PermType::Read, k, b"")) {
                self.api.metrics.permission_denials.inc();
                return Err(status::denied());
            }
            keys
        } else {
            Vec::new()
        };
        let rev = view.revision;
        drop(view);
        Ok(Response::new(pb::LeaseTimeToLiveResponse {
            header: self.api.header(rev),
            id: r.id,
            ttl: if granted.is_some() { ttl } else { -1 },
            granted_ttl: granted.unwrap_or(0),
            keys,
        }))
    }

    async fn lease_leases(
        &self,
        req: Request<pb::LeaseLeasesRequest>,
    ) -> Result<Response<pb::LeaseLeasesResponse>, Status> {
        // A lease id is what it takes to keep a lease (and the locks and elections on it)
        // alive: only administrators may list them.
        let principal = Api::principal(&req)?;
        self.api.require_admin(&principal)?;
        let view = self
            .api
            .consensus
            .store()
            .read_view()
            .map_err(|e| status::from_storage(&e))?;
        let leases = view
            .leases()
            .map_err(|e| status::from_storage(&e))?
            .into_iter()
            .map(|(id, _)| pb::LeaseStatus { id })
            .collect();
        let rev = view.revision;
        drop(view);
        Ok(Response::new(pb::LeaseLeasesResponse {
            header: self.api.header(rev),
            leases,
        }))
    }
}
