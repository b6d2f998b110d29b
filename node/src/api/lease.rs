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
use std::collections::HashMap;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::{Request, Response, Status, Streaming};

#[derive(Debug, Serialize, Deserialize)]
enum LeaderRequest {
    KeepAlive(i64),
    TimeToLive(i64),
}

#[derive(Default)]
struct Clock {
    /// The term in which `deadlines` was loaded; a new term reloads it.
    term: u64,
    deadlines: HashMap<i64, Instant>,
}

/// When a lease granted `ttl` seconds at `now` expires. TTLs are bounded when granted, but a
/// deadline past what the clock can represent still means "not in this process's lifetime",
/// never an overflow.
fn deadline(now: Instant, ttl: i64) -> Instant {
    let ttl = Duration::from_secs(ttl.clamp(0, MAX_LEASE_TTL) as u64);
    now.checked_add(ttl)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 86_400))
}

/// Locks a mutex even if a thread panicked while holding it: the clock is rebuilt from the
/// replicated leases on every tick, so a half-updated one heals by itself.
fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// The leader's expiry clock for leases.
#[derive(Clone)]
pub struct LeaseKeeper {
    consensus: Consensus,
    clock: Arc<Mutex<Clock>>,
    pub min_ttl: i64,
}

impl LeaseKeeper {
    pub fn new(consensus: Consensus, election_timeout: Duration) -> LeaseKeeper {
        // etcd's minimum: one and a half election timeouts, so a lease survives a leader change.
        let min_ttl = ((election_timeout.as_millis() as i64 * 3 / 2) + 999) / 1000;
        LeaseKeeper {
            consensus,
            clock: Arc::new(Mutex::new(Clock::default())),
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

    /// Granted TTLs from the replicated state.
    fn stored(&self) -> Result<HashMap<i64, i64>, crate::storage::StorageError> {
        let view = self.consensus.store().read_view()?;
        Ok(view.leases()?.into_iter().collect())
    }

    /// Brings the clock in line with the stored leases (new term: full TTL for every lease).
    fn sync_clock(&self) -> Result<HashMap<i64, i64>, crate::storage::StorageError> {
        let stored = self.stored()?;
        let term = self.consensus.term();
        let now = Instant::now();
        let mut c = lock(&self.clock);
        if c.term != term {
            c.term = term;
            c.deadlines.clear();
        }
        c.deadlines.retain(|id, _| stored.contains_key(id));
        for (id, ttl) in &stored {
            c.deadlines
                .entry(*id)
                .or_insert_with(|| deadline(now, *ttl));
        }
        Ok(stored)
    }

    fn renew_local(&self, id: i64) -> Result<i64, crate::storage::StorageError> {
        let stored = self.sync_clock()?;
        let Some(ttl) = stored.get(&id) else {
            return Ok(0);
        };
        lock(&self.clock)
            .deadlines
            .insert(id, deadline(Instant::now(), *ttl));
        Ok(*ttl)
    }

    fn remaining_local(&self, id: i64) -> Result<i64, crate::storage::StorageError> {
        self.sync_clock()?;
        let c = lock(&self.clock);
        Ok(match c.deadlines.get(&id) {
            Some(d) => d
                .saturating_duration_since(Instant::now())
                .as_secs_f64()
                .ceil() as i64,
            None => -1,
        })
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
                continue;
            }
            if self.sync_clock().is_err() {
                continue;
            }
            let now = Instant::now();
            let expired: Vec<i64> = lock(&self.clock)
                .deadlines
                .iter()
                .filter(|(_, d)| **d <= now)
                .map(|(id, _)| *id)
                .collect();
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
        Api::principal(&req)?;
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
