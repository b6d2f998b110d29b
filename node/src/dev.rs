//! `raftkv dev`: a local cluster of real `raftkv serve` processes on loopback, secure by default
//! (tokens, encryption at rest, a root user), with a short sample session so a newcomer sees it
//! work. Data and generated secrets live under one directory; a second run reuses them.

use crate::auth::jwt::{JwtConfig, TokenIssuer};
use crate::crypto::Keyring;
use crate::crypto::keyring::write_secret;
use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::etcdserverpb::kv_client::KvClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug, Clone, clap::Args)]
pub struct DevArgs {
    /// Number of members.
    #[arg(long, default_value_t = 3)]
    pub nodes: u64,
    /// Directory for all members' data, logs and the generated secrets.
    #[arg(long, env = "RAFTKV_DEV_DATA_DIR", default_value = "raftkv-dev-data")]
    pub data_dir: PathBuf,
    /// First client port; member i uses base + 100*(i-1) (client), +1 (peer), +7000 (metrics).
    #[arg(long, default_value_t = 2379)]
    pub base_port: u16,
    /// Skip the sample session.
    #[arg(long)]
    pub no_sample: bool,
}

pub struct Ports {
    pub client: u16,
    pub peer: u16,
    pub metrics: u16,
}

pub fn ports(base: u16, i: u64) -> Ports {
    let client = base + 100 * (i as u16 - 1);
    Ports {
        client,
        peer: client + 1,
        metrics: client + 7000,
    }
}

/// Secrets a dev cluster runs with, generated on first use.
pub struct DevSecrets {
    pub jwt_secret: PathBuf,
    pub keyring: PathBuf,
    pub root_password_file: PathBuf,
    pub root_password: String,
}

fn random_text(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    (0..n)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

pub fn ensure_secrets(dir: &Path) -> std::io::Result<DevSecrets> {
    let s = DevSecrets {
        jwt_secret: dir.join("jwt-secret"),
        keyring: dir.join("keyring.json"),
        root_password_file: dir.join("root-password"),
        root_password: String::new(),
    };
    if !s.jwt_secret.exists() {
        write_secret(&s.jwt_secret, random_text(48).as_bytes())?;
    }
    if !s.keyring.exists() {
        write_secret(&s.keyring, Keyring::generate().to_json().as_bytes())?;
    }
    if !s.root_password_file.exists() {
        write_secret(&s.root_password_file, random_text(20).as_bytes())?;
    }
    let root_password = std::fs::read_to_string(&s.root_password_file)?
        .trim()
        .to_string();
    Ok(DevSecrets { root_password, ..s })
}

fn spawn_member(
    exe: &Path,
    args: &DevArgs,
    secrets: &DevSecrets,
    i: u64,
) -> std::io::Result<Child> {
    let p = ports(args.base_port, i);
    let initial: Vec<String> = (1..=args.nodes)
        .map(|j| format!("{j}=http://127.0.0.1:{}", ports(args.base_port, j).peer))
        .collect();
    let dir = args.data_dir.join(format!("node-{i}"));
    std::fs::create_dir_all(&args.data_dir)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.data_dir.join(format!("node-{i}.log")))?;
    Command::new(exe)
        .arg("serve")
        .args(["--id", &i.to_string()])
        .args(["--name", &format!("node-{i}")])
        .arg("--data-dir")
        .arg(&dir)
        .args(["--listen-client", &format!("127.0.0.1:{}", p.client)])
        .args(["--listen-peer", &format!("127.0.0.1:{}", p.peer)])
        .args(["--listen-metrics", &format!("127.0.0.1:{}", p.metrics)])
        .args(["--initial-cluster", &initial.join(",")])
        .args(["--cluster-token", "raftkv-dev"])
        .arg("--jwt-secret-file")
        .arg(&secrets.jwt_secret)
        .arg("--encryption-keyring-file")
        .arg(&secrets.keyring)
        .arg("--initial-root-password-file")
        .arg(&secrets.root_password_file)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()
}

