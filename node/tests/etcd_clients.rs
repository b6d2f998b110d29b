//! etcd's own Go clients against raftkv, and the same tests against a real etcd: locks,
//! elections and STM of clientv3/concurrency, the Lock and Election services through their
//! generated clients, progress notifications under 650 writes, and a leader-required watch on a
//! member cut off from the others (etcd-clients/clients_test.go). A failure on etcd means the
//! test is wrong; a failure on raftkv, that raftkv is. The etcd is 3.6, built from Go modules by
//! `e2e/cluster.sh build` (bench/etcd): Debian's 3.4 answers a progress request with the store's
//! revision even while the watcher still has events to deliver, which Kubernetes' watch cache
//! cannot use and later etcd releases fixed.

use raftkv_testkit::*;
use std::path::Path;
use std::process::Command;

fn go_test(endpoints: &[String], user: Option<(&str, &str)>, pids: &[u32], skip: &str) -> String {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../etcd-clients");
    let mut cmd = Command::new("go");
    cmd.current_dir(&dir)
        .args(["test", "-count=1", "-v", "-timeout", "10m"])
        .env("ETCD_CLIENTS_ENDPOINTS", endpoints.join(","))
        .env(
            "ETCD_CLIENTS_PIDS",
            pids.iter()
                .map(|p| p.to_string())
                .collect::<Vec<_>>()
                .join(","),
        );
    if !skip.is_empty() {
        cmd.args(["-skip", skip]);
    }
    if let Some((u, p)) = user {
        cmd.env("ETCD_CLIENTS_USER", u)
            .env("ETCD_CLIENTS_PASSWORD", p);
    }
    let out = cmd.output().expect("go is installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "go test failed:\n{text}");
    text
}

#[test]
fn stock_go_clients_work_against_raftkv() {
    let c = Cluster::start(Options::default());
    let endpoints: Vec<String> = c
        .members
        .iter()
        .map(|m| format!("127.0.0.1:{}", m.ports.client))
        .collect();
    let pids: Vec<u32> = c
        .members
        .iter()
        .filter_map(|m| m.child.as_ref().map(|ch| ch.id()))
        .collect();
    let out = go_test(&endpoints, Some(("root", &c.root_password)), &pids, "");
    for line in out
        .lines()
        .filter(|l| l.contains("---") || l.contains("ended"))
    {
        println!("{line}");
    }
}

#[test]
fn the_same_go_tests_pass_against_etcd() {
    let etcd = Etcd::start(
        "etcd-3.6",
        3,
        &["--heartbeat-interval", "50", "--election-timeout", "500"],
    );
    let (endpoints, pids) = (etcd.endpoints.clone(), etcd.pids());
    let out = go_test(&endpoints, None, &pids, "");
    for line in out
        .lines()
        .filter(|l| l.contains("---") || l.contains("ended"))
    {
        println!("{line}");
    }
}
