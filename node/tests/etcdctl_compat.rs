//! Compatibility with a client nobody here wrote: Debian's `etcdctl` runs the same steps against a
//! raftkv cluster and a real etcd cluster (Debian's `etcd-server`) started by this test, and the
//! outputs must match once member ids, URLs, names and timings are set aside.

use raftkv_testkit::*;
use std::process::{Command, Stdio};

fn have(bin: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {bin}")])
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

/// Runs etcdctl with `args` (and `stdin`), returning stdout (stderr on failure, marked).
fn etcdctl(endpoints: &[String], user: Option<&str>, args: &[&str], stdin: Option<&str>) -> String {
    let mut cmd = Command::new("etcdctl");
    cmd.env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", endpoints.join(",")));
    if let Some(u) = user {
        cmd.arg(format!("--user={u}"));
    }
    cmd.args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("etcdctl");
    if let Some(input) = stdin {
        use std::io::Write;
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
    } else {
        drop(child.stdin.take());
    }
    let out = child.wait_with_output().unwrap();
    if out.status.success() {
        String::from_utf8_lossy(&out.stdout).into_owned()
    } else {
        let err = String::from_utf8_lossy(&out.stderr);
        // etcdctl prints retry warnings as JSON lines; the final line is the error.
        format!(
            "FAILED: {}",
            err.lines()
                .filter(|l| !l.starts_with('{'))
                .collect::<Vec<_>>()
                .join("\n")
        )
    }
}

/// Drops what differs between any two clusters: ids, terms, URLs, names, versions, sizes.
fn normalize(s: &str) -> String {
    let mut out = Vec::new();
    for line in s.lines() {
        let trimmed = line.trim();
        if (trimmed.starts_with('{') || trimmed.starts_with('['))
            && serde_json::from_str::<serde_json::Value>(trimmed).is_ok()
        {
            let mut v: serde_json::Value = serde_json::from_str(trimmed).unwrap();
            scrub(&mut v);
            out.push(v.to_string());
        } else {
            out.push(line.to_string());
        }
    }
    out.join("\n")
}

fn scrub(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            for k in [
                "cluster_id",
                "member_id",
                "raft_term",
                "ID",
                "id",
                "name",
                "peerURLs",
                "clientURLs",
                "version",
                "dbSize",
                "dbSizeInUse",
                "raftIndex",
                "raftTerm",
                "raftAppliedIndex",
                "leader",
                "Endpoint",
                "storageVersion",
                "dbSizeQuota",
            ] {
                m.remove(k);
            }
            for (_, x) in m.iter_mut() {
                scrub(x);
            }
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(scrub),
        _ => {}
    }
}

/// Member list lines: "id, started, name, peer, client, learner" -> "started, learner".
fn normalize_members(s: &str) -> Vec<String> {
    let mut v: Vec<String> = s
        .lines()
        .map(|l| {
            let f: Vec<&str> = l.split(", ").collect();
            format!("{}, {}", f.get(1).unwrap_or(&""), f.get(5).unwrap_or(&""))
        })
        .collect();
    v.sort();
    v
}

