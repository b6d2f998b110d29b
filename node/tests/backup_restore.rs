//! Backups: saved by etcd 3.6's `etcdctl snapshot save` or `kvctl backup save` while writes go on,
//! restored with `raftkv restore` into a new 3-member cluster that holds exactly the source's
//! keys, values, revisions, versions and leases at the backup's revision; corrupt files,
//! missing keys and used data directories are refused without writing anything.

use raftkv_proto::etcdserverpb as pb;
use raftkv_testkit::*;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

fn everything_at(revision: i64) -> pb::RangeRequest {
    pb::RangeRequest {
        key: vec![0],
        range_end: vec![0],
        revision,
        ..Default::default()
    }
}

/// Key, value, create and mod revisions, version and lease of a key-value.
type Row = (Vec<u8>, Vec<u8>, i64, i64, i64, i64);

fn rows(kvs: &[raftkv_proto::mvccpb::KeyValue]) -> Vec<Row> {
    kvs.iter()
        .map(|k| {
            (
                k.key.clone(),
                k.value.clone(),
                k.create_revision,
                k.mod_revision,
                k.version,
                k.lease,
            )
        })
        .collect()
}

fn kvctl(args: &[&str], endpoint: &str, token: &str) -> std::process::Output {
    Command::new(workspace_bin("kvctl"))
        .args([
            "--endpoints",
            endpoint,
            "--token",
            token,
            "--timeout",
            "60s",
        ])
        .args(args)
        .output()
        .expect("run kvctl")
}

