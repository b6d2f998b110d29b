//! The client port's edge against cheap abuse: metric labels cannot be minted by requests,
//! oversized tokens are answered instead of killing the connection, password guessing is
//! throttled, sockets that never authenticate are closed and their number is bounded, and the
//! data directory is private.

use raftkv_proto::etcdserverpb as pb;
use raftkv_testkit::*;
use std::io::Read;
use std::time::{Duration, Instant};
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metric_labels_come_from_a_fixed_set() {
    let c = Cluster::start(Options::default());
    let port = c.members[0].ports.client;
    for i in 0..40 {
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--http2-prior-knowledge",
                "-X",
                "POST",
            ])
            .args(["-H", "content-type: application/grpc"])
            .arg(format!("http://127.0.0.1:{port}/attacker.Made{i}/Up{i}"))
            .output()
            .expect("curl");
        assert!(out.status.success(), "curl reached the client port");
    }
    let metrics = c.http_get(0, "/metrics").unwrap().1;
    assert!(
        !metrics.contains("Made"),
        "request paths became label values"
    );
    assert!(
        metrics.contains(r#"method="unknown""#),
        "unknown methods are counted under one label"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_oversized_token_is_refused_and_the_connection_survives() {
    let c = Cluster::start(Options::default());
    let mut kv = c.kv(0).await;
    for size in [20 * 1024, 70 * 1024, 200 * 1024] {
        let token = "a".repeat(size);
        let e = kv
            .range(authed(get_req("k"), &token))
            .await
            .expect_err("an oversized token");
        assert_eq!(e.code(), Code::Unauthenticated, "{size}: {e:?}");
        kv.range(authed(get_req("k"), &c.token))
            .await
            .unwrap_or_else(|e| panic!("after a {size}-byte token the channel still works: {e:?}"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn password_guessing_is_throttled() {
    let c = Cluster::start(Options::default());
    let auth = c.auth(0).await;
    let try_login = |password: &str| {
        let mut auth = auth.clone();
        let req = pb::AuthenticateRequest {
            name: "root".into(),
            password: password.into(),
        };
        async move { auth.authenticate(req).await }
    };
    try_login(&c.root_password)
        .await
        .expect("the right password");
    // Ten wrong guesses are answered; soon after, guesses from this address are turned away
    // (the allowance refills at one per second, so a slow machine gets a few more).
    let mut answered = 0;
    loop {
        let e = try_login(&format!("guess-{answered}")).await.unwrap_err();
        match e.code() {
            Code::InvalidArgument => answered += 1,
            Code::ResourceExhausted => break,
            other => panic!("unexpected {other:?}: {e:?}"),
        }
        assert!(answered < 30, "guessing was never throttled");
    }
    assert!(answered >= 10, "only {answered} guesses were answered");
    let e = try_login(&c.root_password).await.unwrap_err();
    assert_eq!(
        e.code(),
        Code::ResourceExhausted,
        "even the right password waits once the address used up its failures"
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    try_login(&c.root_password)
        .await
        .expect("the allowance comes back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn guesses_sent_all_at_once_get_no_more_than_the_allowance() {
    let c = Cluster::start(Options::default());
    let auth = c.auth(0).await;
    let guesses: Vec<_> = (0..60)
        .map(|i| {
            let mut auth = auth.clone();
            tokio::spawn(async move {
                auth.authenticate(pb::AuthenticateRequest {
                    name: "root".into(),
                    password: format!("guess-{i}"),
                })
                .await
            })
        })
        .collect();
    let (mut answered, mut turned_away) = (0, 0);
    for g in guesses {
        let e = g.await.unwrap().unwrap_err();
        match e.code() {
            Code::InvalidArgument => answered += 1,
            Code::ResourceExhausted => turned_away += 1,
            other => panic!("unexpected {other:?}: {e:?}"),
        }
    }
    // Ten, plus what refilled (one a second) while the first were being verified.
    assert!(
        answered <= 15,
        "{answered} of 60 simultaneous guesses were checked"
    );
    assert!(turned_away >= 45);
}

fn idle_connection(port: u16) -> std::net::TcpStream {
    let s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// How long until the server closes a connection that sends nothing.
fn closed_after(mut s: std::net::TcpStream) -> Duration {
    let started = Instant::now();
    let mut buf = [0u8; 256];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return started.elapsed(),
            // HTTP/2 settings from the server: keep waiting for the close.
            Ok(_) => {}
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sockets_that_never_authenticate_are_closed_and_bounded() {
    let c = Cluster::start(Options {
        extra_args: vec![
            "--unauthenticated-connection-timeout-seconds".into(),
            "2".into(),
            "--max-client-connections".into(),
            "6".into(),
        ],
        ..Default::default()
    });
    let port = c.members[0].ports.client;
    // Start from no open client connection (the harness's own may still be closing), so that
    // exactly the seventh below is over the limit.
    let deadline = Instant::now() + Duration::from_secs(10);
    while metric_sum(
        &c.http_get(0, "/metrics").unwrap_or_default().1,
        "raftkv_client_connections_open",
    ) != 0.0
    {
        assert!(Instant::now() < deadline, "client connections stayed open");
        std::thread::sleep(Duration::from_millis(50));
    }
    let idle: Vec<_> = (0..6).map(|_| idle_connection(port)).collect();
    // The seventh is over the limit and closed at once.
    let over = idle_connection(port);
    assert!(closed_after(over) < Duration::from_secs(1));
    // The idle ones go after the timeout.
    for s in idle {
        let t = closed_after(s);
        assert!(t < Duration::from_secs(5), "an idle socket lived {t:?}");
    }
    // An authenticated client keeps its connection however quiet it is.
    let mut kv = c.kv(0).await;
    kv.put(authed(put_req("k", "v"), &c.token)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(3)).await;
    kv.range(authed(get_req("k"), &c.token)).await.unwrap();
    let metrics = c.http_get(0, "/metrics").unwrap().1;
    assert!(metric_sum(&metrics, "raftkv_client_connections_refused_total") >= 1.0);
    assert!(
        metric_sum(
            &metrics,
            "raftkv_client_connections_unauthenticated_closed_total"
        ) >= 1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn data_directories_are_private_to_the_member() {
    use std::os::unix::fs::PermissionsExt;
    let c = Cluster::start(Options::default());
    let mut kv = c.kv(0).await;
    kv.put(authed(put_req("k", "v"), &c.token)).await.unwrap();
    let dir = c.data_dir(0);
    let mode = std::fs::metadata(dir).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o700, "data directory mode {mode:o}");
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            let mode = e.metadata().unwrap().permissions().mode() & 0o777;
            if e.path().is_dir() {
                assert_eq!(mode & 0o077, 0, "{} is {mode:o}", e.path().display());
                stack.push(e.path());
            } else {
                assert_eq!(mode & 0o077, 0, "{} is {mode:o}", e.path().display());
            }
        }
    }
}
