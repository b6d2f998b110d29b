//! etcd's KV service: Range, Put, DeleteRange, Txn, Compact.
//!
//! Writes are sealed (encrypted) here and proposed to Raft; permission checks for writes happen
//! in the state machine. Reads are served from this node's state after a read barrier
//! (linearizable) or immediately (serializable), with permissions checked against the roles in
//! that same state.

use super::convert;
use super::{Api, status, validate};
use crate::model::{ApplyOutput, Command, CompareTarget, PermType, RequestOp, TxnRequest};
use crate::storage::mvcc::{self, Authorizer};
use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::etcdserverpb::kv_server::Kv;
use tonic::{Request, Response, Status};

pub struct KvService {
    api: Api,
}

impl KvService {
    pub fn new(api: Api) -> KvService {
        KvService { api }
    }
}

/// Seals every put value and every VALUE compare operand in a transaction, on every path.
fn seal_txn(api: &Api, t: &mut TxnRequest) -> Result<(), Status> {
    for c in &mut t.compare {
        if let CompareTarget::Value(operand) = &mut c.target {
            *operand = api.seal_operand(&c.key, operand)?;
        }
    }
    for op in t.success.iter_mut().chain(t.failure.iter_mut()) {
        match op {
            RequestOp::Put(p) if !p.ignore_value => p.value = api.seal(&p.key, &p.value)?,
            RequestOp::Txn(inner) => seal_txn(api, inner)?,
            _ => {}
        }
    }
    Ok(())
}

fn all_ranges_serializable(t: &pb::TxnRequest) -> bool {
    use pb::request_op::Request as R;
    t.success
        .iter()
        .chain(t.failure.iter())
        .all(|op| match &op.request {
            Some(R::RequestRange(r)) => r.serializable,
            Some(R::RequestTxn(inner)) => all_ranges_serializable(inner),
            _ => true,
        })
}

impl KvService {
    fn opener(&self) -> impl Fn(&[u8], Vec<u8>) -> Result<Vec<u8>, Status> + '_ {
        move |k: &[u8], v: Vec<u8>| self.api.open(k, v)
    }
}

impl Api {
    /// Serves a range for `principal`: linearizable unless `serializable`, permission checked
    /// against the roles in the state it reads. Values stay sealed in the result.
    pub async fn read_range(
        &self,
        principal: &crate::model::Principal,
        r: &crate::model::RangeRequest,
        serializable: bool,
        budget: &mut crate::storage::mvcc::Budget,
    ) -> Result<crate::model::RangeResult, Status> {
        if !serializable {
            self.linearize().await?;
        }
        let view = self
            .consensus
            .store()
            .read_view()
            .map_err(|e| status::from_storage(&e))?;
        self.check_token(principal)?;
        if !self
            .grants(principal)
            .permits(PermType::Read, &r.key, &r.range_end)
        {
            self.metrics.permission_denials.inc();
            return Err(status::denied());
        }
        view.range(r, &self.sealer, budget)
            .map_err(|e| status::from_read(&e))
    }

    /// Seals and proposes a write transaction for `caller`; returns its result (values still
    /// sealed) and the revision after it.
    pub async fn write_txn(
        &self,
        caller: &crate::auth::Caller,
        t: &TxnRequest,
    ) -> Result<(crate::model::TxnResult, i64), Status> {
        self.check_space()?;
        let key = self.sealing_key()?;
        let mut sealed = t.clone();
        seal_txn(self, &mut sealed)?;
        let (out, revision) = self
            .propose(Some(caller), key, Command::Txn(sealed))
            .await?;
        match out {
            ApplyOutput::Txn(result) => Ok((result, revision)),
            _ => Err(Status::internal("unexpected txn result")),
        }
    }
}

#[tonic::async_trait]
impl Kv for KvService {
    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let principal = Api::principal(&req)?;
        let raw = req.into_inner();
        let serializable = raw.serializable;
        let r = convert::range_in(raw)?;
        // Held until the response is built: it counts what this read keeps in memory.
        let mut budget = self.api.read_budget();
        let result = self
            .api
            .read_range(&principal, &r, serializable, &mut budget)
            .await?;
        let header = self.api.header(result.revision);
        let open = self.opener();
        Ok(Response::new(convert::range_out(
            result,
            header,
            r.keys_only,
            &open,
        )?))
    }

    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let caller = Api::caller(&req)?;
        self.api.check_size(req.get_ref())?;
        self.api.check_space()?;
        let mut p = convert::put_in(req.into_inner())?;
        let key = if p.ignore_value {
            None
        } else {
            let key = self.api.sealing_key()?;
            p.value = self.api.seal(&p.key, &p.value)?;
            key
        };
        let (out, revision) = self
            .api
            .propose(Some(&caller), key, Command::Put(p))
            .await?;
        let ApplyOutput::Put(result) = out else {
            return Err(Status::internal("unexpected put result"));
        };
        let open = self.opener();
        Ok(Response::new(convert::put_out(
            result,
            self.api.header(revision),
            &open,
        )?))
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let caller = Api::caller(&req)?;
        self.api.check_size(req.get_ref())?;
        let d = convert::delete_in(req.into_inner())?;
        let (out, revision) = self
            .api
            .propose(Some(&caller), None, Command::Delete(d))
            .await?;
        let ApplyOutput::Delete(result) = out else {
            return Err(Status::internal("unexpected delete result"));
        };
        let open = self.opener();
        Ok(Response::new(convert::delete_out(
            result,
            self.api.header(revision),
            &open,
        )?))
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let caller = Api::caller(&req)?;
        self.api.check_size(req.get_ref())?;
        let raw = req.into_inner();
        let serializable = all_ranges_serializable(&raw);
        let t = convert::txn_in(raw)?;
        validate::check_txn(
            &t,
            self.api.limits.max_txn_ops,
            self.api.limits.max_txn_total_ops,
        )?;
        let open = self.opener();
        if mvcc::txn_is_read_only(&t) {
            if !serializable {
                self.api.linearize().await?;
            }
            let view = self
                .api
                .consensus
                .store()
                .read_view()
                .map_err(|e| status::from_storage(&e))?;
            self.api.check_token(&caller.principal)?;
            let grants = self.api.grants(&caller.principal);
            if !mvcc::authorize_op(&grants, &RequestOp::Txn(t.clone())) {
                self.api.metrics.permission_denials.inc();
                return Err(status::denied());
            }
            let mut budget = self.api.read_budget();
            let result = view
                .read_txn(&t, &self.api.sealer, &mut budget)
                .map_err(|e| status::from_read(&e))?;
            let revision = view.revision;
            drop(view);
            let out = convert::txn_out(result, &t, self.api.header(revision), &open)?;
            drop(budget);
            return Ok(Response::new(out));
        }
        let (result, revision) = self.api.write_txn(&caller, &t).await?;
        Ok(Response::new(convert::txn_out(
            result,
            &t,
            self.api.header(revision),
            &open,
        )?))
    }

    async fn compact(
        &self,
        req: Request<pb::CompactionRequest>,
    ) -> Result<Response<pb::CompactionResponse>, Status> {
        let caller = Api::caller(&req)?;
        let revision = req.into_inner().revision;
        let (_, rev) = self
            .api
            .propose(Some(&caller), None, Command::Compact { revision })
            .await?;
        tracing::info!(revision, "compacted");
        Ok(Response::new(pb::CompactionResponse {
            header: self.api.header(rev),
        }))
    }
}
