//! The peer port against someone who is not a member: by default the TLS handshake refuses
//! every certificate that is not a member certificate naming a member (no certificate, a client
//! certificate from the cluster's own CA, a member certificate for another host, another CA);
//! and even with the port in plaintext, a forwarded proposal or membership change is judged by
//! the caller's credential, which the leader verifies itself, never trusted as internal.

use raftkv::consensus::types::{decode, encode};
use raftkv::consensus::{MemberNode, MembershipChange, ProposeError, Proposed};
use raftkv::model::{AuthCommand, Command, Credential, Principal, Proposal, PutRequest};
use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::peer::Frame;
use raftkv_proto::peer::raft_peer_client::RaftPeerClient;
use raftkv_testkit::*;
use std::path::PathBuf;
use std::time::Duration;
use tonic::Code;

fn tls_to(ca: &PathBuf, identity: Option<(PathBuf, PathBuf)>) -> tonic::transport::ClientTlsConfig {
    let mut tls = tonic::transport::ClientTlsConfig::new()
        .ca_certificate(tonic::transport::Certificate::from_pem(
            std::fs::read(ca).unwrap(),
        ))
        .domain_name("localhost");
    if let Some((cert, key)) = identity {
        tls = tls.identity(tonic::transport::Identity::from_pem(
            std::fs::read(cert).unwrap(),
            std::fs::read(key).unwrap(),
        ));
    }
    tls
}

async fn read_index_over(
    url: String,
    tls: Option<tonic::transport::ClientTlsConfig>,
    cluster_id: u64,
) -> Result<(), tonic::Status> {
    let mut ep = tonic::transport::Endpoint::from_shared(url)
        .unwrap()
        .timeout(Duration::from_secs(3))
        .connect_timeout(Duration::from_secs(3));
    if let Some(tls) = tls {
        ep = ep.tls_config(tls).unwrap();
    }
    let mut req = tonic::Request::new(Frame { data: vec![] });
    req.metadata_mut().insert(
        raftkv::consensus::CLUSTER_ID_HEADER,
        cluster_id.to_string().parse().unwrap(),
    );
    RaftPeerClient::new(ep.connect_lazy())
        .read_index(req)
        .await
        .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_peer_port_admits_only_member_certificates_naming_a_member() {
    let c = Cluster::start(Options::default());
    let mut kv = c.kv(0).await;
    kv.put(authed(put_req("k", "v"), &c.token))
        .await
        .expect("members talk to each other over mutual TLS");
    let cluster_id = c.cluster_id().await;
    let ca = c.pki.join(raftkv::certs::CA_CERT);
    let url = format!("https://127.0.0.1:{}", c.members[1].ports.peer);
    let authority = raftkv::certs::Authority::load_or_create(&c.pki, "raftkv test CA").unwrap();
    let day = Duration::from_secs(86_400);
    let dir = tempfile::tempdir().unwrap();
    let write = |issued: raftkv::certs::Issued, stem: &str| {
        let f = issued.write(dir.path(), stem).unwrap();
        Some((f.cert, f.key))
    };
    // A client certificate from the cluster's own CA: clientAuth only, any name.
    let client = write(authority.client("root", day).unwrap(), "client");
    // A member certificate from the cluster's CA, but for a host that is no member.
    let stranger = write(
        authority
            .member("stranger", &["10.66.0.1".into()], day)
            .unwrap(),
        "stranger",
    );
    // A member certificate for the right host from another CA.
    let other = raftkv::certs::Authority::generate("other CA", day).unwrap();
    let foreign = write(
        other
            .member("foreign", &["127.0.0.1".into(), "localhost".into()], day)
            .unwrap(),
        "foreign",
    );
    let cases = [
        ("no certificate", None),
        ("a client certificate of the cluster CA", client),
        (
            "a member certificate for a host that is no member",
            stranger,
        ),
        ("a member certificate from another CA", foreign),
    ];
    for (what, identity) in cases {
        let r = read_index_over(url.clone(), Some(tls_to(&ca, identity)), cluster_id).await;
        let s = r.expect_err(what);
        // The connection dies in the TLS handshake (TLS 1.3 clients learn it as a closed
        // connection): no peer service ever answers.
        assert!(
            matches!(
                s.code(),
                Code::Unavailable | Code::Cancelled | Code::Unknown
            ),
            "{what}: refused in the handshake: {s:?}"
        );
    }
    // Plaintext is refused too.
    let plain = read_index_over(
        format!("http://127.0.0.1:{}", c.members[1].ports.peer),
        None,
        cluster_id,
    )
    .await;
    assert!(plain.is_err(), "plaintext on the peer port");
    // A real member certificate gets through the handshake (the request is then served).
    let member = member_cert(&c.pki, 1);
    read_index_over(
        url,
        Some(tls_to(&ca, Some((member.cert, member.key)))),
        cluster_id,
    )
    .await
    .expect("a member's certificate is accepted");
    let metrics = c.http_get(1, "/metrics").unwrap().1;
    assert!(
        metric_sum(&metrics, "raftkv_peer_connections_refused_total") >= 3.0,
        "refusals are counted"
    );
}

#[test]
fn serve_refuses_to_start_without_peer_tls() {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, "0123456789abcdef0123456789abcdef").unwrap();
    let out = std::process::Command::new(bin())
        .args(["serve", "--id", "1", "--data-dir"])
        .arg(dir.path().join("d"))
        .args(["--initial-cluster", "1=127.0.0.1:1"])
        .arg("--jwt-secret-file")
        .arg(&secret)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("peer port needs mutual TLS") && err.contains("raftkv certs"),
        "{err}"
    );
}

