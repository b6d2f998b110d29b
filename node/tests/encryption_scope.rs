//! Everything derived from a value is sealed before it enters the Raft log: compare operands of
//! transactions included. A byte scan of every file of every member finds no plaintext.

use raftkv_proto::etcdserverpb as pb;
use raftkv_testkit::*;

fn value_compare(key: &str, operand: &str) -> pb::Compare {
    pb::Compare {
        result: pb::compare::CompareResult::Equal as i32,
        target: pb::compare::CompareTarget::Value as i32,
        key: key.into(),
        target_union: Some(pb::compare::TargetUnion::Value(operand.into())),
        range_end: Vec::new(),
    }
}

fn put_op(k: &str, v: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(put_req(k, v))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn compare_operands_never_reach_the_disk_in_plaintext() {
    let marker = "COMPARE-OPERAND-MARKER-5e1d";
    let mut c = Cluster::start(Options {
        snapshot_threshold: 50,
        snapshot_log_keep: 5,
        ..Default::default()
    });
    let mut kv = c.kv(1).await;
    kv.put(authed(put_req("cas", "start"), &c.token))
        .await
        .unwrap();
    let mut swapped = 0;
    for n in 0..120 {
        // Half the compares hold, half do not; nested transactions carry operands too.
        let operand = if n % 2 == 0 {
            format!("{marker}-{n}")
        } else {
            "start".to_string()
        };
        let nested = pb::TxnRequest {
            compare: vec![value_compare("cas", &format!("{marker}-nested-{n}"))],
            success: vec![put_op("nested", "a")],
            failure: vec![put_op("nested", "b")],
        };
        let r = kv
            .txn(authed(
                pb::TxnRequest {
                    compare: vec![value_compare("cas", &operand)],
                    success: vec![
                        put_op("cas", "start"),
                        pb::RequestOp {
                            request: Some(pb::request_op::Request::RequestTxn(nested)),
                        },
                    ],
                    failure: vec![],
                },
                &c.token,
            ))
            .await
            .unwrap()
            .into_inner();
        if r.succeeded {
            swapped += 1;
        }
    }
    assert_eq!(
        swapped, 60,
        "compares against sealed operands still decide correctly"
    );
    for i in 0..3 {
        c.stop(i);
    }
    for i in 0..3 {
        let hits = files_containing(c.data_dir(i), marker.as_bytes());
        assert!(
            hits.is_empty(),
            "a compare operand in plaintext on member {}: {hits:?}",
            i + 1
        );
    }
}
