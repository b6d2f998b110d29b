//! `raftkv dev`: a local cluster of real `raftkv serve` processes on loopback, secure by default
//! (tokens, encryption at rest, a root user, mutual TLS with member certificates between the
//! members), with a short sample session so a newcomer sees it work. Data and generated secrets
//! (including the cluster CA) live under one directory; a second run reuses them.

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
    /// Serve TLS on the client ports too (with member certificates from the dev CA).
    #[arg(long)]
    pub client_tls: bool,
}

pub struct Ports {
    pub client: u16,
    pub peer: u16,
    pub metrics: u16,
}

/// Member `i`'s ports, or why they do not fit below 65536.
pub fn ports(base: u16, i: u64) -> Result<Ports, String> {
    let client = u32::from(base) + 100 * (i.saturating_sub(1) as u32);
    let metrics = client + 7000;
    if i == 0 || metrics > u32::from(u16::MAX) {
        return Err(format!(
            "--base-port {base} leaves no room for member {i}'s ports (client base+100*(i-1), \
             peer +1, metrics +7000 must stay below 65536); use a base port of at most {}",
            u32::from(u16::MAX).saturating_sub(7000 + 100 * (i.saturating_sub(1) as u32))
        ));
    }
    Ok(Ports {
        client: client as u16,
        peer: (client + 1) as u16,
        metrics: metrics as u16,
    })
}

