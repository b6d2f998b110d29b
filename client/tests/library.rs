//! The client library against a real 3-member cluster: balancing, failover, and honest errors
//! for writes whose outcome is unknown.

use raftkv_client::txn::Cmp;
use raftkv_client::{Client, Compare, ConnectOptions, Error, GetOptions, Op, Txn};
use raftkv_testkit::*;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

async fn connect(c: &Cluster) -> Client {
    Client::connect(
        c.endpoints(),
        ConnectOptions::default().with_token(c.token.clone()),
    )
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn simple_calls_prefix_cas_and_txn_work() {
    let c = Cluster::start(Options::default());
    let client = connect(&c).await;
    let rev = client.set("app/a", "1").await.unwrap();
    assert!(rev >= 2);
    client.set("app/b", "2").await.unwrap();
    client.set("other", "x").await.unwrap();
    assert_eq!(client.get("app/a").await.unwrap().unwrap().value, b"1");
    assert!(client.get("missing").await.unwrap().is_none());
    let all = client.get_prefix("app/").await.unwrap();
    assert_eq!(all.len(), 2);
    let limited = client
        .get_with(
            "app/",
            GetOptions {
                prefix: true,
                limit: 1,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert!(limited.more && limited.count == 2 && limited.kvs.len() == 1);
    let old = client
        .get_with(
            "app/a",
            GetOptions {
                revision: rev,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(old.kvs[0].value, b"1");

    assert!(
        client
            .compare_and_swap("app/a", Some(b"1"), "2")
            .await
            .unwrap()
    );
    assert!(
        !client
            .compare_and_swap("app/a", Some(b"1"), "3")
            .await
            .unwrap()
    );
    assert!(client.compare_and_swap("fresh", None, "v").await.unwrap());
    assert!(!client.compare_and_swap("fresh", None, "v2").await.unwrap());

    let out = client
        .txn(
            Txn::new()
                .when([Compare::value("app/a", Cmp::Equal, "2")])
                .and_then([Op::put("app/c", "3"), Op::get_prefix("app/")])
                .or_else([Op::get("app/a")]),
        )
        .await
        .unwrap();
    assert!(out.succeeded);
    assert_eq!(out.kvs().len(), 3);

    assert_eq!(client.delete("other").await.unwrap(), 1);
    assert_eq!(client.delete_prefix("app/").await.unwrap(), 3);
    assert!(client.get_prefix("app/").await.unwrap().is_empty());

    // Server refusals come back as typed errors with etcd's code and message.
    let e = client.set("", "x").await.unwrap_err();
    assert_eq!(e.code(), Some(tonic::Code::InvalidArgument), "{e}");
    // Members and status.
    let members = client.members().await.unwrap();
    assert_eq!(members.len(), 3);
    let leader = client.leader().await.unwrap();
    assert!(members.iter().any(|m| m.id == leader));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reads_spread_over_members_and_writes_go_to_the_leader() {
    let c = Cluster::start(Options::default());
    c.wait_members_published(Duration::from_secs(20)).await;
    // Connect through one endpoint only: the others are discovered from the member list.
    let client = Client::connect(
        [c.endpoint(0)],
        ConnectOptions::default().with_token(c.token.clone()),
    )
    .await
    .unwrap();
    assert_eq!(
        client.endpoints().len(),
        3,
        "members discovered: {:?}",
        client.endpoints()
    );
    client.set("spread", "x").await.unwrap();
    for _ in 0..60 {
        client.get("spread").await.unwrap();
    }
    let leader = c.leader(Duration::from_secs(5)).await;
    for i in 0..3 {
        let (_, metrics) = c.http_get(i, "/metrics").unwrap();
        let ranges = metric_sum(
            &metrics,
            "raftkv_grpc_requests_total",
            &["method=\"Range\"", "code=\"OK\""],
        );
        assert!(ranges >= 5.0, "member {} served {ranges} reads", i + 1);
        let puts = metric_sum(&metrics, "raftkv_grpc_requests_total", &["method=\"Put\""]);
        if i == leader {
            assert!(puts >= 1.0);
        } else {
            assert_eq!(puts, 0.0, "writes go to the leader, not member {}", i + 1);
        }
    }
}

fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && labels.iter().all(|lb| l.contains(lb)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn killing_the_leader_mid_stream_loses_no_acknowledged_set() {
    let mut c = Cluster::start(Options::default());
    let client = connect(&c).await;
    let leader = c.leader(Duration::from_secs(5)).await;
    let writer = {
        let client = client.clone();
        tokio::spawn(async move {
            let mut acked = BTreeMap::new();
            let mut unknown = 0;
            let started = Instant::now();
            let mut n = 0u32;
            while started.elapsed() < Duration::from_secs(6) {
                let key = format!("stream/{n:06}");
                match client.set(&key, n.to_string()).await {
                    Ok(_) => {
                        acked.insert(key, n);
                    }
                    Err(Error::OutcomeUnknown(_)) => unknown += 1,
                    Err(other) => {
                        panic!("a set failed without saying its outcome is unknown: {other}")
                    }
                }
                n += 1;
            }
            (acked, unknown, n)
        })
    };
    tokio::time::sleep(Duration::from_millis(1500)).await;
    c.kill(leader);
    let (acked, unknown, total) = writer.await.unwrap();
    println!(
        "sets: {total} attempted, {} acknowledged, {unknown} with unknown outcome",
        acked.len()
    );
    assert!(acked.len() as u32 + unknown == total);
    assert!(acked.len() > 50, "too few writes got through");
    let stored = client.get_prefix("stream/").await.unwrap();
    let stored: BTreeMap<String, String> = stored
        .into_iter()
        .map(|kv| {
            (
                String::from_utf8(kv.key).unwrap(),
                String::from_utf8(kv.value).unwrap(),
            )
        })
        .collect();
    for (k, n) in &acked {
        assert_eq!(stored.get(k), Some(&n.to_string()), "acknowledged {k} lost");
    }
}
