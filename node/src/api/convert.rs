//! Conversions between the etcd wire types and raftkv's model, with the checks etcd makes on
//! the way in (unknown enum values, empty keys) and value decryption on the way out.

use super::status::{self, invalid};
use crate::model::*;
use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::mvccpb;
use tonic::Status;

/// Opens a stored value for a response.
pub type Open<'a> = &'a dyn Fn(&[u8], Vec<u8>) -> Result<Vec<u8>, Status>;

pub fn range_in(r: pb::RangeRequest) -> Result<RangeRequest, Status> {
    if r.key.is_empty() {
        return Err(invalid(status::EMPTY_KEY));
    }
    let sort_order = match pb::range_request::SortOrder::try_from(r.sort_order) {
        Ok(pb::range_request::SortOrder::None) => SortOrder::None,
        Ok(pb::range_request::SortOrder::Ascend) => SortOrder::Ascend,
        Ok(pb::range_request::SortOrder::Descend) => SortOrder::Descend,
        Err(_) => return Err(invalid(status::INVALID_SORT)),
    };
    let sort_target = match pb::range_request::SortTarget::try_from(r.sort_target) {
        Ok(pb::range_request::SortTarget::Key) => SortTarget::Key,
        Ok(pb::range_request::SortTarget::Version) => SortTarget::Version,
        Ok(pb::range_request::SortTarget::Create) => SortTarget::Create,
        Ok(pb::range_request::SortTarget::Mod) => SortTarget::Mod,
        Ok(pb::range_request::SortTarget::Value) => SortTarget::Value,
        Err(_) => return Err(invalid(status::INVALID_SORT)),
    };
    Ok(RangeRequest {
        key: r.key,
        range_end: r.range_end,
        limit: r.limit,
        revision: r.revision,
        sort_order,
        sort_target,
        keys_only: r.keys_only,
        count_only: r.count_only,
        min_mod_revision: r.min_mod_revision,
        max_mod_revision: r.max_mod_revision,
        min_create_revision: r.min_create_revision,
        max_create_revision: r.max_create_revision,
    })
}

pub fn put_in(r: pb::PutRequest) -> Result<PutRequest, Status> {
    if r.key.is_empty() {
        return Err(invalid(status::EMPTY_KEY));
    }
    if r.ignore_value && !r.value.is_empty() {
        return Err(invalid(status::VALUE_PROVIDED));
    }
    if r.ignore_lease && r.lease != 0 {
        return Err(invalid(status::LEASE_PROVIDED));
    }
    Ok(PutRequest {
        key: r.key,
        value: r.value,
        lease: r.lease,
        prev_kv: r.prev_kv,
        ignore_value: r.ignore_value,
        ignore_lease: r.ignore_lease,
    })
}

pub fn delete_in(r: pb::DeleteRangeRequest) -> Result<DeleteRequest, Status> {
    if r.key.is_empty() {
        return Err(invalid(status::EMPTY_KEY));
    }
    Ok(DeleteRequest {
        key: r.key,
        range_end: r.range_end,
        prev_kv: r.prev_kv,
    })
}

fn compare_in(c: pb::Compare) -> Result<Compare, Status> {
    use pb::compare::{CompareResult as R, CompareTarget as T, TargetUnion as U};
    if c.key.is_empty() {
        return Err(invalid(status::EMPTY_KEY));
    }
    let result = match R::try_from(c.result) {
        Ok(R::Equal) => CompareResult::Equal,
        Ok(R::Greater) => CompareResult::Greater,
        Ok(R::Less) => CompareResult::Less,
        Ok(R::NotEqual) => CompareResult::NotEqual,
        Err(_) => {
            return Err(invalid(&format!(
                "etcdserver: unknown compare result {} (expected EQUAL, GREATER, LESS or NOT_EQUAL)",
                c.result
            )));
        }
    };
    let num = |u: &Option<U>| match u {
        Some(U::Version(v))
        | Some(U::CreateRevision(v))
        | Some(U::ModRevision(v))
        | Some(U::Lease(v)) => *v,
        _ => 0,
    };
    let target = match T::try_from(c.target) {
        Ok(T::Version) => CompareTarget::Version(num(&c.target_union)),
        Ok(T::Create) => CompareTarget::Create(num(&c.target_union)),
        Ok(T::Mod) => CompareTarget::Mod(num(&c.target_union)),
        Ok(T::Lease) => CompareTarget::Lease(num(&c.target_union)),
        // Operands are kept as envelopes, like stored values: the write path seals them
        // before they enter the log.
        Ok(T::Value) => {
            CompareTarget::Value(crate::crypto::envelope::plain(&match c.target_union {
                Some(U::Value(v)) => v,
                _ => Vec::new(),
            }))
        }
        Err(_) => {
            return Err(invalid(&format!(
                "etcdserver: unknown compare target {} (expected VERSION, CREATE, MOD, VALUE or LEASE)",
                c.target
            )));
        }
    };
    Ok(Compare {
        result,
        target,
        key: c.key,
        range_end: c.range_end,
    })
}

