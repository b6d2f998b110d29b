//! Transactions: compares, then the operations of the branch that the compares select.

use crate::pb;
use crate::pb::compare::{CompareResult, CompareTarget, TargetUnion};
use raftkv_proto::mvccpb::KeyValue;

/// How a compare relates the stored value to the operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

impl Cmp {
    fn result(self) -> CompareResult {
        match self {
            Cmp::Equal => CompareResult::Equal,
            Cmp::NotEqual => CompareResult::NotEqual,
            Cmp::Greater => CompareResult::Greater,
            Cmp::Less => CompareResult::Less,
        }
    }
}

/// One condition of a transaction.
#[derive(Debug, Clone)]
pub struct Compare(pub(crate) pb::Compare);

impl Compare {
    fn new(key: Vec<u8>, cmp: Cmp, target: CompareTarget, operand: TargetUnion) -> Compare {
        Compare(pb::Compare {
            result: cmp.result() as i32,
            target: target as i32,
            key,
            target_union: Some(operand),
            range_end: Vec::new(),
        })
    }
    pub fn value(key: impl Into<Vec<u8>>, cmp: Cmp, value: impl Into<Vec<u8>>) -> Compare {
        Compare::new(
            key.into(),
            cmp,
            CompareTarget::Value,
            TargetUnion::Value(value.into()),
        )
    }
    pub fn version(key: impl Into<Vec<u8>>, cmp: Cmp, version: i64) -> Compare {
        Compare::new(
            key.into(),
            cmp,
            CompareTarget::Version,
            TargetUnion::Version(version),
        )
    }
    pub fn create_revision(key: impl Into<Vec<u8>>, cmp: Cmp, rev: i64) -> Compare {
        Compare::new(
            key.into(),
            cmp,
            CompareTarget::Create,
            TargetUnion::CreateRevision(rev),
        )
    }
    pub fn mod_revision(key: impl Into<Vec<u8>>, cmp: Cmp, rev: i64) -> Compare {
        Compare::new(
            key.into(),
            cmp,
            CompareTarget::Mod,
            TargetUnion::ModRevision(rev),
        )
    }
    pub fn lease(key: impl Into<Vec<u8>>, cmp: Cmp, lease: i64) -> Compare {
        Compare::new(
            key.into(),
            cmp,
            CompareTarget::Lease,
            TargetUnion::Lease(lease),
        )
    }
    /// Applies the compare to every key in `[key, range_end)`.
    pub fn with_range_end(mut self, end: impl Into<Vec<u8>>) -> Compare {
        self.0.range_end = end.into();
        self
    }
}

/// One operation of a transaction branch.
#[derive(Debug, Clone)]
pub struct Op(pub(crate) pb::RequestOp);

impl Op {
    pub fn put(key: impl Into<Vec<u8>>, value: impl Into<Vec<u8>>) -> Op {
        Op(pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                key: key.into(),
                value: value.into(),
                ..Default::default()
            })),
        })
    }
    pub fn get(key: impl Into<Vec<u8>>) -> Op {
        Op::range(key.into(), Vec::new())
    }
    pub fn get_prefix(prefix: impl Into<Vec<u8>>) -> Op {
        let p = prefix.into();
        let end = crate::prefix_end(&p);
        Op::range(p, end)
    }
    pub fn range(key: Vec<u8>, range_end: Vec<u8>) -> Op {
        Op(pb::RequestOp {
            request: Some(pb::request_op::Request::RequestRange(pb::RangeRequest {
                key,
                range_end,
                ..Default::default()
            })),
        })
    }
    pub fn delete(key: impl Into<Vec<u8>>) -> Op {
        Op::delete_range(key.into(), Vec::new())
    }
    pub fn delete_prefix(prefix: impl Into<Vec<u8>>) -> Op {
        let p = prefix.into();
        let end = crate::prefix_end(&p);
        Op::delete_range(p, end)
    }
    pub fn delete_range(key: Vec<u8>, range_end: Vec<u8>) -> Op {
        Op(pb::RequestOp {
            request: Some(pb::request_op::Request::RequestDeleteRange(
                pb::DeleteRangeRequest {
                    key,
                    range_end,
                    ..Default::default()
                },
            )),
        })
    }
    pub fn txn(t: Txn) -> Op {
        Op(pb::RequestOp {
            request: Some(pb::request_op::Request::RequestTxn(t.into_request())),
        })
    }

    fn is_read(&self) -> bool {
        match &self.0.request {
            Some(pb::request_op::Request::RequestRange(_)) => true,
            Some(pb::request_op::Request::RequestTxn(t)) => txn_read_only(t),
            _ => false,
        }
    }
}

fn txn_read_only(t: &pb::TxnRequest) -> bool {
    t.success
        .iter()
        .chain(t.failure.iter())
        .all(|op| match &op.request {
            Some(pb::request_op::Request::RequestRange(_)) => true,
            Some(pb::request_op::Request::RequestTxn(inner)) => txn_read_only(inner),
            _ => false,
        })
}

/// A transaction: `when(compares).and_then(ops).or_else(ops)`.
#[derive(Debug, Clone, Default)]
pub struct Txn {
    compare: Vec<Compare>,
    success: Vec<Op>,
    failure: Vec<Op>,
}

impl Txn {
    pub fn new() -> Txn {
        Txn::default()
    }
    pub fn when(mut self, c: impl IntoIterator<Item = Compare>) -> Txn {
        self.compare.extend(c);
        self
    }
    pub fn and_then(mut self, ops: impl IntoIterator<Item = Op>) -> Txn {
        self.success.extend(ops);
        self
    }
    pub fn or_else(mut self, ops: impl IntoIterator<Item = Op>) -> Txn {
        self.failure.extend(ops);
        self
    }
    pub fn is_read_only(&self) -> bool {
        self.success
            .iter()
            .chain(self.failure.iter())
            .all(Op::is_read)
    }
    pub fn into_request(self) -> pb::TxnRequest {
        pb::TxnRequest {
            compare: self.compare.into_iter().map(|c| c.0).collect(),
            success: self.success.into_iter().map(|o| o.0).collect(),
            failure: self.failure.into_iter().map(|o| o.0).collect(),
        }
    }
}

/// What a transaction did.
#[derive(Debug, Clone)]
pub struct TxnOutcome {
    pub succeeded: bool,
    pub revision: i64,
    pub responses: Vec<pb::ResponseOp>,
}

impl TxnOutcome {
    /// Key-values returned by the branch's reads, in order.
    pub fn kvs(&self) -> Vec<KeyValue> {
        let mut out = Vec::new();
        for r in &self.responses {
            if let Some(pb::response_op::Response::ResponseRange(rr)) = &r.response {
                out.extend(rr.kvs.iter().cloned());
            }
        }
        out
    }
}

impl From<pb::TxnResponse> for TxnOutcome {
    fn from(r: pb::TxnResponse) -> Self {
        TxnOutcome {
            succeeded: r.succeeded,
            revision: r.header.map(|h| h.revision).unwrap_or(0),
            responses: r.responses,
        }
    }
}
