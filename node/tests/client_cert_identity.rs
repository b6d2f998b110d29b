//! Client-certificate identity, as etcd's `--client-cert-auth`: with a trusted client CA a
//! verified certificate's common name is the user (what kube-apiserver relies on), a name
//! that is no user is refused, a token sent as well wins, and `--client-cert-auth=false`
//! turns the certificate back into transport security only.

use raftkv::certs::Authority;
use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::etcdserverpb::kv_client::KvClient;
use raftkv_testkit::*;
use std::time::Duration;
use tonic::Code;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A one-member TLS cluster trusting client certificates from a CA of its own (returned with
/// it: the directory holding that CA).
fn cluster(cert_auth: Option<&str>) -> (Cluster, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let client_ca = make_certs(dir.path(), "client-").ca;
    let mut extra = vec![
        "--client-trusted-ca-file".to_string(),
        client_ca.display().to_string(),
    ];
    if let Some(v) = cert_auth {
        extra.push(format!("--client-cert-auth={v}"));
    }
    let c = Cluster::start(Options {
        nodes: 1,
        tls: true,
        extra_args: extra,
        ..Options::default()
    });
    (c, dir)
}

/// A channel presenting a client certificate for `user`, signed by the client CA in `ca_dir`.
fn channel_as(c: &Cluster, ca_dir: &tempfile::TempDir, user: &str) -> Channel {
    let server_ca = &c.certs.as_ref().expect("a TLS cluster").ca;
    let ca =
        Authority::load_or_create(&ca_dir.path().join("client-pki"), "raftkv test CA").unwrap();
    let issued = ca.client(user, Duration::from_secs(3600)).unwrap();
    let tls = ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(std::fs::read(server_ca).unwrap()))
        .identity(Identity::from_pem(issued.cert_pem, issued.key_pem))
        .domain_name("localhost");
    Endpoint::from_shared(c.endpoint(0))
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .tls_config(tls)
        .unwrap()
        .connect_lazy()
}

fn as_user(c: &Cluster, ca_dir: &tempfile::TempDir, user: &str) -> KvClient<Channel> {
    KvClient::new(channel_as(c, ca_dir, user))
}

fn put(key: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: key.into(),
        value: b"v".to_vec(),
        ..Default::default()
    }
}

/// Creates `user` with `role`, which may read and write under `prefix` (as root, over a
/// connection with root's certificate: the port takes no connection without one).
async fn grant(c: &Cluster, ca: &tempfile::TempDir, user: &str, role: &str, prefix: &str) {
    let mut auth = pb::auth_client::AuthClient::new(channel_as(c, ca, "root"));
    let root = &c.token;
    auth.role_add(authed(pb::AuthRoleAddRequest { name: role.into() }, root))
        .await
        .unwrap();
    let end = format!("{}0", prefix.trim_end_matches('/'));
    auth.role_grant_permission(authed(
        pb::AuthRoleGrantPermissionRequest {
            name: role.into(),
            perm: Some(raftkv_proto::authpb::Permission {
                perm_type: 2,
                key: prefix.into(),
                range_end: end.into(),
            }),
        },
        root,
    ))
    .await
    .unwrap();
    auth.user_add(authed(
        pb::AuthUserAddRequest {
            name: user.into(),
            password: "unused-by-certificates".into(),
            ..Default::default()
        },
        root,
    ))
    .await
    .unwrap();
    auth.user_grant_role(authed(
        pb::AuthUserGrantRoleRequest {
            user: user.into(),
            role: role.into(),
        },
        root,
    ))
    .await
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_verified_certificate_names_the_user_and_a_token_wins() {
    let (c, ca) = cluster(None);
    grant(&c, &ca, "alice", "app", "app/").await;
    let mut alice = as_user(&c, &ca, "alice");
    // No token: the certificate's name is the user, with that user's roles and no more.
    alice
        .put(tonic::Request::new(put("app/x")))
        .await
        .expect("alice writes in her range with her certificate alone");
    let e = alice
        .put(tonic::Request::new(put("other/x")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
    // A token sent as well is who the caller is (root here), as in etcd.
    alice
        .put(authed(put("other/x"), &c.token))
        .await
        .expect("the token wins over the certificate");
    // A certificate from the right CA whose name is no user gets nothing.
    let mut nobody = as_user(&c, &ca, "mallory");
    let e = nobody
        .put(tonic::Request::new(put("app/y")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    assert!(e.message().contains("mallory"), "{e:?}");
    let e = nobody
        .range(tonic::Request::new(pb::RangeRequest {
            key: b"app/x".to_vec(),
            ..Default::default()
        }))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn with_certificate_identity_off_a_certificate_is_not_a_user() {
    let (c, ca) = cluster(Some("false"));
    grant(&c, &ca, "alice", "app", "app/").await;
    let mut alice = as_user(&c, &ca, "alice");
    let e = alice
        .put(tonic::Request::new(put("app/x")))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated, "{e:?}");
    alice
        .put(authed(put("app/x"), &c.token))
        .await
        .expect("a token still works over the same TLS connection");
}