/// A forged proposal the leader must refuse: what it is, and what it carries.
type Refusal = (
    &'static str,
    Option<Credential>,
    Option<Principal>,
    Option<raftkv::model::SealKey>,
    Command,
);

/// What a process on the peer port sends when the port runs without TLS: its own frames.
struct PeerAttacker {
    client: RaftPeerClient<tonic::transport::Channel>,
    cluster_id: u64,
}

impl PeerAttacker {
    fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        req.metadata_mut().insert(
            raftkv::consensus::CLUSTER_ID_HEADER,
            self.cluster_id.to_string().parse().unwrap(),
        );
        req
    }

    async fn propose(
        &mut self,
        credential: Option<Credential>,
        proposal: Proposal,
    ) -> Result<Proposed, ProposeError> {
        let frame = Frame {
            data: encode(&(7u64, credential, proposal)).unwrap(),
        };
        let req = self.request(futures::stream::iter([frame]));
        let mut answers = self.client.propose_stream(req).await.unwrap().into_inner();
        let answer = answers.message().await.unwrap().expect("an answer");
        let (id, res): (u64, Result<Proposed, ProposeError>) = decode(&answer.data).unwrap();
        assert_eq!(id, 7);
        res
    }
}

fn put(key: &str, value: Vec<u8>) -> Command {
    Command::Put(PutRequest {
        key: key.into(),
        value,
        ..Default::default()
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forwarded_requests_need_the_callers_credential_even_on_a_plaintext_peer_port() {
    let c = Cluster::start(Options {
        insecure_peer: true,
        ..Default::default()
    });
    let leader = c.leader(Duration::from_secs(10)).await;
    let mut attacker = PeerAttacker {
        client: RaftPeerClient::new(
            channel(&format!(
                "http://127.0.0.1:{}",
                c.members[leader].ports.peer
            ))
            .await,
        ),
        cluster_id: c.cluster_id().await,
    };
    // Values sealed correctly, so that only the caller's identity is at stake.
    let ring = raftkv::crypto::Keyring::load(&c.keyring).unwrap();
    let key = raftkv::model::SealKey {
        id: ring.active().id,
        fingerprint: ring.active().fingerprint,
    };
    let sealer = raftkv::crypto::Sealer::new(ring, None, u64::MAX);
    let root = Principal {
        name: "root".into(),
        roles: vec!["root".into()],
        user_rev: None,
    };

    let sealed_put = |k: &str| put(k, sealer.seal(k.as_bytes(), b"x").unwrap());
    let refusals: Vec<Refusal> = vec![
        (
            "no principal and no credential: once \"internal\", with every permission",
            None,
            None,
            Some(key),
            sealed_put("evil/1"),
        ),
        (
            "a principal claiming root, without a credential",
            None,
            Some(root.clone()),
            Some(key),
            sealed_put("evil/2"),
        ),
        (
            "a certificate identity over a peer connection that proved nothing",
            Some(Credential::Certificate("root".into())),
            None,
            Some(key),
            sealed_put("evil/3"),
        ),
        (
            "plaintext from root's own token, in a cluster that encrypts",
            Some(Credential::Token(c.token.clone())),
            None,
            None,
            put("evil/4", raftkv::crypto::envelope::plain(b"plaintext")),
        ),
    ];
    for (what, credential, principal, key, command) in refusals {
        let e = attacker
            .propose(
                credential,
                Proposal {
                    principal,
                    key,
                    command,
                },
            )
            .await
            .expect_err(what);
        assert!(
            matches!(
                e,
                ProposeError::Unauthenticated(_) | ProposeError::Rejected(_)
            ),
            "{what}: {e:?}"
        );
    }
    // A real token with no roles, dressed up as root: the leader takes the token's identity.
    let out = attacker
        .propose(
            Some(Credential::Token(c.issue("nobody", &[]))),
            Proposal {
                principal: Some(root.clone()),
                key: None,
                command: Command::Auth(AuthCommand::UserAdd {
                    name: "mallory".into(),
                    password_hash: None,
                }),
            },
        )
        .await
        .expect("the proposal is judged, as nobody");
    assert_eq!(
        out.response.result,
        Err(raftkv::model::ApplyError::PermissionDenied)
    );
    // Membership changes need an administrator's credential too.
    let change = MembershipChange::AddLearner {
        id: 99,
        node: MemberNode {
            name: "intruder".into(),
            peer_url: "http://127.0.0.1:1".into(),
            client_urls: vec![],
        },
    };
    for (credential, refused) in [
        (None, "an unauthenticated membership change"),
        (
            Some(Credential::Token(c.issue("nobody", &[]))),
            "a membership change by a token without roles",
        ),
    ] {
        let frame = Frame {
            data: encode(&(credential, change.clone())).unwrap(),
        };
        let answer = attacker
            .client
            .change_membership(attacker.request(frame))
            .await
            .unwrap()
            .into_inner();
        let res: Result<(), ProposeError> = decode(&answer.data).unwrap();
        assert!(
            matches!(
                res,
                Err(ProposeError::Unauthenticated(_) | ProposeError::PermissionDenied)
            ),
            "{refused}: {res:?}"
        );
    }

    // Nothing of it landed.
    let mut kv = c.kv(0).await;
    let all = kv
        .range(authed(prefix_req("evil/"), &c.token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(all.count, 0);
    let users = c
        .auth(0)
        .await
        .user_list(authed(pb::AuthUserListRequest {}, &c.token))
        .await
        .unwrap()
        .into_inner();
    assert!(!users.users.contains(&"mallory".to_string()));
    let members =
        raftkv_proto::etcdserverpb::cluster_client::ClusterClient::new(c.channel(0).await)
            .member_list(authed(
                pb::MemberListRequest { linearizable: true },
                &c.token,
            ))
            .await
            .unwrap()
            .into_inner();
    assert_eq!(members.members.len(), 3);
    // While a follower forwarding a real client's write works as before.
    let follower = (leader + 1) % 3;
    let mut kv = c.kv(follower).await;
    kv.put(authed(put_req("fine", "yes"), &c.token))
        .await
        .expect("forwarded with the caller's token");
    let app = c.issue("nobody", &[]);
    let e = kv
        .put(authed(put_req("fine", "no"), &app))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::PermissionDenied);
}

/// The certificate a member's peer port presents now, as openssl sees it.
fn presented_certificate(
    port: u16,
    ca: &std::path::Path,
    member: &raftkv::certs::IssuedFiles,
) -> String {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .arg("-CAfile")
        .arg(ca)
        .arg("-cert")
        .arg(&member.cert)
        .arg("-key")
        .arg(&member.key)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout);
    let begin = text
        .find("-----BEGIN CERTIFICATE-----")
        .expect("a certificate");
    let end = text.find("-----END CERTIFICATE-----").expect("its end") + 25;
    text[begin..end].to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_member_certificate_is_used_without_a_restart() {
    let mut c = Cluster::start(Options::default());
    let ca = c.pki.join(raftkv::certs::CA_CERT);
    let probe = member_cert(&c.pki, 2);
    let port = c.members[0].ports.peer;
    let before = presented_certificate(port, &ca, &probe);
    assert_eq!(
        before.trim(),
        std::fs::read_to_string(&member_cert(&c.pki, 1).cert)
            .unwrap()
            .trim()
    );
    // Renew member 1's certificate in place, as a rotated Secret does.
    let authority = raftkv::certs::Authority::load_or_create(&c.pki, "raftkv test CA").unwrap();
    let renewed = authority
        .member(
            "member-1",
            &["127.0.0.1".into(), "localhost".into()],
            Duration::from_secs(2 * 86_400),
        )
        .unwrap();
    renewed.write(&c.pki, "member-1").unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = presented_certificate(port, &ca, &probe);
        if now.trim() == renewed.cert_pem.trim() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the renewed certificate was not picked up"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // The members still talk to each other over new connections (member 3 restarts: it dials
    // member 1, which presents its new certificate, and member 1 dials it with that one).
    c.kill(2);
    c.spawn(2);
    c.wait_member_ready(2, Duration::from_secs(30));
    let mut kv = c.kv(2).await;
    kv.put(authed(put_req("after-rotation", "ok"), &c.token))
        .await
        .expect("writes go on");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn stalled_handshakes_from_one_host_do_not_lock_members_out() {
    let c = Cluster::start(Options::default());
    let cluster_id = c.cluster_id().await;
    let port = c.members[1].ports.peer;
    // Another host (127.0.0.2 on loopback) opens 300 connections to the peer port and never
    // says a word.
    let mut stalled = Vec::new();
    for _ in 0..300 {
        let s = tokio::net::TcpSocket::new_v4().unwrap();
        s.bind("127.0.0.2:0".parse().unwrap()).unwrap();
        stalled.push(s.connect(([127, 0, 0, 1], port).into()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A member still gets through the handshake at once, not after the stalled ones time out.
    let ca = c.pki.join(raftkv::certs::CA_CERT);
    let member = member_cert(&c.pki, 1);
    let started = std::time::Instant::now();
    read_index_over(
        format!("https://127.0.0.1:{port}"),
        Some(tls_to(&ca, Some((member.cert, member.key)))),
        cluster_id,
    )
    .await
    .expect("a member is served while another host stalls handshakes");
    assert!(started.elapsed() < Duration::from_secs(3));
    drop(stalled);
}