fn op_in(op: pb::RequestOp) -> Result<RequestOp, Status> {
    use pb::request_op::Request as R;
    match op.request {
        Some(R::RequestRange(r)) => Ok(RequestOp::Range(range_in(r)?)),
        Some(R::RequestPut(p)) => Ok(RequestOp::Put(put_in(p)?)),
        Some(R::RequestDeleteRange(d)) => Ok(RequestOp::Delete(delete_in(d)?)),
        Some(R::RequestTxn(t)) => Ok(RequestOp::Txn(txn_in(t)?)),
        None => Err(invalid(
            "etcdserver: a txn operation is empty (no range, put, delete or txn)",
        )),
    }
}

pub fn txn_in(t: pb::TxnRequest) -> Result<TxnRequest, Status> {
    Ok(TxnRequest {
        compare: t
            .compare
            .into_iter()
            .map(compare_in)
            .collect::<Result<_, _>>()?,
        success: t.success.into_iter().map(op_in).collect::<Result<_, _>>()?,
        failure: t.failure.into_iter().map(op_in).collect::<Result<_, _>>()?,
    })
}

pub fn kv_out(kv: KeyValue, open: Open<'_>) -> Result<mvccpb::KeyValue, Status> {
    let value = if kv.value.is_empty() {
        Vec::new()
    } else {
        open(&kv.key, kv.value)?
    };
    Ok(mvccpb::KeyValue {
        key: kv.key,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        version: kv.version,
        value,
        lease: kv.lease,
    })
}

pub fn range_out(
    r: RangeResult,
    header: Option<pb::ResponseHeader>,
    keys_only: bool,
    open: Open<'_>,
) -> Result<pb::RangeResponse, Status> {
    let kvs = r
        .kvs
        .into_iter()
        .map(|mut kv| {
            if keys_only {
                kv.value.clear();
            }
            kv_out(kv, open)
        })
        .collect::<Result<_, _>>()?;
    Ok(pb::RangeResponse {
        header,
        kvs,
        more: r.more,
        count: r.count,
    })
}

pub fn put_out(
    r: PutResult,
    header: Option<pb::ResponseHeader>,
    open: Open<'_>,
) -> Result<pb::PutResponse, Status> {
    Ok(pb::PutResponse {
        header,
        prev_kv: r.prev_kv.map(|kv| kv_out(kv, open)).transpose()?,
    })
}

pub fn delete_out(
    r: DeleteResult,
    header: Option<pb::ResponseHeader>,
    open: Open<'_>,
) -> Result<pb::DeleteRangeResponse, Status> {
    Ok(pb::DeleteRangeResponse {
        header,
        deleted: r.deleted,
        prev_kvs: r
            .prev_kvs
            .into_iter()
            .map(|kv| kv_out(kv, open))
            .collect::<Result<_, _>>()?,
    })
}

/// Converts a transaction result. Inner responses carry a header with only the revision, as
/// etcd's do.
pub fn txn_out(
    t: TxnResult,
    req: &TxnRequest,
    header: Option<pb::ResponseHeader>,
    open: Open<'_>,
) -> Result<pb::TxnResponse, Status> {
    use pb::response_op::Response as R;
    let revision = header.as_ref().map(|h| h.revision).unwrap_or(0);
    let inner = || {
        Some(pb::ResponseHeader {
            revision,
            ..Default::default()
        })
    };
    let ops = if t.succeeded {
        &req.success
    } else {
        &req.failure
    };
    let mut responses = Vec::with_capacity(t.responses.len());
    for (resp, op) in t.responses.into_iter().zip(ops.iter()) {
        let r = match (resp, op) {
            (ResponseOp::Range(r), RequestOp::Range(q)) => {
                R::ResponseRange(range_out(r, inner(), q.keys_only, open)?)
            }
            (ResponseOp::Range(r), _) => R::ResponseRange(range_out(r, inner(), false, open)?),
            (ResponseOp::Put(p), _) => R::ResponsePut(put_out(p, inner(), open)?),
            (ResponseOp::Delete(d), _) => R::ResponseDeleteRange(delete_out(d, inner(), open)?),
            (ResponseOp::Txn(t), RequestOp::Txn(q)) => {
                R::ResponseTxn(txn_out(t, q, inner(), open)?)
            }
            (ResponseOp::Txn(t), _) => {
                R::ResponseTxn(txn_out(t, &TxnRequest::default(), inner(), open)?)
            }
        };
        responses.push(pb::ResponseOp { response: Some(r) });
    }
    Ok(pb::TxnResponse {
        header,
        succeeded: t.succeeded,
        responses,
    })
}

pub fn perm_type_in(t: i32) -> Result<PermType, Status> {
    use raftkv_proto::authpb::permission::Type;
    match Type::try_from(t) {
        Ok(Type::Read) => Ok(PermType::Read),
        Ok(Type::Write) => Ok(PermType::Write),
        Ok(Type::Readwrite) => Ok(PermType::ReadWrite),
        Err(_) => Err(invalid(&format!("etcdserver: unknown permission type {t}"))),
    }
}

pub fn perm_out(p: &Permission) -> raftkv_proto::authpb::Permission {
    use raftkv_proto::authpb::permission::Type;
    raftkv_proto::authpb::Permission {
        perm_type: match p.perm_type {
            PermType::Read => Type::Read,
            PermType::Write => Type::Write,
            PermType::ReadWrite => Type::Readwrite,
        } as i32,
        key: p.key.clone(),
        range_end: p.range_end.clone(),
    }
}
