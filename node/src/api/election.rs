//! etcd's Election service (`v3electionpb.Election`): candidates hold keys under the election's
//! name; the oldest is the leader and its value the proclamation (see `coordination`). "No
//! leader" and "not leader" carry the messages of etcd's `concurrency` package, with the code
//! etcd's server sends them with (Unknown), since etcd clients match on them.

use super::coordination::{ReleaseOnDrop, claim_key};
use super::{Api, status};
use crate::auth::Caller;
use crate::model::{Compare, CompareResult, CompareTarget, PutRequest, RequestOp, TxnRequest};
use futures::Stream;
use raftkv_proto::v3electionpb as pb;
use raftkv_proto::v3electionpb::election_server::Election;
use std::pin::Pin;
use tonic::{Request, Response, Status};

pub const NOT_LEADER: &str = "election: not leader";
pub const NO_LEADER: &str = "election: no leader";

pub struct ElectionService {
    api: Api,
}

impl ElectionService {
    pub fn new(api: Api) -> ElectionService {
        ElectionService { api }
    }

    fn current(&self) -> i64 {
        self.api
            .consensus
            .store()
            .revisions()
            .map(|(r, _)| r)
            .unwrap_or(0)
    }
}

/// Puts `value` on the leader key if it is still the one created at `leader.rev`.
async fn proclaim(
    api: &Api,
    caller: &Caller,
    leader: &pb::LeaderKey,
    value: &[u8],
) -> Result<i64, Status> {
    let t = TxnRequest {
        compare: vec![Compare {
            result: CompareResult::Equal,
            target: CompareTarget::Create(leader.rev),
            key: leader.key.clone(),
            range_end: Vec::new(),
        }],
        success: vec![RequestOp::Put(PutRequest {
            key: leader.key.clone(),
            value: value.to_vec(),
            lease: leader.lease,
            ..Default::default()
        })],
        failure: vec![],
    };
    let (result, rev) = api.write_txn(caller, &t).await?;
    if !result.succeeded {
        return Err(Status::unknown(NOT_LEADER));
    }
    Ok(rev)
}

type ObserveStream = Pin<Box<dyn Stream<Item = Result<pb::LeaderResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Election for ElectionService {
    async fn campaign(
        &self,
        req: Request<pb::CampaignRequest>,
    ) -> Result<Response<pb::CampaignResponse>, Status> {
        let caller = Api::caller(&req)?;
        let r = req.into_inner();
        if r.lease == 0 {
            return Err(status::invalid("etcdserver: a campaign needs a lease"));
        }
        let claim = self.api.claim(&caller, &r.name, r.lease, &r.value).await?;
        let guard = ReleaseOnDrop::new(&self.api, &caller, &claim);
        let leader = pb::LeaderKey {
            name: r.name.clone(),
            key: claim.key.clone(),
            rev: claim.rev,
            lease: r.lease,
        };
        if !claim.value_current {
            proclaim(&self.api, &caller, &leader, &r.value).await?;
        }
        self.api
            .wait_turn(&caller, &r.name, claim.rev, r.lease)
            .await?;
        let owner = self.api.first_created(&caller, &r.name, true).await?;
        if owner.map(|kv| kv.create_revision) != Some(claim.rev) {
            return Err(Status::failed_precondition(
                "etcdserver: the campaign's lease expired while waiting to lead",
            ));
        }
        guard.keep();
        Ok(Response::new(pb::CampaignResponse {
            header: self.api.header(self.current()),
            leader: Some(leader),
        }))
    }

    async fn proclaim(
        &self,
        req: Request<pb::ProclaimRequest>,
    ) -> Result<Response<pb::ProclaimResponse>, Status> {
        let caller = Api::caller(&req)?;
        self.api.check_size(req.get_ref())?;
        let r = req.into_inner();
        let leader = r
            .leader
            .ok_or_else(|| status::invalid("etcdserver: no leader key given"))?;
        let rev = proclaim(&self.api, &caller, &leader, &r.value).await?;
        Ok(Response::new(pb::ProclaimResponse {
            header: self.api.header(rev),
        }))
    }

    async fn leader(
        &self,
        req: Request<pb::LeaderRequest>,
    ) -> Result<Response<pb::LeaderResponse>, Status> {
        let caller = Api::caller(&req)?;
        let name = req.into_inner().name;
        let kv = self
            .api
            .first_created(&caller, &name, false)
            .await?
            .ok_or_else(|| Status::unknown(NO_LEADER))?;
        Ok(Response::new(pb::LeaderResponse {
            header: self.api.header(self.current()),
            kv: Some(self.api.kv_for_client(kv)?),
        }))
    }

    type ObserveStream = ObserveStream;

    async fn observe(
        &self,
        req: Request<pb::LeaderRequest>,
    ) -> Result<Response<Self::ObserveStream>, Status> {
        let caller = Api::caller(&req)?;
        let name = req.into_inner().name;
        // Read permission is checked now, and again on every read below.
        self.api.first_created(&caller, &name, false).await?;
        let api = self.api.clone();
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let stopped = self.api.stopped();
        tokio::spawn(async move {
            tokio::pin!(stopped);
            let mut last: Option<(i64, i64)> = None;
            loop {
                // Registered before reading, so a change in between wakes the next round.
                let changed = api.name_changed(&name);
                match api.first_created(&caller, &name, true).await {
                    Ok(Some(kv)) => {
                        let id = (kv.create_revision, kv.mod_revision);
                        if last != Some(id) {
                            last = Some(id);
                            let resp = api.kv_for_client(kv).map(|kv| pb::LeaderResponse {
                                header: api.header(kv.mod_revision),
                                kv: Some(kv),
                            });
                            if tx.send(resp).await.is_err() {
                                return;
                            }
                        }
                    }
                    Ok(None) => {}
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                }
                tokio::select! {
                    _ = changed => {}
                    _ = tx.closed() => return,
                    _ = &mut stopped => {
                        let _ = tx.send(Err(Status::unavailable(super::status::STOPPED))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }

    async fn resign(
        &self,
        req: Request<pb::ResignRequest>,
    ) -> Result<Response<pb::ResignResponse>, Status> {
        let caller = Api::caller(&req)?;
        let leader = req
            .into_inner()
            .leader
            .ok_or_else(|| status::invalid("etcdserver: no leader key given"))?;
        if leader.key != claim_key(&leader.name, leader.lease) {
            return Err(status::invalid(
                "etcdserver: the leader key is not this election's key for that lease",
            ));
        }
        self.api.release(&caller, &leader.key, leader.rev).await?;
        Ok(Response::new(pb::ResignResponse {
            header: self.api.header(self.current()),
        }))
    }
}
