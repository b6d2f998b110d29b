//! Security against a hostile client and a stolen disk: token checks, key-range permissions,
//! encryption at rest (including on a disk read directly), key rotation, and TLS.

use base64::Engine;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use raftkv_proto::etcdserverpb as pb;
use raftkv_testkit::*;
use serde_json::json;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tonic::Code;

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sign(alg: Algorithm, key: &EncodingKey, claims: serde_json::Value) -> String {
    jsonwebtoken::encode(&Header::new(alg), &claims, key).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_tokens_are_unauthenticated_and_apply_nothing() {
    let dir = tempfile::tempdir().unwrap();
    openssl(
        dir.path(),
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "rsa.key",
        ],
    );
    openssl(
        dir.path(),
        &["pkey", "-in", "rsa.key", "-pubout", "-out", "rsa.pub"],
    );
    openssl(
        dir.path(),
        &[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "other.key",
        ],
    );
    let pubkey = dir.path().join("rsa.pub");
    let c = Cluster::start(Options {
        auth_args: Some(vec![
            "--jwt-rs256-public-key-file".into(),
            pubkey.display().to_string(),
            "--jwt-issuer".into(),
            "https://issuer.example".into(),
            "--jwt-audience".into(),
            "raftkv".into(),
            "--jwt-leeway-seconds".into(),
            "5".into(),
        ]),
        ..Default::default()
    });
    let rsa =
        EncodingKey::from_rsa_pem(&std::fs::read(dir.path().join("rsa.key")).unwrap()).unwrap();
    let other =
        EncodingKey::from_rsa_pem(&std::fs::read(dir.path().join("other.key")).unwrap()).unwrap();
    let claims = |extra: serde_json::Value| {
        let mut c = json!({"sub": "svc", "roles": ["root"], "iss": "https://issuer.example", "aud": "raftkv", "exp": now() + 600});
        for (k, v) in extra.as_object().unwrap() {
            c[k] = v.clone();
        }
        c
    };
    let good = sign(Algorithm::RS256, &rsa, claims(json!({})));
    let mut kv = c.kv(0).await;
    kv.put(authed(put_req("control", "ok"), &good))
        .await
        .expect("a valid RS256 token works");

    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let payload = good.split('.').nth(1).unwrap().to_string();
    let tampered = {
        let p: serde_json::Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(&payload)
                .unwrap(),
        )
        .unwrap();
        let mut p = p;
        p["sub"] = json!("someone-else");
        let parts: Vec<&str> = good.split('.').collect();
        format!("{}.{}.{}", parts[0], b64(&p.to_string()), parts[2])
    };
    // The classic key-confusion attack: HS256 "signed" with the RSA public key as the secret.
    let confused = sign(
        Algorithm::HS256,
        &EncodingKey::from_secret(&std::fs::read(&pubkey).unwrap()),
        claims(json!({})),
    );
    let cases: Vec<(&str, Option<String>, &str)> = vec![
        ("no token", None, "missing auth token"),
        (
            "expired",
            Some(sign(
                Algorithm::RS256,
                &rsa,
                claims(json!({"exp": now() - 3600})),
            )),
            "etcdserver: invalid auth token",
        ),
        (
            "not yet valid",
            Some(sign(
                Algorithm::RS256,
                &rsa,
                claims(json!({"nbf": now() + 3600})),
            )),
            "not valid yet",
        ),
        (
            "wrong signature",
            Some(sign(Algorithm::RS256, &other, claims(json!({})))),
            "signature is invalid",
        ),
        (
            "alg none",
            Some(format!(
                "{}.{payload}.",
                b64(r#"{"alg":"none","typ":"JWT"}"#)
            )),
            "algorithm 'none'",
        ),
        (
            "HS256 on an RS256 cluster",
            Some(confused),
            "algorithm 'HS256'",
        ),
        ("tampered payload", Some(tampered), "signature is invalid"),
        (
            "wrong audience",
            Some(sign(
                Algorithm::RS256,
                &rsa,
                claims(json!({"aud": "someone-else"})),
            )),
            "audience",
        ),
        (
            "wrong issuer",
            Some(sign(
                Algorithm::RS256,
                &rsa,
                claims(json!({"iss": "https://evil.example"})),
            )),
            "issuer",
        ),
        (
            "exp as a string",
            Some(sign(
                Algorithm::RS256,
                &rsa,
                claims(json!({"exp": "tomorrow"})),
            )),
            "claims are invalid",
        ),
        (
            "garbage",
            Some("garbage.bytes.!!".into()),
            "well-formed JWT",
        ),
        (
            "not a JWT at all",
            Some("this-is-not-a-jwt".into()),
            "well-formed JWT",
        ),
    ];
    for (name, token, want) in &cases {
        let req = match token {
            Some(t) => {
                let mut r = tonic::Request::new(put_req("stolen", name));
                if let Ok(v) = format!("Bearer {t}").parse() {
                    r.metadata_mut().insert("authorization", v);
                }
                r
            }
            None => tonic::Request::new(put_req("stolen", name)),
        };
        let s = kv.put(req).await.expect_err(name);
        assert_eq!(s.code(), Code::Unauthenticated, "{name}: {s:?}");
        assert!(
            s.message().contains(want),
            "{name}: message {:?} should mention {want:?}",
            s.message()
        );
    }
    // etcd's own metadata key works too, and the expired case says why in a trailer.
    let mut r = tonic::Request::new(pb::RangeRequest {
        key: b"control".to_vec(),
        ..Default::default()
    });
    r.metadata_mut().insert("token", good.parse().unwrap());
    kv.range(r)
        .await
        .expect("etcd's `token` metadata key is accepted");
    let expired = sign(Algorithm::RS256, &rsa, claims(json!({"exp": now() - 3600})));
    let s = kv
        .put(authed(put_req("stolen", "x"), &expired))
        .await
        .unwrap_err();
    assert_eq!(
        s.metadata().get("raftkv-auth-reason").unwrap(),
        "token has expired"
    );

    let got = kv
        .range(authed(get_req("stolen"), &good))
        .await
        .unwrap()
        .into_inner();
    assert!(got.kvs.is_empty(), "no refused request may write");
    let (_, metrics) = c.http_get(0, "/metrics").unwrap();
    for reason in [
        "missing",
        "expired",
        "signature",
        "algorithm",
        "audience",
        "issuer",
    ] {
        assert!(
            metrics.contains(&format!(
                "raftkv_auth_failures_total{{member=\"1\",reason=\"{reason}\"}}"
            )) || metrics.contains(&format!("reason=\"{reason}\"")),
            "auth failure reason {reason} counted"
        );
    }
    // Health checks need no token.
    let mut h = tonic_health_client(&c).await;
    h.check(tonic_health::pb::HealthCheckRequest {
        service: String::new(),
    })
    .await
    .unwrap();
}

