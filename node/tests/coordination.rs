//! etcd's Lock and Election services on raftkv: mutual exclusion with waiting in creation
//! order, release by unlock, by lease expiry and by an abandoned wait; leadership with
//! proclamations, observation and resignation; permissions like the KV calls they stand for.

use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::v3electionpb as epb;
use raftkv_proto::v3electionpb::election_client::ElectionClient;
use raftkv_proto::v3lockpb as lpb;
use raftkv_proto::v3lockpb::lock_client::LockClient;
use raftkv_testkit::*;
use std::time::{Duration, Instant};
use tonic::Code;

async fn lease(c: &Cluster, ttl: i64) -> i64 {
    c.lease(0)
        .await
        .lease_grant(authed(pb::LeaseGrantRequest { ttl, id: 0 }, &c.token))
        .await
        .unwrap()
        .into_inner()
        .id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn locks_exclude_wait_in_order_and_free_on_unlock_expiry_or_abandonment() {
    let c = Cluster::start(Options::default());
    let mut locks = LockClient::new(c.channel(1).await);
    let a = lease(&c, 60).await;
    let b = lease(&c, 60).await;
    let first = locks
        .lock(authed(
            lpb::LockRequest {
                name: b"jobs".to_vec(),
                lease: a,
            },
            &c.token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(first.key.starts_with(b"jobs/"));
    // The second locker waits...
    let token = c.token.clone();
    let mut other = LockClient::new(c.channel(2).await);
    let waiter = tokio::spawn(async move {
        let started = Instant::now();
        let r = other
            .lock(authed(
                lpb::LockRequest {
                    name: b"jobs".to_vec(),
                    lease: b,
                },
                &token,
            ))
            .await
            .unwrap()
            .into_inner();
        (r.key, started.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert!(!waiter.is_finished(), "the lock is held");
    // ...until the holder unlocks.
    locks
        .unlock(authed(lpb::UnlockRequest { key: first.key }, &c.token))
        .await
        .unwrap();
    let (second, waited) = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("the waiter gets the lock")
        .unwrap();
    assert!(waited >= Duration::from_millis(700));
    assert_ne!(second, b"".to_vec());

    // A holder whose lease expires releases the lock by itself.
    let short = lease(&c, 2).await;
    let held = locks
        .lock(authed(
            lpb::LockRequest {
                name: b"expiring".to_vec(),
                lease: short,
            },
            &c.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let long = lease(&c, 60).await;
    let started = Instant::now();
    locks
        .lock(authed(
            lpb::LockRequest {
                name: b"expiring".to_vec(),
                lease: long,
            },
            &c.token,
        ))
        .await
        .expect("acquired once the holder's lease expired");
    assert!(started.elapsed() >= Duration::from_millis(500));
    let mut kv = c.kv(0).await;
    let left = kv
        .range(authed(
            get_req(std::str::from_utf8(&held.key).unwrap()),
            &c.token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(left.count, 0);

    // A waiter that gives up leaves no key behind to block the next one.
    let c2 = lease(&c, 60).await;
    let mut impatient = LockClient::new(c.channel(0).await);
    let mut req = authed(
        lpb::LockRequest {
            name: b"jobs".to_vec(),
            lease: c2,
        },
        &c.token,
    );
    req.set_timeout(Duration::from_millis(500));
    let e = impatient.lock(req).await.unwrap_err();
    assert!(
        matches!(e.code(), Code::DeadlineExceeded | Code::Cancelled),
        "{e:?}"
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys = kv
            .range(authed(prefix_req("jobs/"), &c.token))
            .await
            .unwrap()
            .into_inner();
        if keys.count == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the abandoned claim stayed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn elections_have_one_leader_that_proclaims_resigns_and_is_observed() {
    let c = Cluster::start(Options::default());
    let mut e1 = ElectionClient::new(c.channel(0).await);
    let l1 = lease(&c, 60).await;
    let l2 = lease(&c, 60).await;
    let e = e1
        .leader(authed(
            epb::LeaderRequest {
                name: b"svc".to_vec(),
            },
            &c.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.message(), "election: no leader");
    let leader = e1
        .campaign(authed(
            epb::CampaignRequest {
                name: b"svc".to_vec(),
                lease: l1,
                value: b"node-a".to_vec(),
            },
            &c.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .leader
        .unwrap();
    let mut observe = e1
        .observe(authed(
            epb::LeaderRequest {
                name: b"svc".to_vec(),
            },
            &c.token,
        ))
        .await
        .unwrap()
        .into_inner();
    let seen = observe.message().await.unwrap().unwrap();
    assert_eq!(seen.kv.unwrap().value, b"node-a");
    // A second candidate waits behind the leader.
    let token = c.token.clone();
    let mut e2 = ElectionClient::new(c.channel(2).await);
    let candidate = tokio::spawn(async move {
        e2.campaign(authed(
            epb::CampaignRequest {
                name: b"svc".to_vec(),
                lease: l2,
                value: b"node-b".to_vec(),
            },
            &token,
        ))
        .await
        .map(|r| r.into_inner().leader.unwrap())
    });
    e1.proclaim(authed(
        epb::ProclaimRequest {
            leader: Some(leader.clone()),
            value: b"node-a v2".to_vec(),
        },
        &c.token,
    ))
    .await
    .unwrap();
    let seen = observe.message().await.unwrap().unwrap();
    assert_eq!(seen.kv.unwrap().value, b"node-a v2");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!candidate.is_finished(), "one leader at a time");
    e1.resign(authed(
        epb::ResignRequest {
            leader: Some(leader.clone()),
        },
        &c.token,
    ))
    .await
    .unwrap();
    let next = tokio::time::timeout(Duration::from_secs(10), candidate)
        .await
        .expect("the next candidate leads")
        .unwrap()
        .unwrap();
    assert!(next.rev > leader.rev);
    let seen = observe.message().await.unwrap().unwrap();
    assert_eq!(seen.kv.unwrap().value, b"node-b");
    // The old leader can no longer proclaim.
    let e = e1
        .proclaim(authed(
            epb::ProclaimRequest {
                leader: Some(leader),
                value: b"stale".to_vec(),
            },
            &c.token,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.message(), "election: not leader");
    // Without write permission on the election's keys, no campaign.
    let nobody = c.issue("nobody", &[]);
    let e = e1
        .campaign(authed(
            epb::CampaignRequest {
                name: b"svc".to_vec(),
                lease: l1,
                value: b"x".to_vec(),
            },
            &nobody,
        ))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}
