//! What one request can cost the cluster: a lease TTL cannot overflow the leader's clock (and
//! lease expiry survives any background panic), one small transaction cannot make every
//! replica materialize gigabytes, reads are bounded, a watcher that stops reading pins nothing,
//! a watch from revision 1 pages through history, and oversized messages get etcd's error.

use raftkv_proto::etcdserverpb as pb;
use raftkv_testkit::*;
use std::time::{Duration, Instant};
use tonic::Code;

fn range_op(prefix: &str) -> pb::RequestOp {
    let mut r = prefix_req(prefix);
    r.serializable = false;
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestRange(r)),
    }
}

fn put_op(k: &str, v: &str) -> pb::RequestOp {
    pb::RequestOp {
        request: Some(pb::request_op::Request::RequestPut(put_req(k, v))),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_huge_lease_ttl_is_refused_and_lease_expiry_keeps_working() {
    let c = Cluster::start(Options::default());
    let mut lease = c.lease(0).await;
    let e = lease
        .lease_grant(authed(
            pb::LeaseGrantRequest {
                ttl: i64::MAX,
                id: 0,
            },
            &c.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert_eq!(e.message(), "etcdserver: too large lease TTL");
    // The largest TTL etcd allows is fine, and does not disturb the expiry clock.
    lease
        .lease_grant(authed(
            pb::LeaseGrantRequest {
                ttl: 9_000_000_000,
                id: 0,
            },
            &c.token,
        ))
        .await
        .expect("etcd's maximum TTL");
    // A short lease still expires, and takes its key with it.
    let short = lease
        .lease_grant(authed(pb::LeaseGrantRequest { ttl: 1, id: 0 }, &c.token))
        .await
        .unwrap()
        .into_inner();
    let mut kv = c.kv(0).await;
    let mut p = put_req("leased", "v");
    p.lease = short.id;
    kv.put(authed(p, &c.token)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let r = kv
            .range(authed(get_req("leased"), &c.token))
            .await
            .unwrap()
            .into_inner();
        if r.count == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "the lease never expired");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for i in 0..3 {
        let log = std::fs::read_to_string(&c.members[i].log).unwrap_or_default();
        assert!(
            !log.contains("panicked"),
            "member {} panicked:\n{log}",
            i + 1
        );
    }
}

/// The shape of the reported attack: nested transactions holding thousands of ranges over the
/// caller's own prefix, each returning everything under it.
fn amplifying_txn(levels: usize, ranges_per_level: usize) -> pb::TxnRequest {
    let mut t = pb::TxnRequest {
        success: vec![put_op("amp/marker", "x")],
        ..Default::default()
    };
    for _ in 0..levels {
        let mut ops: Vec<pb::RequestOp> = (0..ranges_per_level).map(|_| range_op("amp/")).collect();
        ops.push(pb::RequestOp {
            request: Some(pb::request_op::Request::RequestTxn(t)),
        });
        t = pb::TxnRequest {
            success: ops,
            ..Default::default()
        };
    }
    t
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_small_transaction_cannot_make_every_replica_materialize_gigabytes() {
    let c = Cluster::start(Options::default());
    let mut kv = c.kv(0).await;
    // 1 MiB under the caller's own prefix.
    for i in 0..16 {
        kv.put(authed(
            put_req(&format!("amp/{i:02}"), &"v".repeat(64 * 1024)),
            &c.token,
        ))
        .await
        .unwrap();
    }
    let before: Vec<u64> = (0..3).map(|i| c.rss_bytes(i)).collect();
    // 27 levels of 127 ranges: ~3,400 ranges of 1 MiB each, in a request of a few KiB.
    let attack = amplifying_txn(27, 127);
    let e = kv.txn(authed(attack, &c.token)).await.unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert_eq!(
        e.message(),
        "etcdserver: too many operations in txn request"
    );
    // Within the operation bound, the bytes the ranges return are bounded: 100 ranges of
    // 1 MiB in a write transaction is more than one entry may return.
    let within = amplifying_txn(1, 100);
    let e = kv.txn(authed(within, &c.token)).await.unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let marker = kv
        .range(authed(get_req("amp/marker"), &c.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(marker.count, 0, "the refused transaction wrote nothing");
    // Every member is alive, answers, and did not balloon.
    for (i, rss_before) in before.iter().enumerate() {
        let mut kv = c.kv(i).await;
        kv.range(authed(get_req("amp/00"), &c.token))
            .await
            .unwrap_or_else(|e| panic!("member {} answers: {e:?}", i + 1));
        let grown = c.rss_bytes(i).saturating_sub(*rss_before);
        assert!(
            grown < 512 << 20,
            "member {} grew by {} MiB",
            i + 1,
            grown >> 20
        );
    }
    // A reasonable write transaction with a range in it still works.
    let ok = pb::TxnRequest {
        success: vec![put_op("amp/ok", "1"), range_op("amp/0")],
        ..Default::default()
    };
    let r = kv.txn(authed(ok, &c.token)).await.unwrap().into_inner();
    assert!(r.succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_over_the_response_limit_are_refused_not_gathered() {
    let c = Cluster::start(Options {
        extra_args: vec!["--max-response-bytes".into(), (4u64 << 20).to_string()],
        ..Default::default()
    });
    let mut kv = c.kv(0).await;
    for i in 0..8 {
        kv.put(authed(
            put_req(&format!("big/{i}"), &"v".repeat(1 << 20)),
            &c.token,
        ))
        .await
        .unwrap();
    }
    let e = kv
        .range(authed(prefix_req("big/"), &c.token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let mut paged = prefix_req("big/");
    paged.limit = 2;
    let r = kv
        .range(authed(paged, &c.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.kvs.len(), 2);
    assert!(r.more);
    let mut keys = prefix_req("big/");
    keys.keys_only = true;
    let r = kv.range(authed(keys, &c.token)).await.unwrap().into_inner();
    assert_eq!(r.count, 8);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_watcher_pins_nothing_and_catches_up_from_storage() {
    let c = Cluster::start(Options::default());
    let (mut events, _tx) = c.open_watch(0, "flood/", 0, &c.token).await;
    // The watcher stops reading while 160 MiB are written: more than the member's ring of
    // recent writes holds, so the watcher must later be served from storage.
    let mut kv = c.kv(1).await;
    let value = "f".repeat(1 << 20);
    for i in 0..160 {
        kv.put(authed(put_req(&format!("flood/{i:03}"), &value), &c.token))
            .await
            .unwrap();
    }
    let metrics = c.http_get(0, "/metrics").unwrap().1;
    let held = metric_sum(&metrics, "raftkv_watch_ring_bytes");
    assert!(
        held > 0.0 && held <= (64u64 << 20) as f64,
        "notifications held for watchers: {held}"
    );
    // It reads again and gets every event, once, in order.
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 160 {
        assert!(
            Instant::now() < deadline,
            "only {} events arrived",
            seen.len()
        );
        let m = tokio::time::timeout(Duration::from_secs(20), events.message())
            .await
            .expect("events keep coming")
            .unwrap()
            .unwrap();
        assert!(!m.canceled, "{m:?}");
        for e in m.events {
            let kv = e.kv.unwrap();
            assert_eq!(kv.value.len(), 1 << 20);
            seen.push(String::from_utf8(kv.key).unwrap());
        }
    }
    let expected: Vec<String> = (0..160).map(|i| format!("flood/{i:03}")).collect();
    assert_eq!(seen, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_from_revision_one_pages_through_history() {
    let c = Cluster::start(Options::default());
    let mut kv = c.kv(0).await;
    for i in 0..300 {
        let k = if i % 10 == 0 {
            format!("wanted/{i}")
        } else {
            format!("other/{i}")
        };
        kv.put(authed(put_req(&k, &"h".repeat(32 * 1024)), &c.token))
            .await
            .unwrap();
    }
    let (mut events, _tx) = c.open_watch(2, "wanted/", 1, &c.token).await;
    let mut revs = Vec::new();
    while revs.len() < 30 {
        let m = tokio::time::timeout(Duration::from_secs(20), events.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        for e in m.events {
            let kv = e.kv.unwrap();
            assert!(kv.key.starts_with(b"wanted/"));
            revs.push(kv.mod_revision);
        }
    }
    assert!(revs.windows(2).all(|w| w[0] < w[1]), "ordered: {revs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replaying_history_holds_a_page_in_memory_not_the_whole_history() {
    // 1 MiB entries fsynced on a busy machine can keep heartbeats out past the tests' usual
    // 500 ms election timeout; a leader change would fail a write this test does not retry.
    let c = Cluster::start(Options {
        election_timeout_ms: 2000,
        ..Options::default()
    });
    let mut kv = c.kv(0).await;
    // 240 MiB of history the watch below does not want, around a few keys it does.
    let big = "h".repeat(1 << 20);
    let mut wanted = 0;
    for i in 0..240 {
        kv.put(authed(put_req(&format!("other/{}", i % 8), &big), &c.token))
            .await
            .unwrap();
        if i % 40 == 0 {
            kv.put(authed(put_req(&format!("wanted/{i}"), "w"), &c.token))
                .await
                .unwrap();
            wanted += 1;
        }
    }
    let pid = c.members[2].child.as_ref().unwrap().id();
    let rss = move || rss_of(pid);
    let before = rss();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut peak = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                peak = peak.max(rss());
                std::thread::sleep(Duration::from_millis(5));
            }
            peak
        })
    };
    let (mut events, _tx) = c.open_watch(2, "wanted/", 1, &c.token).await;
    let mut got = 0;
    while got < wanted {
        let m = tokio::time::timeout(Duration::from_secs(60), events.message())
            .await
            .expect("the replay finishes")
            .unwrap()
            .unwrap();
        got += m.events.len();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let peak = sampler.join().unwrap();
    let grew = peak.saturating_sub(before) >> 20;
    println!(
        "member RSS {} MiB before the replay, peak growth {grew} MiB",
        before >> 20
    );
    // Materializing the history before filtering it (the old replay) holds all 240 MiB.
    assert!(
        grew < 160,
        "replaying 240 MiB of unwanted history grew the member by {grew} MiB"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_messages_get_etcds_request_too_large() {
    let c = Cluster::start(Options::default());
    let mut kv = c.kv(0).await;
    for size in [1600 * 1024, 3 << 20] {
        let e = kv
            .put(authed(put_req("big", &"x".repeat(size)), &c.token))
            .await
            .unwrap_err();
        assert_eq!(e.code(), Code::InvalidArgument, "{size}: {e:?}");
        assert_eq!(e.message(), "etcdserver: request is too large", "{size}");
    }
    kv.put(authed(put_req("small", "ok"), &c.token))
        .await
        .expect("the connection is still good");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_requests_to_every_service_get_etcds_request_too_large() {
    let c = Cluster::start(Options::default());
    let too_large = |e: tonic::Status| {
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert_eq!(e.message(), "etcdserver: request is too large");
    };
    // Over --max-request-bytes plus gRPC overhead, under tonic's own 4 MiB default.
    let huge = "x".repeat(3 << 20);
    let mut auth = c.auth(0).await;
    let e = auth
        .user_add(authed(
            pb::AuthUserAddRequest {
                name: huge.clone(),
                password: "pw".into(),
                ..Default::default()
            },
            &c.token,
        ))
        .await
        .unwrap_err();
    too_large(e);
    let mut cluster = pb::cluster_client::ClusterClient::new(c.channel(0).await)
        .max_encoding_message_size(usize::MAX);
    let e = cluster
        .member_add(authed(
            pb::MemberAddRequest {
                peer_ur_ls: vec![huge.clone()],
                is_learner: true,
                ..Default::default()
            },
            &c.token,
        ))
        .await
        .unwrap_err();
    too_large(e);
    let mut lock = raftkv_proto::v3lockpb::lock_client::LockClient::new(c.channel(0).await);
    let e = lock
        .lock(authed(
            raftkv_proto::v3lockpb::LockRequest {
                name: huge.into_bytes(),
                lease: 1,
            },
            &c.token,
        ))
        .await
        .unwrap_err();
    too_large(e);
    // Nothing was added, and the connection still serves.
    let users = auth
        .user_list(authed(pb::AuthUserListRequest {}, &c.token))
        .await
        .expect("the connection is still good")
        .into_inner();
    assert!(
        users.users.iter().all(|u| u.len() < 1024),
        "{:?}",
        users.users.len()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transactions_nested_past_the_decoders_depth_are_invalid_arguments() {
    let c = Cluster::start(Options::default());
    let mut kv = c.kv(0).await;
    // 80 levels of transaction in transaction: far past the protobuf decoder's depth limit, in
    // a request of a few hundred bytes.
    let e = kv
        .txn(authed(amplifying_txn(80, 0), &c.token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().starts_with("malformed request"), "{e:?}");
    assert!(e.message().len() < 200, "{e:?}");
    let marker = kv
        .range(authed(get_req("amp/marker"), &c.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(marker.count, 0, "the refused transaction wrote nothing");
    // A few levels are fine.
    let r = kv
        .txn(authed(amplifying_txn(3, 0), &c.token))
        .await
        .unwrap()
        .into_inner();
    assert!(r.succeeded);
}
