//! kvctl spawned as a process against a real cluster: every subcommand, tables and JSON, and
//! one-line errors with non-zero exits.

use raftkv_testkit::*;
use std::process::{Command, Output, Stdio};

fn kvctl(c: &Cluster, args: &[&str]) -> Output {
    kvctl_with(c, args, None)
}

fn kvctl_with(c: &Cluster, args: &[&str], stdin: Option<&str>) -> Output {
    let mut cmd = Command::new(workspace_bin("kvctl"));
    cmd.env("RAFTKV_ENDPOINTS", c.endpoints().join(","))
        .env("RAFTKV_TOKEN", &c.token)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn kvctl");
    {
        use std::io::Write;
        let mut input = child.stdin.take().unwrap();
        if let Some(s) = stdin {
            input.write_all(s.as_bytes()).unwrap();
        }
    }
    child.wait_with_output().unwrap()
}

fn ok(o: &Output) -> String {
    assert!(
        o.status.success(),
        "kvctl failed ({}): {}",
        o.status,
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn json(o: &Output) -> serde_json::Value {
    serde_json::from_str(ok(o).trim()).expect("kvctl -o json prints JSON")
}

#[test]
fn every_subcommand_works_in_tables_and_json() {
    let c = Cluster::start(Options::default());
    let out = ok(&kvctl(&c, &["put", "app/one", "1"]));
    assert!(out.starts_with("OK (revision "), "{out}");
    ok(&kvctl(&c, &["put", "app/two", "2"]));
    let first_rev = json(&kvctl(
        &c,
        &["-o", "json", "put", "app/one", "uno", "--prev-kv"],
    ));
    assert_eq!(first_rev["prev_kv"]["value"], "1");

    let table = ok(&kvctl(&c, &["get", "app/", "--prefix"]));
    assert!(table.lines().next().unwrap().starts_with("KEY"), "{table}");
    assert!(table.contains("app/one") && table.contains("uno") && table.contains("app/two"));
    let j = json(&kvctl(
        &c,
        &["get", "app/", "--prefix", "--limit", "1", "-o", "json"],
    ));
    assert_eq!(j["kvs"].as_array().unwrap().len(), 1);
    assert_eq!(j["more"], true);
    assert_eq!(j["count"], 2);
    let rev = first_rev["revision"].as_i64().unwrap();
    let old = json(&kvctl(
        &c,
        &[
            "get",
            "app/one",
            "--rev",
            &(rev - 1).to_string(),
            "-o",
            "json",
        ],
    ));
    assert_eq!(old["kvs"][0]["value"], "1");

    let txn = "if\n  value(\"app/one\") == \"uno\"\nthen\n  put app/three 3\n  get --prefix app/\nelse\n  get app/one\n";
    let out = ok(&kvctl_with(&c, &["txn"], Some(txn)));
    assert!(out.starts_with("SUCCESS"), "{out}");
    assert!(out.contains("get: app/three = 3"), "{out}");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("swap.txn");
    std::fs::write(
        &file,
        "if\n  version(\"app/three\") == 5\nthen\n  del app/three\nelse\n  get app/three\n",
    )
    .unwrap();
    let j = json(&kvctl(&c, &["txn", file.to_str().unwrap(), "-o", "json"]));
    assert_eq!(j["succeeded"], false);
    assert_eq!(j["kvs"][0]["value"], "3");

    assert_eq!(ok(&kvctl(&c, &["del", "app/three"])).trim(), "deleted 1");
    assert_eq!(
        json(&kvctl(&c, &["del", "app/", "--prefix", "-o", "json"]))["deleted"],
        2
    );

    let members = ok(&kvctl(&c, &["members"]));
    assert_eq!(members.lines().count(), 4, "{members}");
    assert!(members.contains("node-1") && members.contains("false"));
    let members = json(&kvctl(&c, &["members", "-o", "json"]));
    assert_eq!(members.as_array().unwrap().len(), 3);

    let status = ok(&kvctl(&c, &["status"]));
    assert_eq!(status.lines().count(), 4, "{status}");
    assert_eq!(status.matches(" yes ").count(), 1, "one leader: {status}");
    let status = json(&kvctl(&c, &["status", "-o", "json"]));
    for s in status.as_array().unwrap() {
        assert!(s["applied_index"].as_u64().unwrap() > 0);
        assert!(s["db_size"].as_i64().unwrap() > 0);
    }

    let leader = ok(&kvctl(&c, &["leader"]));
    assert!(leader.contains("node-"), "{leader}");

    let cur = json(&kvctl(&c, &["put", "k", "v", "-o", "json"]))["revision"]
        .as_i64()
        .unwrap();
    assert_eq!(
        ok(&kvctl(&c, &["compact", &cur.to_string()])).trim(),
        format!("compacted revision {cur}")
    );
    let e = kvctl(&c, &["get", "k", "--rev", "2"]);
    assert_eq!(e.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&e.stderr).contains("required revision has been compacted"));

    // Tokens minted with the cluster secret work; the role decides what they may do.
    let token = ok(&kvctl(
        &c,
        &[
            "token",
            "create",
            "--subject",
            "ops",
            "--role",
            "root",
            "--ttl",
            "10m",
            "--secret-file",
            c.secret.to_str().unwrap(),
        ],
    ));
    let o = Command::new(workspace_bin("kvctl"))
        .env("RAFTKV_ENDPOINTS", c.endpoints().join(","))
        .env("RAFTKV_TOKEN", token.trim())
        .args(["get", "k"])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    let bench = ok(&kvctl(
        &c,
        &[
            "bench",
            "--workload",
            "mixed",
            "--clients",
            "4",
            "--duration",
            "1s",
            "--warmup",
            "200ms",
            "--key-space",
            "100",
            "--json",
            "--quiet",
        ],
    ));
    let b: serde_json::Value = serde_json::from_str(bench.trim()).unwrap();
    assert!(b["ops"].as_u64().unwrap() > 0);
    assert_eq!(b["errors"], 0);
}

#[test]
fn errors_are_one_line_with_non_zero_exits() {
    let c = Cluster::start(Options::default());
    // A dead endpoint.
    let port = free_port();
    let o = Command::new(workspace_bin("kvctl"))
        .args([
            "--endpoints",
            &format!("127.0.0.1:{port}"),
            "--token",
            &c.token,
            "--timeout",
            "1s",
            "get",
            "k",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(err.starts_with("kvctl: no endpoint is reachable"), "{err}");

    // A malformed transaction: exit 2 and the offending line.
    let o = kvctl_with(
        &c,
        &["txn"],
        Some("if\n  size(\"k\") == 3\nthen\n  put k v\n"),
    );
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("txn line 2: unknown compare target"), "{err}");
    assert_eq!(err.trim().lines().count(), 1);

    // A request the server refuses.
    let o = kvctl(&c, &["put", "", "v"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("key is not provided"));

    // No token.
    let o = Command::new(workspace_bin("kvctl"))
        .env_remove("RAFTKV_TOKEN")
        .args(["--endpoints", &c.endpoints().join(","), "get", "k"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("missing auth token"));

    // Usage errors come from the argument parser.
    let o = kvctl(&c, &["put", "only-a-key"]);
    assert_eq!(o.status.code(), Some(2));
}
