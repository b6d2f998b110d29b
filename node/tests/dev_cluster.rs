//! `raftkv dev`, the README's first command, as a user runs it: three members that come up
//! secure by default (a token on every request, member certificates on the peer port), a
//! sample session, a root token to use, and a clean stop on SIGTERM.

use raftkv_testkit::*;
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A base port whose member ports (client base+100*(i-1), peer +1, metrics +7000) are free.
fn free_base() -> u16 {
    let free = |p: u16| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok();
    let start = 30_000 + (std::process::id() % 500) as u16 * 10;
    (0..500)
        .map(|k| 30_000 + (start - 30_000 + k * 10) % 5_000)
        .find(|&b| {
            (0..3u16).all(|i| {
                let c = b + 100 * i;
                free(c) && free(c + 1) && free(c + 7000)
            })
        })
        .expect("a free range of ports")
}

fn kvctl(endpoints: &str, token: Option<&str>, args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(workspace_bin("kvctl"));
    cmd.env("RAFTKV_ENDPOINTS", endpoints)
        .env_remove("RAFTKV_TOKEN")
        .args(args);
    if let Some(t) = token {
        cmd.env("RAFTKV_TOKEN", t);
    }
    cmd.output().expect("run kvctl")
}

#[test]
fn raftkv_dev_runs_a_secure_three_member_cluster_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let base = free_base();
    let out_path = dir.path().join("dev.out");
    let out = std::fs::File::create(&out_path).unwrap();
    let mut dev = Command::new(workspace_bin("raftkv"))
        .args(["dev", "--base-port", &base.to_string(), "--data-dir"])
        .arg(dir.path().join("data"))
        .stdout(out.try_clone().unwrap())
        .stderr(out)
        .stdin(Stdio::null())
        .spawn()
        .expect("start raftkv dev");
    let deadline = Instant::now() + Duration::from_secs(120);
    let printed = loop {
        let text = std::fs::read_to_string(&out_path).unwrap_or_default();
        if text.contains("delete greeting") {
            break text;
        }
        if let Ok(Some(status)) = dev.try_wait() {
            panic!("raftkv dev exited with {status}: {text}");
        }
        assert!(Instant::now() < deadline, "no sample session: {text}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert!(
        printed.contains("\"hello, raftkv\""),
        "the sample session read its write back: {printed}"
    );
    assert!(printed.contains("(mutual TLS)"), "{printed}");

    let endpoints = (0..3u16)
        .map(|i| format!("http://127.0.0.1:{}", base + 100 * i))
        .collect::<Vec<_>>()
        .join(",");
    let token = std::fs::read_to_string(dir.path().join("data/secrets/root-token"))
        .expect("raftkv dev leaves a root token")
        .trim()
        .to_string();
    // A token on every request.
    let o = kvctl(&endpoints, None, &["get", "greeting"]);
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("missing auth token"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = kvctl(&endpoints, Some(&token), &["put", "dev/k", "v"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = kvctl(&endpoints, Some(&token), &["get", "dev/k", "-o", "json"]);
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"value\":\"v\""));
    // Members talk over https peer URLs, and the peer port speaks nothing but TLS.
    let o = kvctl(&endpoints, Some(&token), &["members", "-o", "json"]);
    let members = String::from_utf8_lossy(&o.stdout).into_owned();
    for i in 0..3u16 {
        assert!(
            members.contains(&format!("https://127.0.0.1:{}", base + 100 * i + 1)),
            "{members}"
        );
    }
    let mut peer = std::net::TcpStream::connect(("127.0.0.1", base + 1)).unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    peer.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .unwrap();
    let mut first = [0u8; 1];
    let answered_h2 = matches!(peer.read(&mut first), Ok(1) if first[0] == 0x00);
    assert!(
        !answered_h2,
        "the peer port answered plaintext HTTP/2 (first byte {first:?})"
    );

    // SIGTERM stops the members with it.
    let _ = Command::new("kill").arg(dev.id().to_string()).status();
    let deadline = Instant::now() + Duration::from_secs(20);
    while dev.try_wait().unwrap().is_none() {
        assert!(Instant::now() < deadline, "raftkv dev did not stop");
        std::thread::sleep(Duration::from_millis(100));
    }
    for i in 0..3u16 {
        assert!(
            std::net::TcpStream::connect(("127.0.0.1", base + 100 * i)).is_err(),
            "member {} still serves after raftkv dev stopped",
            i + 1
        );
    }
}
