//! etcd's Lock service (`v3lockpb.Lock`): a lock is the oldest key under its name, held as long
//! as the caller's lease lives (see `coordination`).

use super::coordination::ReleaseOnDrop;
use super::{Api, status};
use raftkv_proto::v3lockpb as pb;
use raftkv_proto::v3lockpb::lock_server::Lock;
use tonic::{Request, Response, Status};

pub struct LockService {
    api: Api,
}

impl LockService {
    pub fn new(api: Api) -> LockService {
        LockService { api }
    }
}

#[tonic::async_trait]
impl Lock for LockService {
    async fn lock(
        &self,
        req: Request<pb::LockRequest>,
    ) -> Result<Response<pb::LockResponse>, Status> {
        let caller = Api::caller(&req)?;
        let r = req.into_inner();
        if r.lease == 0 {
            return Err(status::invalid("etcdserver: a lock needs a lease"));
        }
        let claim = self.api.claim(&caller, &r.name, r.lease, b"").await?;
        // From here on the key is ours to clean up if the caller gives up waiting.
        let guard = ReleaseOnDrop::new(&self.api, &caller, &claim);
        self.api
            .wait_turn(&caller, &r.name, claim.rev, r.lease)
            .await?;
        // The key may have gone with its lease while we waited.
        let owner = self.api.first_created(&caller, &r.name, true).await?;
        if owner.map(|kv| kv.create_revision) != Some(claim.rev) {
            return Err(Status::failed_precondition(
                "etcdserver: the lock's lease expired while waiting for the lock",
            ));
        }
        guard.keep();
        let rev = self
            .api
            .consensus
            .store()
            .revisions()
            .map(|(r, _)| r)
            .unwrap_or(0);
        Ok(Response::new(pb::LockResponse {
            header: self.api.header(rev),
            key: claim.key,
        }))
    }

    async fn unlock(
        &self,
        req: Request<pb::UnlockRequest>,
    ) -> Result<Response<pb::UnlockResponse>, Status> {
        let caller = Api::caller(&req)?;
        self.api.check_size(req.get_ref())?;
        let key = req.into_inner().key;
        if key.is_empty() {
            return Err(status::invalid(status::EMPTY_KEY));
        }
        let t = crate::model::TxnRequest {
            success: vec![crate::model::RequestOp::Delete(
                crate::model::DeleteRequest {
                    key,
                    ..Default::default()
                },
            )],
            ..Default::default()
        };
        let (_, rev) = self.api.write_txn(&caller, &t).await?;
        Ok(Response::new(pb::UnlockResponse {
            header: self.api.header(rev),
        }))
    }
}
