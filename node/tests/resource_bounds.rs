//! What one tenant can claim of the cluster's memory through leases, watches and reads is
//! bounded, and the bounds answer with ResourceExhausted rather than by growing; lease ids,
//! which keep locks and elections alive, are listed only to administrators.

use raftkv_proto::etcdserverpb as pb;
use raftkv_testkit::*;
use tonic::Code;

fn grant(ttl: i64) -> pb::LeaseGrantRequest {
    pb::LeaseGrantRequest { ttl, id: 0 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_number_of_leases_is_bounded() {
    let c = Cluster::start(Options {
        extra_args: vec!["--max-leases".into(), "5".into()],
        ..Default::default()
    });
    let mut lease = c.lease(0).await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        let r = lease
            .lease_grant(authed(grant(60), &c.token))
            .await
            .unwrap();
        ids.push(r.into_inner().id);
    }
    let e = lease
        .lease_grant(authed(grant(60), &c.token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    assert!(e.message().contains("--max-leases"), "{e:?}");
    // Revoking one makes room again, on any member.
    lease
        .lease_revoke(authed(pb::LeaseRevokeRequest { id: ids[0] }, &c.token))
        .await
        .unwrap();
    let mut other = c.lease(1).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        match other.lease_grant(authed(grant(60), &c.token)).await {
            Ok(_) => break,
            Err(e) if e.code() == Code::ResourceExhausted => {
                assert!(std::time::Instant::now() < deadline, "{e:?}");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
            Err(e) => panic!("{e:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_administrators_list_lease_ids() {
    let c = Cluster::start(Options::default());
    let mut lease = c.lease(0).await;
    let id = lease
        .lease_grant(authed(grant(60), &c.token))
        .await
        .unwrap()
        .into_inner()
        .id;
    let tenant = c.issue("tenant", &[]);
    let e = lease
        .lease_leases(authed(pb::LeaseLeasesRequest {}, &tenant))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let all = lease
        .lease_leases(authed(pb::LeaseLeasesRequest {}, &c.token))
        .await
        .unwrap()
        .into_inner();
    assert!(all.leases.iter().any(|l| l.id == id));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_stream_holds_a_bounded_number_of_watchers() {
    let c = Cluster::start(Options {
        extra_args: vec!["--max-watchers-per-stream".into(), "3".into()],
        ..Default::default()
    });
    let mut w = c.watch(0).await;
    let (tx, rx) = tokio::sync::mpsc::channel(8);
    for i in 0..4 {
        tx.send(pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: format!("w/{i}").into(),
                    ..Default::default()
                },
            )),
        })
        .await
        .unwrap();
    }
    let mut stream = w
        .watch(authed(
            tokio_stream::wrappers::ReceiverStream::new(rx),
            &c.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let mut answers = Vec::new();
    for _ in 0..4 {
        answers.push(stream.message().await.unwrap().unwrap());
    }
    assert!(answers[..3].iter().all(|a| a.created && !a.canceled));
    assert!(answers[3].canceled, "{:?}", answers[3]);
    assert!(
        answers[3]
            .cancel_reason
            .contains("--max-watchers-per-stream"),
        "{:?}",
        answers[3]
    );
    // The three watchers still work.
    let mut kv = c.kv(0).await;
    kv.put(authed(put_req("w/1", "v"), &c.token)).await.unwrap();
    let ev = stream.message().await.unwrap().unwrap();
    assert_eq!(ev.events.len(), 1);
    assert_eq!(ev.events[0].kv.as_ref().unwrap().key, b"w/1");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_share_a_bounded_amount_of_memory() {
    let c = Cluster::start(Options {
        extra_args: vec!["--max-inflight-read-bytes".into(), (2u64 << 20).to_string()],
        ..Default::default()
    });
    let mut kv = c.kv(0).await;
    for i in 0..5 {
        kv.put(authed(
            put_req(&format!("r/{i}"), &"v".repeat(512 * 1024)),
            &c.token,
        ))
        .await
        .unwrap();
    }
    // 2.5 MiB at once is more than this member lets all reads hold together.
    let e = kv
        .range(authed(prefix_req("r/"), &c.token))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    // Paging through works, and the budget comes back after each read.
    for _ in 0..5 {
        let mut page = prefix_req("r/");
        page.limit = 1;
        let r = kv.range(authed(page, &c.token)).await.unwrap().into_inner();
        assert_eq!(r.kvs.len(), 1);
    }
}