fn inspect(file: &Path) -> serde_json::Value {
    let out = Command::new(workspace_bin("kvctl"))
        .args(["backup", "inspect", "-o", "json"])
        .arg(file)
        .output()
        .expect("run kvctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("json")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_taken_under_writes_restores_into_a_new_cluster_with_identical_data() {
    let src = Cluster::start(Options::default());
    let mut kv = src.kv(0).await;
    // History: every key written three times, some deleted, some attached to a lease.
    for round in 0..3 {
        for i in 0..60 {
            kv.put(authed(
                put_req(&format!("data/{i:03}"), &format!("v{round}-{i}")),
                &src.token,
            ))
            .await
            .unwrap();
        }
    }
    for i in 0..10 {
        kv.delete_range(authed(
            pb::DeleteRangeRequest {
                key: format!("data/{i:03}").into(),
                ..Default::default()
            },
            &src.token,
        ))
        .await
        .unwrap();
    }
    let mut lease = src.lease(0).await;
    let lease_id = lease
        .lease_grant(authed(
            pb::LeaseGrantRequest { ttl: 600, id: 0 },
            &src.token,
        ))
        .await
        .unwrap()
        .into_inner()
        .id;
    for i in 0..5 {
        let mut p = put_req(&format!("leased/{i}"), "held");
        p.lease = lease_id;
        kv.put(authed(p, &src.token)).await.unwrap();
    }

    // Writes keep coming while the backup is taken.
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let stop = stop.clone();
        let mut kv = src.kv(1).await;
        let token = src.token.clone();
        tokio::spawn(async move {
            let mut n = 0;
            while !stop.load(Ordering::Relaxed) {
                kv.put(authed(put_req(&format!("live/{n:05}"), "x"), &token))
                    .await
                    .unwrap();
                n += 1;
            }
            n
        })
    };
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("snapshot.db");
    let endpoint = format!("127.0.0.1:{}", src.members[2].ports.client);
    // etcd 3.6's etcdctl checks that the stream ends in a SHA-256 after 512-byte alignment.
    let out = Command::new("etcdctl-3.6")
        .args(["--endpoints", &endpoint])
        .args(["--user", &format!("root:{}", src.root_password)])
        .args(["snapshot", "save"])
        .arg(&file)
        .output()
        .expect("etcdctl-3.6 is built by `bash e2e/cluster.sh build` (scripts/test.sh runs it)");
    assert!(
        out.status.success(),
        "etcdctl snapshot save: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let live_writes = writer.await.unwrap();
    assert!(live_writes > 0);

    let info = inspect(&file);
    let r = info["revision"].as_i64().expect("revision");
    let expected = kv
        .range(authed(everything_at(r), &src.token))
        .await
        .unwrap()
        .into_inner();
    let now = kv
        .range(authed(everything_at(0), &src.token))
        .await
        .unwrap()
        .into_inner();
    assert!(
        now.header.unwrap().revision > r,
        "writes went on after the backup's revision"
    );
    assert!(expected.kvs.iter().any(|k| k.key.starts_with(b"live/")));

    // A second backup through kvctl, from another member.
    let second = dir.path().join("second.rkvbackup");
    let out = kvctl(
        &["backup", "save", second.to_str().unwrap()],
        &src.endpoint(0),
        &src.token,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(inspect(&second)["revision"].as_i64().unwrap() >= now.header.unwrap().revision);

    let dst = Cluster::start_restored(Options::default(), &file, &src.keyring);
    for i in 0..3 {
        let mut kv = dst.kv(i).await;
        let got = kv
            .range(authed(
                pb::RangeRequest {
                    serializable: i > 0,
                    ..everything_at(0)
                },
                &dst.token,
            ))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.header.unwrap().revision, r, "member {}", i + 1);
        assert_eq!(
            rows(&got.kvs),
            rows(&expected.kvs),
            "member {} holds the source's data at revision {r}",
            i + 1
        );
    }
    // History before the backup's revision came along too.
    let mut kv = dst.kv(0).await;
    let old = kv
        .range(authed(
            pb::RangeRequest {
                key: b"data/050".to_vec(),
                revision: 100,
                ..Default::default()
            },
            &dst.token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(old.kvs.len(), 1);
    assert_eq!(old.kvs[0].value, b"v0-50");
    // The lease is there with its keys, and new writes continue the revisions.
    let mut lease = dst.lease(0).await;
    let ttl = lease
        .lease_time_to_live(authed(
            pb::LeaseTimeToLiveRequest {
                id: lease_id,
                keys: true,
            },
            &dst.token,
        ))
        .await
        .unwrap()
        .into_inner();
    assert!(ttl.ttl > 0, "{ttl:?}");
    assert_eq!(ttl.keys.len(), 5);
    let put = kv
        .put(authed(put_req("after-restore", "1"), &dst.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(put.header.unwrap().revision, r + 1);
    // Password logins work with the source's users.
    let mut auth = dst.auth(1).await;
    auth.authenticate(pb::AuthenticateRequest {
        name: "root".into(),
        password: dst.root_password.clone(),
    })
    .await
    .expect("the source's root user logs in");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restore_refuses_corrupt_backups_missing_keys_and_used_directories() {
    let src = Cluster::start(Options::default());
    let mut kv = src.kv(0).await;
    kv.put(authed(put_req("k", "v"), &src.token)).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("b.rkvbackup");
    let out = kvctl(
        &["backup", "save", file.to_str().unwrap()],
        &src.endpoint(1),
        &src.token,
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let restore = |from: &Path, data: &Path, keyring: &Path| {
        Command::new(bin())
            .arg("restore")
            .arg("--from")
            .arg(from)
            .arg("--data-dir")
            .arg(data)
            .args(["--id", "1", "--cluster-token", "new"])
            .arg("--encryption-keyring-file")
            .arg(keyring)
            .output()
            .expect("run raftkv")
    };
    let stderr = |o: &std::process::Output| String::from_utf8_lossy(&o.stderr).to_string();

    let bytes = std::fs::read(&file).unwrap();
    let cut = dir.path().join("cut");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let target = dir.path().join("d1");
    let o = restore(&cut, &target, &src.keyring);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("truncated"), "{}", stderr(&o));
    assert!(!target.exists(), "nothing is written for a refused backup");

    let other_ring = dir.path().join("other-keyring.json");
    std::fs::write(&other_ring, raftkv::crypto::Keyring::generate().to_json()).unwrap();
    let o = restore(&file, &target, &other_ring);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("key id"), "{}", stderr(&o));
    assert!(!target.exists());

    // Nor is any half-assembled member left beside it.
    let leftovers: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().contains("restoring"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let used = src.members[2].dir.clone();
    let o = restore(&file, &used, &src.keyring);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("not empty"), "{}", stderr(&o));
    assert!(used.join("db").exists(), "the member's data is untouched");

    let o = restore(&file, &target, &src.keyring);
    assert!(o.status.success(), "{}", stderr(&o));
    // A member that was not restored cannot join the restored one: its cluster id differs.
    let restored: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(target.join("raftkv-identity.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(
        restored["cluster_id"].as_u64().unwrap(),
        raftkv::bootstrap::restored_cluster_id("new", restored["restored_from"].as_str().unwrap())
    );
    assert_ne!(
        restored["cluster_id"].as_u64().unwrap(),
        raftkv::bootstrap::cluster_id("new")
    );
}
