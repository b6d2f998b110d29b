//! What an SRE sees: metrics that move with the cluster, that Prometheus's own tools accept and
//! a real Prometheus scrapes; alert rules promtool accepts; a dashboard that only uses metrics
//! raftkv exports; readiness that follows contact with the leader.

use raftkv_proto::etcdserverpb as pb;
use raftkv_testkit::*;
use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use tonic::Code;

/// A file of this checkout. The manifest dir is taken at run time (cargo sets it for tests):
/// the compile-time one names wherever the shared target dir first built this test.
fn repo_file(rel: &str) -> PathBuf {
    std::env::var_os("CARGO_MANIFEST_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
        .join("..")
        .join(rel)
}

/// The value of an unlabelled-by-us series (only the constant `member` label).
fn gauge(text: &str, name: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("metric {name} missing"))
}

fn promtool(args: &[&str], stdin: Option<&str>) -> (bool, String) {
    let mut child = Command::new("promtool")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool (Debian package prometheus) is required");
    {
        use std::io::Write;
        let mut i = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            i.write_all(s.as_bytes()).unwrap();
        }
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_move_with_the_cluster_and_pass_promtool() {
    let mut c = Cluster::start(Options::default());
    let before: Vec<String> = (0..3)
        .map(|i| c.http_get(i, "/metrics").unwrap().1)
        .collect();
    let mut kv = c.kv(0).await;
    for n in 0..200 {
        kv.put(authed(put_req(&format!("load/{n}"), "v"), &c.token))
            .await
            .unwrap();
    }
    // A request denied by permissions, counted by its code.
    let nobody = c.issue("nobody", &[]);
    let s = kv
        .range(authed(get_req("load/1"), &nobody))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::PermissionDenied);
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (i, before) in before.iter().enumerate() {
        let (_, after) = c.http_get(i, "/metrics").unwrap();
        let (a0, a1) = (
            gauge(before, "raftkv_raft_applied_index"),
            gauge(&after, "raftkv_raft_applied_index"),
        );
        assert!(
            a1 >= a0 + 200.0,
            "member {}: applied index {a0} -> {a1}",
            i + 1
        );
        assert!(gauge(&after, "raftkv_store_revision") >= 201.0);
        assert!(gauge(&after, "raftkv_storage_db_size_bytes") > 0.0);
        assert!(
            after.contains("process_resident_memory_bytes"),
            "process metrics exported"
        );
        assert!(after.contains("raftkv_storage_fsync_duration_seconds_bucket"));
        let (ok, problems) = promtool(&["check", "metrics"], Some(&after));
        assert!(
            ok && problems.trim().is_empty(),
            "promtool check metrics on member {}:\n{problems}",
            i + 1
        );
    }
    let (_, m0) = c.http_get(0, "/metrics").unwrap();
    assert!(
        m0.lines()
            .any(|l| l.starts_with("raftkv_grpc_requests_total")
                && l.contains("code=\"PermissionDenied\"")
                && l.contains("method=\"Range\"")),
        "denied request counted by code"
    );
    assert!(m0.lines().any(
        |l| l.starts_with("raftkv_grpc_request_duration_seconds_bucket")
            && l.contains("method=\"Put\"")
    ));

    // Killing the leader moves leadership; the survivors count the change.
    let leader = c.leader(Duration::from_secs(5)).await;
    let survivor = (leader + 1) % 3;
    let changes_before = gauge(
        &c.http_get(survivor, "/metrics").unwrap().1,
        "raftkv_raft_leader_changes_total",
    );
    c.kill(leader);
    let new_leader = c.leader(Duration::from_secs(15)).await;
    assert_ne!(new_leader, leader);
    let (_, after) = c.http_get(survivor, "/metrics").unwrap();
    assert!(gauge(&after, "raftkv_raft_leader_changes_total") > changes_before);
    assert_eq!(
        gauge(&after, "raftkv_raft_leader_id"),
        c.members[new_leader].id as f64
    );
    let (_, lm) = c.http_get(new_leader, "/metrics").unwrap();
    assert_eq!(gauge(&lm, "raftkv_raft_is_leader"), 1.0);
    // The leader reports the dead member's growing lag.
    let mut kv = c.kv(new_leader).await;
    for n in 0..20 {
        kv.put(authed(put_req(&format!("more/{n}"), "v"), &c.token))
            .await
            .unwrap();
    }
    let (_, lm) = c.http_get(new_leader, "/metrics").unwrap();
    let dead = format!("follower=\"{:x}\"", c.members[leader].id);
    let lag = lm
        .lines()
        .find(|l| {
            l.starts_with("raftkv_raft_follower_replication_lag_entries") && l.contains(&dead)
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .expect("lag of the dead member reported");
    assert!(lag >= 20.0, "lag {lag}");
}

#[test]
fn alert_rules_pass_promtool_and_the_dashboard_uses_exported_metrics() {
    let rules = repo_file("charts/raftkv-operator/files/prometheus-rules.yaml");
    let (ok, out) = promtool(&["check", "rules", rules.to_str().unwrap()], None);
    assert!(ok, "promtool check rules:\n{out}");
    assert!(out.contains("SUCCESS"), "{out}");
    let rules_text = std::fs::read_to_string(&rules).unwrap();
    for alert in [
        "NoLeader",
        "FrequentLeaderChanges",
        "FollowerLagging",
        "DiskNearlyFull",
        "HighRequestErrorRate",
        "AuthFailureSpike",
    ] {
        assert!(
            rules_text.contains(&format!("alert: Raftkv{alert}")),
            "alert {alert}"
        );
    }

    // Every raftkv_* metric the dashboard and the rules query is one a member exports.
    let c = Cluster::start(Options::default());
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(c.leader(Duration::from_secs(10)));
    let mut exported = BTreeSet::new();
    for i in 0..3 {
        let (_, text) = c.http_get(i, "/metrics").unwrap();
        exported.extend(
            text.lines()
                .filter(|l| l.starts_with("# TYPE "))
                .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string)),
        );
    }
    let dashboard = std::fs::read_to_string(repo_file(
        "charts/raftkv-operator/files/grafana-dashboard.json",
    ))
    .unwrap();
    let parsed: serde_json::Value = serde_json::from_str(&dashboard).expect("dashboard is JSON");
    assert!(parsed["panels"].as_array().unwrap().len() >= 10);
    for text in [&dashboard, &rules_text] {
        for word in text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')) {
            // The operator's metrics are checked against its registry in its own tests.
            if !word.starts_with("raftkv_") || word.starts_with("raftkv_operator_") {
                continue;
            }
            let base = word
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                exported.contains(base),
                "{word} is queried but not exported"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_real_prometheus_scrapes_every_member() {
    let c = Cluster::start(Options::default());
    let dir = tempfile::tempdir().unwrap();
    let targets: Vec<String> = (0..3)
        .map(|i| format!("'127.0.0.1:{}'", c.members[i].ports.metrics))
        .collect();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: raftkv\n    static_configs:\n      - targets: [{}]\nrule_files:\n  - {}\n",
            targets.join(", "),
            repo_file("charts/raftkv-operator/files/prometheus-rules.yaml").display()
        ),
    )
    .unwrap();
    let port = free_port();
    let mut prom = Command::new("prometheus")
        .arg(format!("--config.file={}", config.display()))
        .arg(format!(
            "--storage.tsdb.path={}",
            dir.path().join("data").display()
        ))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
        .spawn()
        .expect("prometheus (Debian package) is required");
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut members = BTreeSet::new();
    while Instant::now() < deadline {
        if let Some((200, body)) = http_get(port, "/api/v1/query?query=raftkv_raft_term") {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            members = v["data"]["result"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|r| r["metric"]["member"].as_str().map(str::to_string))
                        .collect()
                })
                .unwrap_or_default();
            if members.len() == 3 {
                break;
            }
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = prom.kill();
    let _ = prom.wait();
    assert_eq!(members.len(), 3, "Prometheus saw members {members:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_contact_with_the_leader() {
    let c = Cluster::start(Options::default());
    let leader = c.leader(Duration::from_secs(5)).await;
    let follower = (leader + 1) % 3;
    let others: Vec<u32> = (0..3)
        .filter(|i| *i != follower)
        .map(|i| c.members[i].child.as_ref().unwrap().id())
        .collect();
    assert!(c.is_ready(follower));
    // Freeze the other two members: the follower is cut off from any leader.
    for pid in &others {
        Command::new("kill")
            .args(["-STOP", &pid.to_string()])
            .status()
            .unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut reason = String::new();
    while Instant::now() < deadline {
        if let Some((503, body)) = c.http_get(follower, "/readyz") {
            reason = body;
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    for pid in &others {
        Command::new("kill")
            .args(["-CONT", &pid.to_string()])
            .status()
            .unwrap();
    }
    assert!(
        reason.starts_with("not ready"),
        "the cut-off follower stayed ready"
    );
    // Liveness is unaffected: the process is fine, it just cannot serve consistent requests.
    assert_eq!(
        c.http_get(follower, "/healthz").map(|(code, _)| code),
        Some(200)
    );
    c.wait_member_ready(follower, Duration::from_secs(20));
    let mut kv = c.kv(follower).await;
    kv.put(authed(put_req("after", "rejoin"), &c.token))
        .await
        .unwrap();
    let got = kv
        .range(authed(
            pb::RangeRequest {
                key: b"after".to_vec(),
                ..Default::default()
            },
            &c.token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs.len(), 1);
}