/// Secrets a dev cluster runs with, generated on first use.
pub struct DevSecrets {
    pub jwt_secret: PathBuf,
    pub keyring: PathBuf,
    pub root_password_file: PathBuf,
    pub root_password: String,
    /// The cluster CA and member certificates (`ca.crt`, `node-<i>.crt`/`.key`).
    pub pki: PathBuf,
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
        pki: dir.join("pki"),
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

/// The dev cluster's CA and a member certificate for member `i` (valid for loopback), made on
/// first use. Members check each other's certificates on every peer connection.
pub fn ensure_member_cert(pki: &Path, i: u64) -> Result<crate::certs::IssuedFiles, String> {
    let ca =
        crate::certs::Authority::load_or_create(pki, "raftkv dev CA").map_err(|e| e.to_string())?;
    let stem = format!("node-{i}");
    let files = crate::certs::IssuedFiles {
        cert: pki.join(format!("{stem}.crt")),
        key: pki.join(format!("{stem}.key")),
    };
    if files.cert.exists() && files.key.exists() {
        return Ok(files);
    }
    ca.member(
        &stem,
        &["127.0.0.1".into(), "localhost".into()],
        Duration::from_secs(5 * 365 * 86_400),
    )
    .and_then(|c| c.write(pki, &stem))
    .map_err(|e| e.to_string())
}

fn spawn_member(exe: &Path, args: &DevArgs, secrets: &DevSecrets, i: u64) -> Result<Child, String> {
    let p = ports(args.base_port, i)?;
    let mut initial = Vec::new();
    for j in 1..=args.nodes {
        initial.push(format!(
            "{j}=https://127.0.0.1:{}",
            ports(args.base_port, j)?.peer
        ));
    }
    let cert = ensure_member_cert(&secrets.pki, i)?;
    let dir = args.data_dir.join(format!("node-{i}"));
    let io = |e: std::io::Error| e.to_string();
    std::fs::create_dir_all(&args.data_dir).map_err(io)?;
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(args.data_dir.join(format!("node-{i}.log")))
        .map_err(io)?;
    // The members share this machine: each gets its share of the cores as runtime threads
    // (at least one), so that together they run no more threads than there are cores, and its
    // share of the memory for storage.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let threads = (cores / args.nodes.max(1)).max(1);
    Command::new(exe)
        .arg("serve")
        .args(["--id", &i.to_string()])
        .args(["--worker-threads", &threads.to_string()])
        .args([
            "--storage-memory-mib",
            &(crate::storage::auto_memory_bytes(args.nodes) >> 20).to_string(),
        ])
        .args(["--name", &format!("node-{i}")])
        .arg("--data-dir")
        .arg(&dir)
        .args(["--listen-client", &format!("127.0.0.1:{}", p.client)])
        .args(["--listen-peer", &format!("127.0.0.1:{}", p.peer)])
        .args(["--advertise-peer", &format!("https://127.0.0.1:{}", p.peer)])
        .arg("--peer-cert-file")
        .arg(&cert.cert)
        .arg("--peer-key-file")
        .arg(&cert.key)
        .arg("--peer-trusted-ca-file")
        .arg(secrets.pki.join(crate::certs::CA_CERT))
        .args(if args.client_tls {
            vec![
                "--client-cert-file".into(),
                cert.cert.clone().into_os_string(),
                "--client-key-file".into(),
                cert.key.clone().into_os_string(),
            ]
        } else {
            Vec::new()
        })
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
        .stdout(log.try_clone().map_err(io)?)
        .stderr(log)
        .spawn()
        .map_err(io)
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

async fn sample_session(endpoint: &str, ca: &Path, token: &str) -> Result<(), String> {
    let mut ep =
        tonic::transport::Endpoint::from_shared(endpoint.to_string()).map_err(|e| e.to_string())?;
    if endpoint.starts_with("https://") {
        let pem = std::fs::read(ca).map_err(|e| e.to_string())?;
        ep = ep
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(pem))
                    .domain_name("localhost"),
            )
            .map_err(|e| e.to_string())?;
    }
    let mut kv = KvClient::new(ep.connect().await.map_err(|e| e.to_string())?);
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
    ports(args.base_port, args.nodes)?;
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
    let all: Vec<Ports> = (1..=args.nodes)
        .map(|i| ports(args.base_port, i))
        .collect::<Result<_, _>>()?;
    for (i, p) in (1..=args.nodes).zip(&all) {
        if !wait_ready(p.metrics, deadline).await {
            return Err(format!(
                "member {i} did not become ready; see {}",
                args.data_dir.join(format!("node-{i}.log")).display()
            ));
        }
    }
    let scheme = if args.client_tls { "https" } else { "http" };
    let endpoints: Vec<String> = all
        .iter()
        .map(|p| format!("{scheme}://127.0.0.1:{}", p.client))
        .collect();
    let ca = secrets.pki.join(crate::certs::CA_CERT);
    let etcdctl_tls = if args.client_tls {
        format!(" --cacert={}", ca.display())
    } else {
        String::new()
    };
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
    for (i, p) in (1..=args.nodes).zip(&all) {
        println!(
            "  node-{i}: client {scheme}://127.0.0.1:{}  peer https://127.0.0.1:{} (mutual TLS)  metrics http://127.0.0.1:{}/metrics  log {}",
            p.client,
            p.peer,
            p.metrics,
            args.data_dir.join(format!("node-{i}.log")).display()
        );
    }
    println!();
    println!(
        "Every request needs a token (security is on: JWT auth, AES-256-GCM at rest, member \
         certificates between members; CA in {}).",
        secrets.pki.display()
    );
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
    let bare: Vec<String> = all
        .iter()
        .map(|p| format!("127.0.0.1:{}", p.client))
        .collect();
    println!(
        "  ETCDCTL_API=3 etcdctl --endpoints={}{etcdctl_tls} --user=root:{} put hello world",
        bare.join(","),
        secrets.root_password
    );
    println!(
        "  ETCDCTL_API=3 etcdctl --endpoints={}{etcdctl_tls} --user=root:{} get hello",
        bare.join(","),
        secrets.root_password
    );
    if !args.client_tls {
        println!("  (client TLS is off on loopback; `raftkv dev --client-tls` turns it on)");
    }
    println!();
    if !args.no_sample {
        println!("Sample session against {}:", endpoints[0]);
        if let Err(e) = sample_session(&endpoints[0], &ca, &token).await {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_past_65535_are_a_clear_error() {
        let p = ports(2379, 3).unwrap();
        assert_eq!((p.client, p.peer, p.metrics), (2579, 2580, 9579));
        let e = ports(61379, 1).err().unwrap();
        assert!(e.contains("--base-port 61379"), "{e}");
        assert!(ports(58535, 1).is_ok());
        assert!(ports(58535, 2).is_err());
    }
}
