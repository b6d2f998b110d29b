//! A credential stops working when it should: open watches end when their token expires and
//! are cancelled when their roles are revoked, tokens die with their user's deletion or
//! password change (a re-created user does not revive them), lease listings reveal no key the
//! caller may not read, and configured issuer and audience are required.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use raftkv_proto::etcdserverpb as pb;
use raftkv_testkit::*;
use serde_json::json;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::Code;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

async fn next(
    stream: &mut tonic::Streaming<pb::WatchResponse>,
) -> Result<pb::WatchResponse, tonic::Status> {
    tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("the watch answers")
        .map(|m| m.expect("the stream is open"))
}

async fn grant_read(c: &Cluster, role: &str, prefix: &str) {
    let mut auth = c.auth(0).await;
    auth.role_add(authed(
        pb::AuthRoleAddRequest { name: role.into() },
        &c.token,
    ))
    .await
    .unwrap();
    auth.role_grant_permission(authed(
        pb::AuthRoleGrantPermissionRequest {
            name: role.into(),
            perm: Some(raftkv_proto::authpb::Permission {
                perm_type: 0,
                key: prefix.into(),
                range_end: raftkv::model::prefix_end(prefix.as_bytes()),
            }),
        },
        &c.token,
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_is_cancelled_once_its_read_permission_is_revoked() {
    let c = Cluster::start(Options::default());
    grant_read(&c, "reader", "w/").await;
    let token = c.issue("svc", &["reader"]);
    let (mut stream, _tx) = c.open_watch(1, "w/", 0, &token).await;
    let mut kv = c.kv(0).await;
    kv.put(authed(put_req("w/1", "visible"), &c.token))
        .await
        .unwrap();
    let m = next(&mut stream).await.unwrap();
    assert_eq!(m.events[0].kv.as_ref().unwrap().value, b"visible");
    c.auth(0)
        .await
        .role_revoke_permission(authed(
            pb::AuthRoleRevokePermissionRequest {
                role: "reader".into(),
                key: b"w/".to_vec(),
                range_end: raftkv::model::prefix_end(b"w/"),
            },
            &c.token,
        ))
        .await
        .unwrap();
    kv.put(authed(put_req("w/2", "SECRET-AFTER-REVOKE"), &c.token))
        .await
        .unwrap();
    let m = next(&mut stream).await.unwrap();
    assert!(m.events.is_empty(), "no value after the revoke: {m:?}");
    assert!(m.canceled, "{m:?}");
    assert_eq!(m.cancel_reason, "etcdserver: permission denied");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_watch_ends_when_its_token_expires() {
    let c = Cluster::start(Options {
        extra_args: vec!["--jwt-leeway-seconds".into(), "1".into()],
        ..Default::default()
    });
    let token = c.issue_for("svc", &["root"], Duration::from_secs(3));
    let started = Instant::now();
    let (mut stream, _tx) = c.open_watch(0, "x/", 0, &token).await;
    let mut kv = c.kv(0).await;
    kv.put(authed(put_req("x/1", "before"), &c.token))
        .await
        .unwrap();
    assert!(!next(&mut stream).await.unwrap().events.is_empty());
    let end = loop {
        match next(&mut stream).await {
            Ok(m) => assert!(m.events.is_empty(), "no events after expiry: {m:?}"),
            Err(s) => break s,
        }
    };
    assert_eq!(end.code(), Code::Unauthenticated, "{end:?}");
    assert!(started.elapsed() < Duration::from_secs(12));
}

async fn login(c: &Cluster, user: &str, password: &str) -> Result<String, tonic::Status> {
    c.auth(0)
        .await
        .authenticate(pb::AuthenticateRequest {
            name: user.into(),
            password: password.into(),
        })
        .await
        .map(|r| r.into_inner().token)
}

async fn can_read(c: &Cluster, token: &str) -> Result<(), tonic::Status> {
    let mut kv = c.kv(2).await;
    kv.range(authed(get_req("any"), token)).await.map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_die_with_their_users_deletion_or_password_change() {
    let c = Cluster::start(Options::default());
    let mut auth = c.auth(0).await;
    let add = |pw: &str| pb::AuthUserAddRequest {
        name: "alice".into(),
        password: pw.into(),
        ..Default::default()
    };
    auth.user_add(authed(add("pw-1"), &c.token)).await.unwrap();
    auth.user_grant_role(authed(
        pb::AuthUserGrantRoleRequest {
            user: "alice".into(),
            role: "root".into(),
        },
        &c.token,
    ))
    .await
    .unwrap();
    let first = login(&c, "alice", "pw-1").await.unwrap();
    can_read(&c, &first).await.expect("a fresh token works");
    auth.user_change_password(authed(
        pb::AuthUserChangePasswordRequest {
            name: "alice".into(),
            password: "pw-2".into(),
            ..Default::default()
        },
        &c.token,
    ))
    .await
    .unwrap();
    let e = can_read(&c, &first).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "old password's token: {e:?}"
    );
    let second = login(&c, "alice", "pw-2").await.unwrap();
    can_read(&c, &second).await.unwrap();
    auth.user_delete(authed(
        pb::AuthUserDeleteRequest {
            name: "alice".into(),
        },
        &c.token,
    ))
    .await
    .unwrap();
    let e = can_read(&c, &second).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "deleted user's token: {e:?}"
    );
    // The name comes back with the same password: the old token stays dead.
    auth.user_add(authed(add("pw-2"), &c.token)).await.unwrap();
    let e = can_read(&c, &second).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::Unauthenticated,
        "re-created user's old token: {e:?}"
    );
    let fresh = login(&c, "alice", "pw-2").await.unwrap();
    // No role yet: authenticated, but not allowed.
    let e = can_read(&c, &fresh).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
    // A forwarded write with a dead token is refused by the leader too.
    let leader = c.leader(Duration::from_secs(10)).await;
    let mut kv = c.kv((leader + 1) % 3).await;
    let e = kv
        .put(authed(put_req("k", "v"), &second))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_key_listings_need_read_permission_on_every_key() {
    let c = Cluster::start(Options::default());
    grant_read(&c, "app", "app/").await;
    let mut lease = c.lease(0).await;
    let id = lease
        .lease_grant(authed(pb::LeaseGrantRequest { ttl: 60, id: 0 }, &c.token))
        .await
        .unwrap()
        .into_inner()
        .id;
    let mut kv = c.kv(0).await;
    for k in ["app/visible", "secret/hidden-name"] {
        let mut p = put_req(k, "v");
        p.lease = id;
        kv.put(authed(p, &c.token)).await.unwrap();
    }
    let app = c.issue("svc", &["app"]);
    let ttl = |keys: bool, token: &str| {
        let req = authed(pb::LeaseTimeToLiveRequest { id, keys }, token);
        let mut lease = lease.clone();
        async move { lease.lease_time_to_live(req).await }
    };
    let e = ttl(true, &app).await.unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    let r = ttl(false, &app).await.unwrap().into_inner();
    assert!(r.keys.is_empty() && r.ttl > 0);
    let r = ttl(true, &c.token).await.unwrap().into_inner();
    assert_eq!(r.keys.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn configured_issuer_and_audience_are_required_and_lifetimes_capped() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    let key = "issuer-test-secret-0123456789abcdef";
    std::fs::write(&secret, key).unwrap();
    let c = Cluster::start(Options {
        auth_args: Some(vec![
            "--jwt-secret-file".into(),
            secret.display().to_string(),
            "--jwt-issuer".into(),
            "https://issuer".into(),
            "--jwt-audience".into(),
            "raftkv".into(),
            "--jwt-max-lifetime-seconds".into(),
            "3600".into(),
        ]),
        ..Default::default()
    });
    let sign = |claims: serde_json::Value| {
        jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(key.as_bytes()),
        )
        .unwrap()
    };
    let exp = now() + 600;
    let cases = [
        (
            "complete",
            json!({"sub": "a", "roles": ["root"], "exp": exp, "iss": "https://issuer", "aud": "raftkv"}),
            true,
        ),
        (
            "audience array",
            json!({"sub": "a", "roles": ["root"], "exp": exp, "iss": "https://issuer", "aud": ["other", "raftkv"]}),
            true,
        ),
        (
            "no issuer",
            json!({"sub": "a", "roles": ["root"], "exp": exp, "aud": "raftkv"}),
            false,
        ),
        (
            "no audience",
            json!({"sub": "a", "roles": ["root"], "exp": exp, "iss": "https://issuer"}),
            false,
        ),
        (
            "lives forever",
            json!({"sub": "a", "roles": ["root"], "exp": u64::MAX, "iss": "https://issuer", "aud": "raftkv"}),
            false,
        ),
        (
            "lives two hours",
            json!({"sub": "a", "roles": ["root"], "exp": now() + 7200, "iss": "https://issuer", "aud": "raftkv"}),
            false,
        ),
    ];
    for (what, claims, accepted) in cases {
        let r = can_read(&c, &sign(claims)).await;
        if accepted {
            r.unwrap_or_else(|e| panic!("{what}: {e:?}"));
        } else {
            let e = r.expect_err(what);
            assert_eq!(e.code(), Code::Unauthenticated, "{what}: {e:?}");
        }
    }
}
