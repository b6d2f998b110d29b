//! Linearizable reads through followers: the leader confirms a follower's read index from the
//! acknowledgement of its term that the follower's request carries, instead of a heartbeat round,
//! only where that follower and the leader are a quorum; every read still sees every write
//! acknowledged before it began.

use raftkv_testkit::*;
use std::time::Duration;

fn read_indexes(c: &Cluster, i: usize, how: &str) -> f64 {
    let (_, text) = c.http_get(i, "/metrics").expect("metrics");
    text.lines()
        .filter(|l| l.starts_with("raftkv_raft_read_index_total{") && l.contains(how))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Writes through one member, then reads each write back through `follower`, `rounds` times.
async fn write_then_read_through(c: &Cluster, writer: usize, follower: usize, rounds: usize) {
    let mut w = c.kv(writer).await;
    let mut r = c.kv(follower).await;
    for i in 0..rounds {
        let value = format!("v{i}");
        w.put(authed(put_req("lin/k", &value), &c.token))
            .await
            .expect("put");
        let got = r
            .range(authed(get_req("lin/k"), &c.token))
            .await
            .expect("linearizable read")
            .into_inner();
        let seen = got.kvs.first().map(|kv| kv.value.clone());
        assert_eq!(
            seen,
            Some(value.into_bytes()),
            "read {i} through member {follower} missed the write acknowledged before it"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_followers_reads_need_no_heartbeat_round_and_see_every_acknowledged_write() {
    let c = Cluster::start(Options::default());
    let leader = c.leader(Duration::from_secs(10)).await;
    let follower = (leader + 1) % 3;
    let other = (leader + 2) % 3;
    c.wait_members_published(Duration::from_secs(10)).await;
    let rounds_before = read_indexes(&c, leader, "quorum_round");
    let acked_before = read_indexes(&c, leader, "follower_acknowledged");
    // Writes through the leader and through the other follower (forwarded), each read back at
    // once through the follower.
    write_then_read_through(&c, leader, follower, 40).await;
    write_then_read_through(&c, other, follower, 40).await;
    // Metrics refresh on scrape; each of the 80 reads was one request to the leader.
    let acked = read_indexes(&c, leader, "follower_acknowledged") - acked_before;
    let rounds = read_indexes(&c, leader, "quorum_round") - rounds_before;
    assert!(
        acked >= 75.0,
        "only {acked} of 80 follower reads were confirmed by the follower's acknowledgement"
    );
    assert!(
        rounds < 10.0,
        "{rounds} heartbeat rounds for follower reads"
    );
    // The leader's own reads still confirm with a quorum round.
    let mut kv = c.kv(leader).await;
    for _ in 0..5 {
        kv.range(authed(get_req("lin/k"), &c.token))
            .await
            .expect("read on the leader");
    }
    let rounds = read_indexes(&c, leader, "quorum_round") - rounds_before;
    assert!(rounds >= 5.0, "the leader's own reads took {rounds} rounds");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_five_members_one_followers_acknowledgement_is_not_enough() {
    let c = Cluster::start(Options {
        nodes: 5,
        ..Options::default()
    });
    let leader = c.leader(Duration::from_secs(15)).await;
    let follower = (leader + 1) % 5;
    c.wait_members_published(Duration::from_secs(15)).await;
    let rounds_before = read_indexes(&c, leader, "quorum_round");
    write_then_read_through(&c, leader, follower, 20).await;
    let acked = read_indexes(&c, leader, "follower_acknowledged");
    let rounds = read_indexes(&c, leader, "quorum_round") - rounds_before;
    assert_eq!(
        acked, 0.0,
        "a follower and the leader are not a quorum of 5"
    );
    assert!(rounds >= 20.0, "only {rounds} quorum rounds for 20 reads");
}
