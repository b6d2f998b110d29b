//! Multi-process behaviour of a raftkv cluster: replication, failover, durability, catch-up
//! through snapshots, bootstrap rules and refusals of bad input.

use raftkv_proto::etcdserverpb as pb;
use raftkv_testkit::*;
use std::time::{Duration, Instant};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn write_through_any_node_is_readable_from_every_node() {
    let c = Cluster::start(Options::default());
    for writer in 0..3 {
        let mut kv = c.kv(writer).await;
        let key = format!("from-{writer}");
        kv.put(authed(put_req(&key, &format!("value-{writer}")), &c.token))
            .await
            .unwrap();
        for reader in 0..3 {
            let mut kv = c.kv(reader).await;
            let got = kv
                .range(authed(get_req(&key), &c.token))
                .await
                .unwrap()
                .into_inner();
            assert_eq!(
                got.kvs.len(),
                1,
                "member {reader} must see {key} (linearizable read)"
            );
            assert_eq!(got.kvs[0].value, format!("value-{writer}").as_bytes());
            let h = got.header.unwrap();
            assert_eq!(h.member_id, c.members[reader].id);
            assert_ne!(h.cluster_id, 0);
            assert!(h.raft_term >= 1);
            assert!(h.revision >= 2);
        }
    }
    // Serializable reads are served locally and see the data once applied.
    let mut kv = c.kv(2).await;
    let mut req = prefix_req("from-");
    req.serializable = true;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = kv
            .range(authed(req.clone(), &c.token))
            .await
            .unwrap()
            .into_inner();
        if got.count == 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "serializable read never caught up"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_elects_a_new_one_and_loses_no_acknowledged_write() {
    let mut c = Cluster::start(Options::default());
    let leader = c.leader(Duration::from_secs(10)).await;
    let survivors: Vec<usize> = (0..3).filter(|i| *i != leader).collect();

    let mut acknowledged = Vec::new();
    let mut kvs = Vec::new();
    for i in 0..3 {
        kvs.push(c.kv(i).await);
    }
    for n in 0..200 {
        let target = n % 3;
        let key = format!("k{n:05}");
        kvs[target]
            .put(authed(put_req(&key, &n.to_string()), &c.token))
            .await
            .unwrap();
        acknowledged.push(key);
    }
    let killed_at = Instant::now();
    c.kill(leader);
    // Keep writing through the survivors; the first success after the kill marks failover.
    let mut failover = None;
    let mut n = 200;
    while n < 400 {
        let target = survivors[n % 2];
        let key = format!("k{n:05}");
        match kvs[target]
            .put(authed(put_req(&key, &n.to_string()), &c.token))
            .await
        {
            Ok(_) => {
                failover.get_or_insert(killed_at.elapsed());
                acknowledged.push(key);
                n += 1;
            }
            Err(s) => {
                assert!(
                    matches!(s.code(), Code::Unavailable),
                    "unexpected error during failover: {s:?}"
                );
                assert!(
                    killed_at.elapsed() < Duration::from_secs(20),
                    "no failover within 20s"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let failover = failover.unwrap();
    println!(
        "FAILOVER: writes resumed {failover:?} after kill -9 of the leader (election timeout 500ms)"
    );
    let new_leader = c.leader(Duration::from_secs(10)).await;
    assert_ne!(new_leader, leader);
    for i in &survivors {
        let got = kvs[*i]
            .range(authed(prefix_req("k"), &c.token))
            .await
            .unwrap()
            .into_inner();
        let keys: Vec<String> = got
            .kvs
            .iter()
            .map(|kv| String::from_utf8(kv.key.clone()).unwrap())
            .collect();
        for k in &acknowledged {
            assert!(
                keys.contains(k),
                "acknowledged {k} missing on member {}",
                i + 1
            );
        }
    }
    // The killed member comes back and catches up.
    c.spawn(leader);
    c.wait_member_ready(leader, Duration::from_secs(30));
    let mut kv = c.kv(leader).await;
    let got = kv
        .range(authed(prefix_req("k"), &c.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.count as usize, acknowledged.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_writes_a_follower_forwards_survive_a_leader_kill() {
    // Followers hand writes to the leader over one stream; killing the leader with many of them
    // in flight must leave each caller with a success or an Unavailable error, and every
    // acknowledged write must be on the new leader's members.
    let mut c = Cluster::start(Options::default());
    let leader = c.leader(Duration::from_secs(10)).await;
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    let kv = c.kv(follower).await;
    let token = c.token.clone();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let killed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut writers = Vec::new();
    for w in 0..32 {
        let mut kv = kv.clone();
        let token = token.clone();
        let stop = stop.clone();
        let killed = killed.clone();
        writers.push(tokio::spawn(async move {
            let mut acknowledged = Vec::new();
            let mut after_kill = 0;
            let mut errors = Vec::new();
            let mut n = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let key = format!("f{w:02}-{n:05}");
                let sent_after_kill = killed.load(std::sync::atomic::Ordering::Relaxed);
                match kv.put(authed(put_req(&key, &key), &token)).await {
                    Ok(_) => {
                        after_kill += usize::from(sent_after_kill);
                        acknowledged.push(key);
                    }
                    Err(s) => {
                        errors.push(s);
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
                n += 1;
            }
            (acknowledged, errors, after_kill)
        }));
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.kill(leader);
    killed.store(true, std::sync::atomic::Ordering::Relaxed);
    let killed_at = Instant::now();
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acknowledged = Vec::new();
    let mut errors = Vec::new();
    let mut after_kill = 0;
    for w in writers {
        let (a, e, k) = w.await.unwrap();
        acknowledged.extend(a);
        errors.extend(e);
        after_kill += k;
    }
    for s in &errors {
        assert_eq!(s.code(), Code::Unavailable, "unexpected error: {s:?}");
    }
    println!(
        "FORWARDED: {} writes acknowledged ({after_kill} sent after the kill), {} refused as unavailable or of unknown outcome, leader killed {:?} before the end",
        acknowledged.len(),
        errors.len(),
        killed_at.elapsed()
    );
    assert!(
        after_kill > 0,
        "no forwarded write succeeded after the leader was killed"
    );
    for i in [follower, other] {
        let mut kv = c.kv(i).await;
        let mut seen = std::collections::BTreeMap::new();
        for _ in 0..50 {
            let got = kv
                .range(authed(prefix_req("f"), &c.token))
                .await
                .unwrap()
                .into_inner();
            seen = got.kvs.into_iter().map(|kv| (kv.key, kv.value)).collect();
            if acknowledged.iter().all(|k| seen.contains_key(k.as_bytes())) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for k in &acknowledged {
            assert_eq!(
                seen.get(k.as_bytes()).map(|v| v.as_slice()),
                Some(k.as_bytes()),
                "acknowledged {k} missing or wrong on member {}",
                i + 1
            );
        }
    }
    let new_leader = c.leader(Duration::from_secs(10)).await;
    assert_ne!(new_leader, leader);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restarting_every_member_keeps_all_data_and_revisions() {
    let mut c = Cluster::start(Options::default());
    let mut kv = c.kv(0).await;
    for n in 0..50 {
        kv.put(authed(
            put_req(&format!("p{n:03}"), &format!("v{n}")),
            &c.token,
        ))
        .await
        .unwrap();
    }
    kv.delete_range(authed(
        pb::DeleteRangeRequest {
            key: b"p010".to_vec(),
            range_end: b"p020".to_vec(),
            ..Default::default()
        },
        &c.token,
    ))
    .await
    .unwrap();
    let before = kv
        .range(authed(prefix_req("p"), &c.token))
        .await
        .unwrap()
        .into_inner();
    let mut old = prefix_req("p");
    old.revision = 20;
    let before_old = kv
        .range(authed(old.clone(), &c.token))
        .await
        .unwrap()
        .into_inner();
    // kill -9 everywhere: applied state is written without the write-ahead log, so whatever
    // was not flushed yet is gone from every member and must be re-applied from the Raft log.
    for i in 0..3 {
        c.kill(i);
    }
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_ready(Duration::from_secs(60));
    for i in 0..3 {
        let mut kv = c.kv(i).await;
        let after = kv
            .range(authed(prefix_req("p"), &c.token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(after.kvs, before.kvs, "member {} after restart", i + 1);
        assert_eq!(
            after.header.as_ref().unwrap().revision,
            before.header.as_ref().unwrap().revision
        );
        let after_old = kv
            .range(authed(old.clone(), &c.token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(after_old.kvs, before_old.kvs, "history survives a restart");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_follower_catches_up_through_a_snapshot() {
    let mut c = Cluster::start(Options {
        snapshot_threshold: 300,
        snapshot_log_keep: 50,
        ..Default::default()
    });
    let leader = c.leader(Duration::from_secs(10)).await;
    let follower = (leader + 1) % 3;
    c.stop(follower);
    let mut kv = c.kv(leader).await;
    let writes = 2000;
    for n in 0..writes {
        kv.put(authed(
            put_req(&format!("s{n:05}"), &"x".repeat(100)),
            &c.token,
        ))
        .await
        .unwrap();
    }
    let leader_status = c.status(leader).await.unwrap();
    c.spawn(follower);
    c.wait_member_ready(follower, Duration::from_secs(60));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = c.status(follower).await;
        if let Some(s) = s
            && s.raft_applied_index >= leader_status.raft_index
        {
            break;
        }
        assert!(Instant::now() < deadline, "follower never caught up");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut fkv = c.kv(follower).await;
    let mut req = prefix_req("s");
    req.serializable = true;
    req.count_only = true;
    let got = fkv.range(authed(req, &c.token)).await.unwrap().into_inner();
    assert_eq!(got.count, writes as i64);
    let log = std::fs::read_to_string(&c.members[follower].log).unwrap();
    assert!(
        log.contains("installed snapshot"),
        "the follower should have caught up through a snapshot; log:\n{}",
        c.log_tail(follower)
    );
    let (_, metrics) = c.http_get(follower, "/metrics").unwrap();
    assert!(metrics.contains("raftkv_raft_snapshot_installs_total{member=\""));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_data_dir_of_another_cluster_is_refused_and_restarts_never_reinitialize() {
    let mut c = Cluster::start(Options::default());
    let mut kv = c.kv(0).await;
    kv.put(authed(put_req("keep", "me"), &c.token))
        .await
        .unwrap();
    c.stop(0);
    // Same data directory, other cluster token: refused with a clear message.
    c.cluster_token = "someone-else".into();
    let out = c.serve_command(0).output().unwrap();
    c.cluster_token = "test-cluster".into();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("belongs to cluster"), "stderr: {err}");
    // Restarting the initializing member keeps the cluster: no second initialization.
    c.spawn(0);
    c.wait_member_ready(0, Duration::from_secs(30));
    let log = std::fs::read_to_string(&c.members[0].log).unwrap();
    assert_eq!(log.matches("initialized a new cluster").count(), 1);
    let mut kv = c.kv(0).await;
    let got = kv
        .range(authed(get_req("keep"), &c.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs[0].value, b"me");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_etcds_status_codes_and_changes_nothing() {
    let c = Cluster::start(Options {
        extra_args: vec!["--max-request-bytes".into(), "65536".into()],
        ..Default::default()
    });
    let mut kv = c.kv(1).await;
    let t = &c.token;
    kv.put(authed(put_req("a", "1"), t)).await.unwrap();
    let rev_before = kv
        .range(authed(get_req("a"), t))
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;

    let s = kv.put(authed(put_req("", "x"), t)).await.unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (Code::InvalidArgument, "etcdserver: key is not provided")
    );
    let s = kv.range(authed(get_req(""), t)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);

    let mut future = get_req("a");
    future.revision = 1_000_000;
    let s = kv.range(authed(future, t)).await.unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision is a future revision"
        )
    );

    let big = "x".repeat(70_000);
    let s = kv.put(authed(put_req("big", &big), t)).await.unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (Code::InvalidArgument, "etcdserver: request is too large")
    );

    let bad_compare = pb::TxnRequest {
        compare: vec![pb::Compare {
            target: 42,
            key: b"a".to_vec(),
            ..Default::default()
        }],
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(put_req("b", "2"))),
        }],
        failure: vec![],
    };
    let s = kv.txn(authed(bad_compare, t)).await.unwrap_err();
    assert_eq!(s.code(), Code::InvalidArgument);
    assert!(
        s.message().contains("unknown compare target 42"),
        "{}",
        s.message()
    );

    let dup = pb::TxnRequest {
        success: vec![
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(put_req("d", "1"))),
            },
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(put_req("d", "2"))),
            },
        ],
        ..Default::default()
    };
    let s = kv.txn(authed(dup, t)).await.unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (
            Code::InvalidArgument,
            "etcdserver: duplicate key given in txn request"
        )
    );

    // A txn whose second put fails its check applies nothing at all.
    let half = pb::TxnRequest {
        success: vec![
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(put_req("new", "1"))),
            },
            pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                    key: b"missing".to_vec(),
                    ignore_value: true,
                    ..Default::default()
                })),
            },
        ],
        ..Default::default()
    };
    let s = kv.txn(authed(half, t)).await.unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (Code::InvalidArgument, "etcdserver: key not found")
    );

    let backwards = pb::RangeRequest {
        key: b"z".to_vec(),
        range_end: b"a".to_vec(),
        ..Default::default()
    };
    let got = kv.range(authed(backwards, t)).await.unwrap().into_inner();
    assert!(got.kvs.is_empty() && got.count == 0);

    let got = kv.range(authed(prefix_req(""), t)).await;
    assert!(
        got.is_err(),
        "an empty key is refused even with a range end"
    );

    let after = kv
        .range(authed(get_req("new"), t))
        .await
        .unwrap()
        .into_inner();
    assert!(after.kvs.is_empty(), "nothing half-applied");
    let rev_after = after.header.unwrap().revision;
    assert_eq!(
        rev_before, rev_after,
        "refused requests must not change the store"
    );

    // Compaction: a read below the compaction point gets etcd's error.
    kv.put(authed(put_req("a", "2"), t)).await.unwrap();
    kv.put(authed(put_req("a", "3"), t)).await.unwrap();
    let cur = kv
        .range(authed(get_req("a"), t))
        .await
        .unwrap()
        .into_inner()
        .header
        .unwrap()
        .revision;
    kv.compact(authed(
        pb::CompactionRequest {
            revision: cur,
            physical: true,
        },
        t,
    ))
    .await
    .unwrap();
    let mut old = get_req("a");
    old.revision = cur - 1;
    let s = kv.range(authed(old, t)).await.unwrap_err();
    assert_eq!(
        (s.code(), s.message()),
        (
            Code::OutOfRange,
            "etcdserver: mvcc: required revision has been compacted"
        )
    );
}
