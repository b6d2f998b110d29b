//! etcd's admission checks for transactions: a bound on operations per level, and no key written
//! twice (or written and deleted) on any path through the transaction.

use super::status::{self, invalid};
use crate::model::{RequestOp, TxnRequest, key_interval};
use std::collections::BTreeSet;
use tonic::Status;

type Interval = (Vec<u8>, Option<Vec<u8>>);

/// `max_ops` bounds each level (etcd's `--max-txn-ops`); `max_total` bounds the operations over
/// every level together, which nesting would otherwise multiply.
pub fn check_txn(t: &TxnRequest, max_ops: usize, max_total: usize) -> Result<(), Status> {
    check_ops(t, max_ops)?;
    if crate::storage::mvcc::txn_total_ops(t) > max_total {
        return Err(invalid(status::TOO_MANY_OPS));
    }
    check_intervals(&t.success)?;
    check_intervals(&t.failure)?;
    Ok(())
}

fn check_ops(t: &TxnRequest, max_ops: usize) -> Result<(), Status> {
    let n = t.compare.len().max(t.success.len()).max(t.failure.len());
    if n > max_ops {
        return Err(invalid(status::TOO_MANY_OPS));
    }
    for op in t.success.iter().chain(t.failure.iter()) {
        if let RequestOp::Txn(inner) = op {
            check_ops(inner, max_ops)?;
        }
    }
    Ok(())
}

fn intersects(dels: &[Interval], key: &[u8]) -> bool {
    dels.iter()
        .any(|(s, e)| key >= s.as_slice() && e.as_ref().map(|e| key < e.as_slice()).unwrap_or(true))
}

/// Returns the keys put and the ranges deleted on this level and below.
fn check_intervals(ops: &[RequestOp]) -> Result<(BTreeSet<Vec<u8>>, Vec<Interval>), Status> {
    let dup = || invalid(status::DUPLICATE_KEY);
    let mut dels: Vec<Interval> = ops
        .iter()
        .filter_map(|op| match op {
            RequestOp::Delete(d) => Some(key_interval(&d.key, &d.range_end)),
            _ => None,
        })
        .collect();
    let mut puts: BTreeSet<Vec<u8>> = BTreeSet::new();
    for op in ops {
        let RequestOp::Txn(t) = op else { continue };
        let (puts_then, dels_then) = check_intervals(&t.success)?;
        let (puts_else, dels_else) = check_intervals(&t.failure)?;
        for k in &puts_then {
            if puts.contains(k) || intersects(&dels, k) {
                return Err(dup());
            }
            puts.insert(k.clone());
        }
        for k in &puts_else {
            // A key put by both branches of one nested txn is fine: only one branch runs.
            if (puts.contains(k) && !puts_then.contains(k)) || intersects(&dels, k) {
                return Err(dup());
            }
            puts.insert(k.clone());
        }
        dels.extend(dels_then);
        dels.extend(dels_else);
    }
    for op in ops {
        let RequestOp::Put(p) = op else { continue };
        if puts.contains(&p.key) || intersects(&dels, &p.key) {
            return Err(dup());
        }
        puts.insert(p.key.clone());
    }
    Ok((puts, dels))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{DeleteRequest, PutRequest};

    fn put(k: &str) -> RequestOp {
        RequestOp::Put(PutRequest {
            key: k.into(),
            ..Default::default()
        })
    }

    #[test]
    fn duplicate_and_overlapping_writes_are_refused() {
        let ok = TxnRequest {
            success: vec![put("a"), put("b")],
            ..Default::default()
        };
        assert!(check_txn(&ok, 128, 1024).is_ok());
        let dup = TxnRequest {
            success: vec![put("a"), put("a")],
            ..Default::default()
        };
        assert!(check_txn(&dup, 128, 1024).is_err());
        let overlap = TxnRequest {
            success: vec![
                RequestOp::Delete(DeleteRequest {
                    key: b"a".to_vec(),
                    range_end: b"c".to_vec(),
                    prev_kv: false,
                }),
                put("b"),
            ],
            ..Default::default()
        };
        assert!(check_txn(&overlap, 128, 1024).is_err());
        let branches = TxnRequest {
            success: vec![RequestOp::Txn(TxnRequest {
                success: vec![put("x")],
                failure: vec![put("x")],
                ..Default::default()
            })],
            ..Default::default()
        };
        assert!(check_txn(&branches, 128, 1024).is_ok());
        let many = TxnRequest {
            success: (0..5).map(|i| put(&i.to_string())).collect(),
            ..Default::default()
        };
        assert!(check_txn(&many, 4, 1024).is_err());
        // Nesting cannot multiply past the total bound.
        let mut deep = TxnRequest::default();
        for _ in 0..12 {
            deep = TxnRequest {
                success: (0..100)
                    .map(|i| {
                        RequestOp::Range(crate::model::RangeRequest {
                            key: i.to_string().into(),
                            ..Default::default()
                        })
                    })
                    .chain([RequestOp::Txn(deep)])
                    .collect(),
                ..Default::default()
            };
        }
        assert!(check_txn(&deep, 128, 100_000).is_ok());
        assert!(check_txn(&deep, 128, 1024).is_err());
    }
}