async fn tonic_health_client(
    c: &Cluster,
) -> tonic_health::pb::health_client::HealthClient<tonic::transport::Channel> {
    tonic_health::pb::health_client::HealthClient::new(c.channel(0).await)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn permissions_confine_tokens_to_their_key_ranges() {
    let c = Cluster::start(Options::default());
    let root = &c.token;
    let mut auth = raftkv_proto::etcdserverpb::auth_client::AuthClient::new(c.channel(0).await);
    auth.role_add(authed(pb::AuthRoleAddRequest { name: "app".into() }, root))
        .await
        .unwrap();
    for (t, k, e) in [(0, "app/", "app0"), (2, "app/w/", "app/w0")] {
        auth.role_grant_permission(authed(
            pb::AuthRoleGrantPermissionRequest {
                name: "app".into(),
                perm: Some(raftkv_proto::authpb::Permission {
                    perm_type: t,
                    key: k.into(),
                    range_end: e.into(),
                }),
            },
            root,
        ))
        .await
        .unwrap();
    }
    let mut kv = c.kv(1).await;
    kv.put(authed(put_req("app/x", "1"), root)).await.unwrap();
    kv.put(authed(put_req("secret", "s"), root)).await.unwrap();
    let app = c.issue("service-a", &["app"]);
    let denied = |s: tonic::Status| {
        assert_eq!(s.code(), Code::PermissionDenied, "{s:?}");
        assert_eq!(s.message(), "etcdserver: permission denied");
    };
    kv.range(authed(get_req("app/x"), &app))
        .await
        .expect("read inside the READ range");
    kv.range(authed(prefix_req("app/"), &app))
        .await
        .expect("prefix read inside");
    denied(kv.range(authed(get_req("secret"), &app)).await.unwrap_err());
    let everything = pb::RangeRequest {
        key: vec![0],
        range_end: vec![0],
        ..Default::default()
    };
    denied(kv.range(authed(everything, &app)).await.unwrap_err());
    denied(
        kv.put(authed(put_req("app/x", "2"), &app))
            .await
            .unwrap_err(),
    );
    kv.put(authed(put_req("app/w/1", "ok"), &app))
        .await
        .expect("write inside the READWRITE range");
    denied(
        kv.delete_range(authed(
            pb::DeleteRangeRequest {
                key: b"secret".to_vec(),
                ..Default::default()
            },
            &app,
        ))
        .await
        .unwrap_err(),
    );
    // A txn is authorized for every key it touches, the branch that will not run included.
    let txn = pb::TxnRequest {
        compare: vec![pb::Compare {
            key: b"app/x".to_vec(),
            target: 0,
            result: 0,
            target_union: Some(pb::compare::TargetUnion::Version(1)),
            range_end: vec![],
        }],
        success: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(put_req(
                "app/w/2", "ok",
            ))),
        }],
        failure: vec![pb::RequestOp {
            request: Some(pb::request_op::Request::RequestPut(put_req(
                "secret", "pwned",
            ))),
        }],
    };
    denied(kv.txn(authed(txn, &app)).await.unwrap_err());
    let got = kv
        .range(authed(get_req("secret"), root))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs[0].value, b"s");
    assert!(
        kv.range(authed(get_req("app/w/2"), root))
            .await
            .unwrap()
            .into_inner()
            .kvs
            .is_empty()
    );
    // Administration needs the root role.
    let mut cluster =
        raftkv_proto::etcdserverpb::cluster_client::ClusterClient::new(c.channel(0).await);
    denied(
        cluster
            .member_add(authed(
                pb::MemberAddRequest {
                    peer_ur_ls: vec!["http://127.0.0.1:1".into()],
                    is_learner: true,
                    member_id: 0,
                },
                &app,
            ))
            .await
            .unwrap_err(),
    );
    denied(
        cluster
            .member_remove(authed(pb::MemberRemoveRequest { id: 2 }, &app))
            .await
            .unwrap_err(),
    );
    denied(
        kv.compact(authed(
            pb::CompactionRequest {
                revision: 2,
                physical: false,
            },
            &app,
        ))
        .await
        .unwrap_err(),
    );
    let mut maint = c.maintenance(0).await;
    denied(
        maint
            .defragment(authed(pb::DefragmentRequest {}, &app))
            .await
            .unwrap_err(),
    );
    denied(
        auth.role_add(authed(
            pb::AuthRoleAddRequest {
                name: "mine".into(),
            },
            &app,
        ))
        .await
        .unwrap_err(),
    );
    // No roles at all: deny by default.
    let nobody = c.issue("nobody", &[]);
    denied(
        kv.range(authed(get_req("app/x"), &nobody))
            .await
            .unwrap_err(),
    );

    // Users with passwords: etcdctl --user works, a wrong password does not, and revoking a
    // role takes effect at once.
    auth.user_add(authed(
        pb::AuthUserAddRequest {
            name: "alice".into(),
            password: "alice-pw".into(),
            ..Default::default()
        },
        root,
    ))
    .await
    .unwrap();
    auth.user_grant_role(authed(
        pb::AuthUserGrantRoleRequest {
            user: "alice".into(),
            role: "app".into(),
        },
        root,
    ))
    .await
    .unwrap();
    let eps: Vec<String> = (0..3)
        .map(|i| format!("127.0.0.1:{}", c.members[i].ports.client))
        .collect();
    let etcdctl = |user: &str, args: &[&str]| {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", eps.join(",")))
            .arg(format!("--user={user}"))
            .args(args)
            .output()
            .expect("etcdctl (Debian etcd-client) is required")
    };
    let o = etcdctl("alice:alice-pw", &["get", "app/x", "--print-value-only"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(String::from_utf8_lossy(&o.stdout).trim(), "1");
    let o = etcdctl("alice:alice-pw", &["put", "app/w/etcdctl", "yes"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = etcdctl("alice:alice-pw", &["get", "secret"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("permission denied"));
    let o = etcdctl("alice:wrong", &["get", "app/x"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("authentication failed"));
    auth.user_revoke_role(authed(
        pb::AuthUserRevokeRoleRequest {
            name: "alice".into(),
            role: "app".into(),
        },
        root,
    ))
    .await
    .unwrap();
    let o = etcdctl("alice:alice-pw", &["get", "app/x"]);
    assert!(!o.status.success(), "revoked role still works");
    let (_, metrics) = c.http_get(0, "/metrics").unwrap();
    assert!(
        metrics.contains("code=\"PermissionDenied\""),
        "denials are counted by code"
    );
}

async fn write_markers(c: &Cluster, marker: &str) {
    let mut kv = c.kv(0).await;
    for n in 0..400 {
        let value = format!("{marker}-{n}-{}", "x".repeat(n % 7 * 100));
        kv.put(authed(put_req(&format!("m/{n:04}"), &value), &c.token))
            .await
            .unwrap();
    }
    let mut txn_put = put_req("m/txn", &format!("{marker}-txn"));
    txn_put.prev_kv = true;
    kv.txn(authed(
        pb::TxnRequest {
            success: vec![pb::RequestOp {
                request: Some(pb::request_op::Request::RequestPut(txn_put)),
            }],
            ..Default::default()
        },
        &c.token,
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plaintext_never_reaches_the_disk() {
    let marker = "PLAINTEXT-MARKER-7f3a9c";
    // Small snapshot thresholds so snapshots (and their transfer) are exercised too.
    let opts = Options {
        snapshot_threshold: 100,
        snapshot_log_keep: 10,
        ..Default::default()
    };
    let mut c = Cluster::start(opts.clone());
    write_markers(&c, marker).await;
    for i in 0..3 {
        c.stop(i);
    }
    for i in 0..3 {
        let snapshots: Vec<_> = std::fs::read_dir(c.data_dir(i).join("db").join("snapshots"))
            .unwrap()
            .flatten()
            .collect();
        assert!(
            !snapshots.is_empty(),
            "member {} has snapshot files to scan",
            i + 1
        );
        let hits = files_containing(c.data_dir(i), marker.as_bytes());
        assert!(
            hits.is_empty(),
            "plaintext found on disk of member {}: {hits:?}",
            i + 1
        );
    }
    // The same scan finds the plaintext when encryption is off, so it can fail.
    let mut plain = Cluster::start(Options {
        encryption: false,
        ..opts
    });
    write_markers(&plain, marker).await;
    plain.stop(0);
    assert!(
        !files_containing(plain.data_dir(0), marker.as_bytes()).is_empty(),
        "control: unencrypted data is visible"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn corrupt_ciphertext_is_an_error_and_wrong_keys_refuse_to_start() {
    let mut c = Cluster::start(Options::default());
    let mut kv = c.kv(0).await;
    kv.put(authed(put_req("victim", "precious"), &c.token))
        .await
        .unwrap();
    let got = kv
        .range(authed(get_req("victim"), &c.token))
        .await
        .unwrap()
        .into_inner();
    let mod_rev = got.kvs[0].mod_revision;
    // Let member 3 apply it, then stop it and flip one bit of the stored ciphertext.
    tokio::time::sleep(Duration::from_millis(500)).await;
    c.stop(2);
    {
        use raftkv::storage::{CF_HISTORY, CF_KV, codec};
        let db_path = c.data_dir(2).join("db");
        let cfs = [
            "raft_log",
            "raft_state",
            "kv",
            "kv_history",
            "kv_revisions",
            "sm_meta",
        ];
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), &db_path, cfs).unwrap();
        let kvcf = db.cf_handle(CF_KV).unwrap();
        let mut rec = db.get_cf(kvcf, b"victim").unwrap().expect("stored record");
        let last = rec.len() - 1;
        rec[last] ^= 0x01;
        db.put_cf(kvcf, b"victim", &rec).unwrap();
        let hist = db.cf_handle(CF_HISTORY).unwrap();
        db.put_cf(hist, codec::history_key(b"victim", mod_rev), &rec)
            .unwrap();
        db.flush_wal(true).unwrap();
    }
    c.spawn(2);
    c.wait_member_ready(2, Duration::from_secs(30));
    let mut kv3 = c.kv(2).await;
    let mut req = get_req("victim");
    req.serializable = true;
    let s = kv3.range(authed(req, &c.token)).await.unwrap_err();
    assert_eq!(s.code(), Code::DataLoss, "{s:?}");
    assert!(
        s.message().contains("cannot be decrypted"),
        "{}",
        s.message()
    );
    // The healthy members still read it.
    let ok = kv
        .range(authed(get_req("victim"), &c.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(ok.kvs[0].value, b"precious");

    // A wrong key and a missing key both refuse to start, saying why.
    c.stop(2);
    let good_ring = std::fs::read_to_string(&c.keyring).unwrap();
    std::fs::write(&c.keyring, raftkv::crypto::Keyring::generate().to_json()).unwrap();
    let out = c.serve_command(2).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("is not the key the data was encrypted with"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut other = raftkv::crypto::Keyring::generate();
    other.rotate();
    other.remove(1).unwrap();
    std::fs::write(&c.keyring, other.to_json()).unwrap();
    let out = c.serve_command(2).output().unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("missing from the keyring"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(&c.keyring, good_ring).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn rotated_keys_keep_values_readable_and_reencryption_retires_old_keys() {
    let mut c = Cluster::start(Options::default());
    let mut kv = c.kv(0).await;
    for k in ["a", "b"] {
        kv.put(authed(put_req(k, &format!("{k}-under-key-1")), &c.token))
            .await
            .unwrap();
    }
    kv.put(authed(put_req("a", "a-again-key-1"), &c.token))
        .await
        .unwrap();
    // Rotate: add key 2 and make it active. Members pick the file up without a restart.
    let mut ring = raftkv::crypto::Keyring::load(&c.keyring).unwrap();
    assert_eq!(ring.rotate(), 2);
    ring.save(&c.keyring).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    kv.put(authed(put_req("c", "c-under-key-2"), &c.token))
        .await
        .unwrap();
    for (k, v) in [
        ("a", "a-again-key-1"),
        ("b", "b-under-key-1"),
        ("c", "c-under-key-2"),
    ] {
        let got = kv
            .range(authed(get_req(k), &c.token))
            .await
            .unwrap()
            .into_inner();
        assert_eq!(got.kvs[0].value, v.as_bytes());
    }
    // Re-encrypt everything (history included) under key 2 with kvctl.
    let out = Command::new(workspace_bin("kvctl"))
        .env("RAFTKV_ENDPOINTS", c.endpoints().join(","))
        .env("RAFTKV_TOKEN", &c.token)
        .args(["reencrypt", "-o", "json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(r["reencrypted"].as_u64().unwrap() >= 3, "{r}");
    assert_eq!(r["active_key"], 2);
    // Key 1 can now leave the keyring: members restart and everything reads, old revisions too.
    ring.remove(1).unwrap();
    ring.save(&c.keyring).unwrap();
    for i in 0..3 {
        c.stop(i);
    }
    for i in 0..3 {
        c.spawn(i);
    }
    c.wait_ready(Duration::from_secs(60));
    let mut kv = c.kv(1).await;
    let got = kv
        .range(authed(get_req("a"), &c.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.kvs[0].value, b"a-again-key-1");
    let mut old = get_req("a");
    old.revision = got.kvs[0].create_revision;
    let got = kv.range(authed(old, &c.token)).await.unwrap().into_inner();
    assert_eq!(
        got.kvs[0].value, b"a-under-key-1",
        "history was re-encrypted too"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn key_usage_limit_refuses_writes_until_a_new_key_is_active() {
    let c = Cluster::start(Options {
        extra_args: vec!["--encryption-key-usage-limit".into(), "5".into()],
        ..Default::default()
    });
    let mut kv = c.kv(0).await;
    let mut refused = None;
    for n in 0..10 {
        if let Err(s) = kv
            .put(authed(put_req(&format!("u{n}"), "v"), &c.token))
            .await
        {
            refused = Some(s);
            break;
        }
    }
    let s = refused.expect("the usage limit must stop writes");
    assert_eq!(s.code(), Code::ResourceExhausted);
    assert!(s.message().contains("add a new key"), "{}", s.message());
    let mut ring = raftkv::crypto::Keyring::load(&c.keyring).unwrap();
    ring.rotate();
    ring.save(&c.keyring).unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    kv.put(authed(put_req("after-rotation", "v"), &c.token))
        .await
        .expect("writes resume under the new key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tls_refuses_plaintext_clients_and_peers_without_a_valid_certificate() {
    let c = Cluster::start(Options {
        tls: true,
        ..Default::default()
    });
    let certs = c.certs.clone().unwrap();
    // Over TLS everything works.
    let mut kv = c.kv(0).await;
    kv.put(authed(put_req("tls", "on"), &c.token))
        .await
        .unwrap();
    // A plaintext client on the TLS client port is refused.
    let plain = tonic::transport::Endpoint::from_shared(format!(
        "http://127.0.0.1:{}",
        c.members[0].ports.client
    ))
    .unwrap()
    .timeout(Duration::from_secs(3))
    .connect_lazy();
    let e = raftkv_proto::etcdserverpb::kv_client::KvClient::new(plain)
        .range(authed(get_req("tls"), &c.token))
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::Ok);
    // A peer without a client certificate, or with one from another CA, is refused.
    let other = tempfile::tempdir().unwrap();
    let foreign = make_certs(other.path(), "x-");
    let peer_url = format!("https://127.0.0.1:{}", c.members[1].ports.peer);
    let try_peer = |identity: Option<(std::path::PathBuf, std::path::PathBuf)>| {
        let ca = std::fs::read(&certs.ca).unwrap();
        let url = peer_url.clone();
        async move {
            let mut tls = tonic::transport::ClientTlsConfig::new()
                .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                .domain_name("localhost");
            if let Some((cert, key)) = identity {
                tls = tls.identity(tonic::transport::Identity::from_pem(
                    std::fs::read(cert).unwrap(),
                    std::fs::read(key).unwrap(),
                ));
            }
            let ch = tonic::transport::Endpoint::from_shared(url)
                .unwrap()
                .tls_config(tls)
                .unwrap()
                .timeout(Duration::from_secs(3))
                .connect_lazy();
            raftkv_proto::peer::raft_peer_client::RaftPeerClient::new(ch)
                .read_index(tonic::Request::new(raftkv_proto::peer::Frame {
                    data: vec![],
                }))
                .await
        }
    };
    let no_cert = try_peer(None).await;
    assert!(
        no_cert.is_err(),
        "a peer without a client certificate got through"
    );
    let wrong_ca = try_peer(Some((
        foreign.client_cert.clone(),
        foreign.client_key.clone(),
    )))
    .await;
    assert!(
        wrong_ca.is_err(),
        "a peer with a certificate from another CA got through"
    );
    // A client certificate of the cluster's own CA does not open the peer port either.
    let client = try_peer(Some((certs.client_cert.clone(), certs.client_key.clone()))).await;
    assert!(client.is_err(), "a client certificate opened the peer port");
    // A member's certificate passes the handshake (the request itself is then judged by the
    // peer protocol: this one lacks the cluster id).
    let member = member_cert(&c.pki, 1);
    let ca_pem = c.pki.join(raftkv::certs::CA_CERT);
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(&ca_pem).unwrap(),
        ))
        .domain_name("localhost");
    tls = tls.identity(tonic::transport::Identity::from_pem(
        std::fs::read(&member.cert).unwrap(),
        std::fs::read(&member.key).unwrap(),
    ));
    let ch = tonic::transport::Endpoint::from_shared(peer_url.clone())
        .unwrap()
        .tls_config(tls)
        .unwrap()
        .timeout(Duration::from_secs(3))
        .connect_lazy();
    let s = raftkv_proto::peer::raft_peer_client::RaftPeerClient::new(ch)
        .read_index(tonic::Request::new(raftkv_proto::peer::Frame {
            data: vec![],
        }))
        .await
        .unwrap_err();
    assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
    // Plaintext on the peer port fails too.
    let plain_peer = tonic::transport::Endpoint::from_shared(format!(
        "http://127.0.0.1:{}",
        c.members[1].ports.peer
    ))
    .unwrap()
    .timeout(Duration::from_secs(3))
    .connect_lazy();
    assert!(
        raftkv_proto::peer::raft_peer_client::RaftPeerClient::new(plain_peer)
            .read_index(tonic::Request::new(raftkv_proto::peer::Frame {
                data: vec![]
            }))
            .await
            .is_err()
    );
}
