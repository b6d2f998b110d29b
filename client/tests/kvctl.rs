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

/// e2e/s3server (built by `e2e/cluster.sh build`, on PATH via scripts/lib.sh): gofakes3 behind
/// a check of every request's SigV4 signature; stopped when dropped.
struct S3Server(std::process::Child, u16);

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn backups_go_straight_into_s3_checked_and_whole() {
    let c = Cluster::start(Options::default());
    let port = free_port();
    let s3 = S3Server(
        Command::new("e2e-s3")
            .args(["--addr", &format!("127.0.0.1:{port}")])
            .args(["--access-key", "AK-kvctl", "--secret-key", "SK-kvctl-0123"])
            .args(["--bucket", "backups"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("e2e-s3 (built by `bash e2e/cluster.sh build`) on PATH"),
        port,
    );
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", s3.1)).is_err() {
        assert!(
            std::time::Instant::now() < deadline,
            "the S3 server did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let endpoint = format!("http://127.0.0.1:{}", s3.1);
    ok(&kvctl(&c, &["put", "s3/k", "in the backup"]));
    let save = |secret: &str, target: &str| {
        let mut cmd = Command::new(workspace_bin("kvctl"));
        cmd.env("RAFTKV_ENDPOINTS", c.endpoints().join(","))
            .env("RAFTKV_TOKEN", &c.token)
            .env("AWS_ACCESS_KEY_ID", "AK-kvctl")
            .env("AWS_SECRET_ACCESS_KEY", secret)
            .args(["-o", "json", "backup", "save", target])
            .args(["--s3-endpoint", &endpoint]);
        cmd.output().unwrap()
    };

    // A prefix gets a name of its own; the object is the whole backup kvctl reports.
    let b = json(&save("SK-kvctl-0123", "s3://backups/nightly/"));
    let location = b["file"].as_str().unwrap().to_string();
    let key = location
        .strip_prefix("s3://backups/")
        .expect("an s3 location")
        .to_string();
    assert!(
        key.starts_with("nightly/raftkv-") && key.ends_with(".rkvbackup"),
        "{key}"
    );
    let bucket = raftkv_client::s3::Bucket::new(
        &endpoint,
        "backups",
        "us-east-1",
        true,
        "AK-kvctl",
        "SK-kvctl-0123",
        None,
    )
    .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    let body = rt
        .block_on(bucket.get_object(&key, 64 << 20))
        .expect("the backup object");
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("from-s3.rkvbackup");
    std::fs::write(&file, &body).unwrap();
    let info = raftkv_client::backup::inspect(&file).expect("a whole backup");
    assert_eq!(Some(info.sha256.as_str()), b["sha256"].as_str());
    assert_eq!(Some(info.revision), b["revision"].as_i64());

    // Refused credentials: one line saying so, a failing exit, and no object under the key.
    let o = save("not-the-secret", "s3://backups/refused.rkvbackup");
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.trim().lines().count(), 1, "{err}");
    assert!(
        err.starts_with("kvctl: backup destination:") && err.contains("SignatureDoesNotMatch"),
        "{err}"
    );
    assert!(
        rt.block_on(bucket.get_object("refused.rkvbackup", 1 << 20))
            .is_err()
    );
}