async fn wait_ready(metrics_port: u16, deadline: Instant) -> bool {
    while Instant::now() < deadline {
        if let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", metrics_port)).await {
            use tokio::io::{AsyncReadExt, AsyncWriteExt};
            let req = "GET /readyz HTTP/1.0\r\nHost: localhost\r\n\r\n";
            if s.write_all(req.as_bytes()).await.is_ok() {
                let mut buf = Vec::new();
                let _ = s.read_to_end(&mut buf).await;
                if buf.starts_with(b"HTTP/1.0 200") || buf.starts_with(b"HTTP/1.1 200") {
                    return true;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    false
}

fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    if let Ok(v) = format!("Bearer {token}").parse() {
        r.metadata_mut().insert("authorization", v);
    }
    r
}

async fn sample_session(endpoint: &str, token: &str) -> Result<(), String> {
    let mut kv = KvClient::connect(endpoint.to_string())
        .await
        .map_err(|e| e.to_string())?;
    let put = kv
        .put(authed(
            pb::PutRequest {
                key: b"greeting".to_vec(),
                value: b"hello, raftkv".to_vec(),
                ..Default::default()
            },
            token,
        ))
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    let rev = put.header.map(|h| h.revision).unwrap_or(0);
    println!("  put greeting = \"hello, raftkv\"            -> revision {rev}");
    let got = kv
        .range(authed(
            pb::RangeRequest {
                key: b"greeting".to_vec(),
                ..Default::default()
            },
            token,
        ))
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    if let Some(kv) = got.kvs.first() {
        println!(
            "  get greeting                              -> \"{}\" (version {}, mod revision {})",
            String::from_utf8_lossy(&kv.value),
            kv.version,
            kv.mod_revision
        );
    }
    let txn = kv
        .txn(authed(
            pb::TxnRequest {
                compare: vec![pb::Compare {
                    result: pb::compare::CompareResult::Equal as i32,
                    target: pb::compare::CompareTarget::Value as i32,
                    key: b"greeting".to_vec(),
                    target_union: Some(pb::compare::TargetUnion::Value(b"hello, raftkv".to_vec())),
                    range_end: Vec::new(),
                }],
                success: vec![pb::RequestOp {
                    request: Some(pb::request_op::Request::RequestPut(pb::PutRequest {
                        key: b"greeting".to_vec(),
                        value: b"hello again".to_vec(),
                        ..Default::default()
                    })),
                }],
                failure: Vec::new(),
            },
            token,
        ))
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    println!(
        "  txn: if greeting == \"hello, raftkv\" then put \"hello again\" -> succeeded: {}",
        txn.succeeded
    );
    let del = kv
        .delete_range(authed(
            pb::DeleteRangeRequest {
                key: b"greeting".to_vec(),
                prev_kv: true,
                ..Default::default()
            },
            token,
        ))
        .await
        .map_err(|e| e.message().to_string())?
        .into_inner();
    println!(
        "  delete greeting                           -> deleted {} (was \"{}\")",
        del.deleted,
        del.prev_kvs
            .first()
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned())
            .unwrap_or_default()
    );
    Ok(())
}

fn stop_all(children: &mut [Child]) {
    for c in children.iter() {
        // SIGTERM lets each member shut down cleanly.
        let _ = Command::new("kill").arg(c.id().to_string()).status();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    for c in children.iter_mut() {
        while Instant::now() < deadline {
            if let Ok(Some(_)) = c.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = c.kill();
        let _ = c.wait();
    }
}

pub async fn run(args: DevArgs) -> Result<(), String> {
    if args.nodes == 0 || args.nodes > 9 {
        return Err("--nodes must be between 1 and 9".into());
    }
    let exe = std::env::current_exe().map_err(|e| format!("locating the raftkv binary: {e}"))?;
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("{}: {e}", args.data_dir.display()))?;
    let data_dir = args
        .data_dir
        .canonicalize()
        .map_err(|e| format!("{}: {e}", args.data_dir.display()))?;
    let args = DevArgs { data_dir, ..args };
    let secrets = ensure_secrets(&args.data_dir.join("secrets"))
        .map_err(|e| format!("generating secrets: {e}"))?;
    let mut children = Vec::new();
    for i in 1..=args.nodes {
        match spawn_member(&exe, &args, &secrets, i) {
            Ok(c) => children.push(c),
            Err(e) => {
                stop_all(&mut children);
                return Err(format!("starting member {i}: {e}"));
            }
        }
    }
    // SIGTERM and Ctrl-C stop the members whatever phase this is in, so that no member outlives
    // the command that started it.
    let outcome = tokio::select! {
        r = announce_and_watch(&args, &secrets, &mut children) => r,
        _ = crate::server::wait_for_signal() => Ok(()),
    };
    println!("Stopping members...");
    stop_all(&mut children);
    outcome
}

/// Waits for the members, prints how to reach them, runs the sample session and then watches
/// the members until one exits (an error) or the future is dropped.
async fn announce_and_watch(
    args: &DevArgs,
    secrets: &DevSecrets,
    children: &mut [Child],
) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 1..=args.nodes {
        if !wait_ready(ports(args.base_port, i).metrics, deadline).await {
            return Err(format!(
                "member {i} did not become ready; see {}",
                args.data_dir.join(format!("node-{i}.log")).display()
            ));
        }
    }
    let endpoints: Vec<String> = (1..=args.nodes)
        .map(|i| format!("http://127.0.0.1:{}", ports(args.base_port, i).client))
        .collect();
    let issuer = TokenIssuer::new(&JwtConfig {
        hs256_secret_file: Some(secrets.jwt_secret.clone()),
        token_ttl: Duration::from_secs(24 * 3600),
        ..Default::default()
    })
    .map_err(|e| e.to_string())?
    .ok_or("no signing key")?;
    let token = issuer.issue("root", &["root".to_string()], None)?;
    let token_file = args.data_dir.join("secrets").join("root-token");
    write_secret(&token_file, token.as_bytes()).map_err(|e| e.to_string())?;

    println!(
        "raftkv dev cluster: {} members, data in {}",
        args.nodes,
        args.data_dir.display()
    );
    println!();
    for i in 1..=args.nodes {
        let p = ports(args.base_port, i);
        println!(
            "  node-{i}: client http://127.0.0.1:{}  peer http://127.0.0.1:{}  metrics http://127.0.0.1:{}/metrics  log {}",
            p.client,
            p.peer,
            p.metrics,
            args.data_dir.join(format!("node-{i}.log")).display()
        );
    }
    println!();
    println!("Every request needs a token (security is on: JWT auth, AES-256-GCM at rest).");
    println!("  export RAFTKV_ENDPOINTS={}", endpoints.join(","));
    println!(
        "  export RAFTKV_TOKEN=$(cat {})   # root token, valid 24h",
        token_file.display()
    );
    println!();
    println!(
        "With etcdctl (user root, password in {}):",
        secrets.root_password_file.display()
    );
    println!(
        "  ETCDCTL_API=3 etcdctl --endpoints={} --user=root:{} put hello world",
        endpoints.join(","),
        secrets.root_password
    );
    println!(
        "  ETCDCTL_API=3 etcdctl --endpoints={} --user=root:{} get hello",
        endpoints.join(","),
        secrets.root_password
    );
    println!();
    if !args.no_sample {
        println!("Sample session against {}:", endpoints[0]);
        if let Err(e) = sample_session(&endpoints[0], &token).await {
            println!("  sample session failed: {e}");
        }
        println!();
    }
    println!("Serving until Ctrl-C.");
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        for (i, c) in children.iter_mut().enumerate() {
            if let Ok(Some(status)) = c.try_wait() {
                let log = args.data_dir.join(format!("node-{}.log", i + 1));
                return Err(format!(
                    "member {} exited ({status}); see {}",
                    i + 1,
                    log.display()
                ));
            }
        }
    }
}