#[test]
fn etcdctl_output_matches_real_etcd() {
    if !have("etcd") || !have("etcdctl") {
        panic!(
            "etcd and etcdctl are required (Debian packages etcd-server and etcd-client; .ci/run installs them)"
        );
    }
    let etcd = Etcd::start("etcd", 3, &["--initial-cluster-token", "compat"]);
    let c = Cluster::start(Options::default());
    let raftkv_eps: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", c.members[i].ports.client))
        .collect();
    let root = format!("root:{}", c.root_password);
    // Same users on both: root with the same password, auth on.
    let setup = [
        vec!["user", "add", &root],
        vec!["user", "grant-role", "root", "root"],
        vec!["auth", "enable"],
    ];
    for args in &setup {
        let out = etcdctl(&etcd.endpoints, None, args, None);
        assert!(!out.starts_with("FAILED"), "etcd setup {args:?}: {out}");
    }

    let txn_in = "value(\"k1\") = \"v1\"\n\nput k1 v1-updated\nget k1\n\nput k1 never\n\n";
    let txn_fail = "mod(\"k1\") = \"1\"\n\nput k1 never\n\nget k1\n\n";
    let steps: Vec<(Vec<&str>, Option<&str>)> = vec![
        (vec!["put", "k1", "v1"], None),
        (vec!["put", "k1", "v1b", "--prev-kv"], None),
        (vec!["put", "k1", "v1"], None),
        (vec!["put", "a/1", "one"], None),
        (vec!["put", "a/2", "two"], None),
        (vec!["put", "a/3", "three"], None),
        (vec!["put", "b/1", "bee"], None),
        (vec!["get", "k1"], None),
        (vec!["get", "k1", "-w", "json"], None),
        (vec!["get", "missing"], None),
        (vec!["get", "a/", "--prefix"], None),
        (vec!["get", "a/", "--prefix", "-w", "json"], None),
        (vec!["get", "a/2", "--from-key"], None),
        (vec!["get", "a/", "--prefix", "--limit", "2"], None),
        (
            vec!["get", "a/", "--prefix", "--limit", "2", "-w", "json"],
            None,
        ),
        (vec!["get", "a/", "--prefix", "--keys-only"], None),
        (
            vec![
                "get",
                "a/",
                "--prefix",
                "--sort-by",
                "MODIFY",
                "--order",
                "DESCEND",
            ],
            None,
        ),
        (vec!["get", "k1", "--rev", "2"], None),
        (vec!["get", "k1", "--rev", "3", "-w", "json"], None),
        (
            vec!["get", "a/", "--prefix", "--count-only", "-w", "json"],
            None,
        ),
        (vec!["get", "k1", "--print-value-only"], None),
        (vec!["txn"], Some(txn_in)),
        (vec!["txn", "-w", "json"], Some(txn_fail)),
        (vec!["del", "b/1", "--prev-kv"], None),
        (vec!["del", "a/", "--prefix"], None),
        (vec!["del", "nothing"], None),
        (vec!["get", "", "--prefix", "-w", "json"], None),
        (vec!["compaction", "5"], None),
        (vec!["get", "k1", "--rev", "3"], None),
        (vec!["compaction", "3"], None),
        (vec!["get", "k1", "--rev", "99"], None),
        (vec!["put", "", "x"], None),
    ];
    let mut mismatches = Vec::new();
    let mut outputs = std::collections::HashMap::new();
    for (args, stdin) in &steps {
        let want = normalize(&etcdctl(&etcd.endpoints, Some(&root), args, *stdin));
        let got = normalize(&etcdctl(&raftkv_eps, Some(&root), args, *stdin));
        outputs.insert(args.join(" "), got.clone());
        if want != got {
            mismatches.push(format!(
                "etcdctl {}:\n  etcd:   {want:?}\n  raftkv: {got:?}",
                args.join(" ")
            ));
        }
    }

    // The steps did what they say (so a match is not two identical failures).
    assert_eq!(outputs["get k1"], "k1\nv1");
    assert_eq!(outputs["get a/ --prefix --limit 2"], "a/1\none\na/2\ntwo");
    assert!(outputs["txn"].starts_with("SUCCESS"), "{}", outputs["txn"]);
    assert!(
        outputs["compaction 5"].contains("compacted revision 5"),
        "{}",
        outputs["compaction 5"]
    );
    assert!(outputs["get k1 --rev 3"].contains("required revision has been compacted"));

    // member list and endpoint status describe different machines; compare their shape.
    let want = normalize_members(&etcdctl(
        &etcd.endpoints,
        Some(&root),
        &["member", "list"],
        None,
    ));
    let got = normalize_members(&etcdctl(
        &raftkv_eps,
        Some(&root),
        &["member", "list"],
        None,
    ));
    if want != got {
        mismatches.push(format!(
            "member list:\n  etcd:   {want:?}\n  raftkv: {got:?}"
        ));
    }
    let want = normalize(&etcdctl(
        &etcd.endpoints,
        Some(&root),
        &["endpoint", "status", "-w", "json"],
        None,
    ));
    let got = normalize(&etcdctl(
        &raftkv_eps,
        Some(&root),
        &["endpoint", "status", "-w", "json"],
        None,
    ));
    if want != got {
        mismatches.push(format!(
            "endpoint status:\n  etcd:   {want:?}\n  raftkv: {got:?}"
        ));
    }
    let status = etcdctl(&raftkv_eps, Some(&root), &["endpoint", "status"], None);
    assert_eq!(
        status.lines().count(),
        3,
        "one status line per endpoint: {status}"
    );
    assert_eq!(
        status.matches(", true, false,").count(),
        1,
        "exactly one leader: {status}"
    );

    // A wrong password is refused by both.
    let wrong = etcdctl(&raftkv_eps, Some("root:wrong"), &["get", "k1"], None);
    assert!(wrong.contains("authentication failed"), "{wrong}");

    assert!(
        mismatches.is_empty(),
        "etcdctl output differs:\n{}",
        mismatches.join("\n")
    );
}
