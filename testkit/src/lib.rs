//! Clusters of real `raftkv serve` processes on loopback for multi-process tests, and helpers to
//! talk to them.

use raftkv::auth::jwt::{JwtConfig, TokenIssuer};
use raftkv::certs::Authority;
use raftkv::crypto::Keyring;
use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::etcdserverpb::kv_client::KvClient;
use raftkv_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tonic::transport::Channel;

/// Ports handed to test servers come from below Linux's ephemeral range (32768–60999 by
/// default). A port the kernel picked for `bind(0)` is released before the server binds it, and
/// in that gap any outbound connection (a test's client, a peer dialling another member) may be
/// given the same port as its local end; a member restarted on its old port meets the same race.
/// Below the ephemeral range only other listeners compete, and those are checked by binding.
const TEST_PORTS: std::ops::Range<u16> = 20_000..32_000;

/// Resident memory of process `pid` in bytes (0 when it is gone).
pub fn rss_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

/// CPU time (user and system) process `pid` has used so far, in seconds (0 when it is gone).
pub fn cpu_seconds_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // The command name (field 2) may hold spaces; utime and stime are fields 14 and 15.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
        return 0.0;
    };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    // Fields after the name start at 3; the kernel counts in USER_HZ, 100 on Linux.
    (ticks(14 - 3) + ticks(15 - 3)) / 100.0
}

pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(u32::MAX);
    let span = u32::from(TEST_PORTS.end - TEST_PORTS.start);
    // Test binaries may run side by side, so each process starts at its own offset.
    let _ = NEXT.compare_exchange(
        u32::MAX,
        std::process::id().wrapping_mul(7919) % span,
        Ordering::SeqCst,
        Ordering::SeqCst,
    );
    for _ in 0..span {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst) % span;
        let port = TEST_PORTS.start + offset as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {TEST_PORTS:?}")
}

#[derive(Clone, Debug)]
pub struct MemberPorts {
    pub client: u16,
    pub peer: u16,
    pub metrics: u16,
}

pub struct Member {
    pub id: u64,
    pub ports: MemberPorts,
    pub dir: PathBuf,
    pub log: PathBuf,
    pub child: Option<Child>,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub nodes: u64,
    pub encryption: bool,
    pub snapshot_threshold: u64,
    pub snapshot_log_keep: u64,
    pub extra_args: Vec<String>,
    /// Token verification flags replacing the default `--jwt-secret-file <generated secret>`.
    pub auth_args: Option<Vec<String>>,
    /// Serve TLS on the client port (the peer port always runs mutual TLS with member
    /// certificates, unless `insecure_peer`).
    pub tls: bool,
    /// Run the peer port without TLS (`--insecure-peer-plaintext`).
    pub insecure_peer: bool,
    /// `--election-timeout-ms` (heartbeats every tenth of it).
    pub election_timeout_ms: u64,
}

/// Certificates for a test cluster: a CA, a member certificate valid for 127.0.0.1 and
/// localhost (the client port's certificate under `tls`), and a client certificate (client use
/// only, CN `raftkv client`).
#[derive(Clone, Debug)]
pub struct CertFiles {
    pub ca: PathBuf,
    pub ca_key: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// Issues a CA and certificates signed by it under `dir` (names prefixed with `prefix`).
pub fn make_certs(dir: &Path, prefix: &str) -> CertFiles {
    let pki = dir.join(format!("{prefix}pki"));
    let ca = Authority::load_or_create(&pki, "raftkv test CA").expect("test CA");
    let day = Duration::from_secs(86_400);
    let node = ca
        .member(
            "raftkv member",
            &["127.0.0.1".into(), "localhost".into()],
            day,
        )
        .and_then(|c| c.write(&pki, "node"))
        .expect("member certificate");
    let client = ca
        .client("raftkv client", day)
        .and_then(|c| c.write(&pki, "client"))
        .expect("client certificate");
    CertFiles {
        ca: pki.join(raftkv::certs::CA_CERT),
        ca_key: pki.join(raftkv::certs::CA_KEY),
        cert: node.cert,
        key: node.key,
        client_cert: client.cert,
        client_key: client.key,
    }
}

/// Member `id`'s certificate for the peer port, signed by the cluster CA in `pki`.
pub fn member_cert(pki: &Path, id: u64) -> raftkv::certs::IssuedFiles {
    let ca = Authority::load_or_create(pki, "raftkv test CA").expect("test CA");
    let stem = format!("member-{id}");
    let files = raftkv::certs::IssuedFiles {
        cert: pki.join(format!("{stem}.crt")),
        key: pki.join(format!("{stem}.key")),
    };
    if files.cert.exists() {
        return files;
    }
    ca.member(
        &stem,
        &["127.0.0.1".into(), "localhost".into()],
        Duration::from_secs(86_400),
    )
    .and_then(|c| c.write(pki, &stem))
    .expect("member certificate")
}

impl Default for Options {
    fn default() -> Self {
        Options {
            nodes: 3,
            encryption: true,
            snapshot_threshold: 10_000,
            snapshot_log_keep: 5_000,
            extra_args: Vec::new(),
            auth_args: None,
            tls: false,
            insecure_peer: false,
            election_timeout_ms: 500,
        }
    }
}

pub struct Cluster {
    pub root: tempfile::TempDir,
    pub members: Vec<Member>,
    pub opts: Options,
    pub secret: PathBuf,
    pub keyring: PathBuf,
    pub root_password: String,
    pub root_password_file: PathBuf,
    issuer: TokenIssuer,
    pub token: String,
    pub cluster_token: String,
    pub certs: Option<CertFiles>,
    /// The cluster CA and the members' peer certificates.
    pub pki: PathBuf,
}

/// Path of a workspace binary (`raftkv`, `kvctl`) next to the running test's target directory,
/// or from `RAFTKV_BIN` / `KVCTL_BIN`.
pub fn workspace_bin(name: &str) -> PathBuf {
    let var = format!("{}_BIN", name.to_uppercase());
    if let Ok(p) = std::env::var(&var) {
        return PathBuf::from(p);
    }
    let exe = std::env::current_exe().expect("current test executable");
    // target/<profile>/deps/<test> -> target/<profile>/<name>
    let dir = exe
        .parent()
        .and_then(|d| d.parent())
        .expect("target directory");
    let p = dir.join(name);
    assert!(
        p.exists(),
        "{} not built; run `cargo build --workspace` first (or set {var})",
        p.display()
    );
    p
}

pub fn bin() -> PathBuf {
    workspace_bin("raftkv")
}

impl Cluster {
    pub fn start(opts: Options) -> Cluster {
        let mut c = Cluster::prepare(opts);
        c.start_all();
        c
    }

    /// A new cluster whose members are restored (`raftkv restore`) from `backup`, with the
    /// source cluster's keyring, then started.
    pub fn start_restored(opts: Options, backup: &Path, keyring: &Path) -> Cluster {
        let mut c = Cluster::prepare(opts);
        c.cluster_token = "restored-cluster".into();
        std::fs::copy(keyring, &c.keyring).expect("copy the source cluster's keyring");
        for m in &c.members {
            let out = Command::new(bin())
                .arg("restore")
                .arg("--from")
                .arg(backup)
                .arg("--data-dir")
                .arg(&m.dir)
                .args(["--id", &m.id.to_string()])
                .args(["--cluster-token", &c.cluster_token])
                .arg("--encryption-keyring-file")
                .arg(&c.keyring)
                .output()
                .expect("run raftkv restore");
            assert!(
                out.status.success(),
                "raftkv restore failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        c.start_all();
        c
    }

    fn start_all(&mut self) {
        for i in 0..self.members.len() {
            self.spawn(i);
        }
        self.wait_ready(Duration::from_secs(60));
        self.wait_root_user(Duration::from_secs(30));
    }

    /// The cluster's files and ports, no member running yet.
    pub fn prepare(opts: Options) -> Cluster {
        let root = tempfile::tempdir().expect("tempdir");
        let secret = root.path().join("jwt-secret");
        std::fs::write(&secret, "test-secret-0123456789abcdef0123456789abcdef").unwrap();
        let keyring = root.path().join("keyring.json");
        std::fs::write(&keyring, Keyring::generate().to_json()).unwrap();
        let root_password = "root-pw-123".to_string();
        let root_password_file = root.path().join("root-password");
        std::fs::write(&root_password_file, &root_password).unwrap();
        let issuer = TokenIssuer::new(&JwtConfig {
            hs256_secret_file: Some(secret.clone()),
            token_ttl: Duration::from_secs(3600),
            ..Default::default()
        })
        .unwrap()
        .unwrap();
        let token = issuer.issue("admin", &["root".into()], None).unwrap();
        let certs = opts.tls.then(|| make_certs(root.path(), ""));
        let pki = root.path().join("pki");
        Authority::load_or_create(&pki, "raftkv test CA").expect("test CA");
        let members = (1..=opts.nodes)
            .map(|id| Member {
                id,
                ports: MemberPorts {
                    client: free_port(),
                    peer: free_port(),
                    metrics: free_port(),
                },
                dir: root.path().join(format!("node-{id}")),
                log: root.path().join(format!("node-{id}.log")),
                child: None,
            })
            .collect();
        Cluster {
            root,
            members,
            opts,
            secret,
            keyring,
            root_password,
            root_password_file,
            issuer,
            token,
            cluster_token: "test-cluster".into(),
            certs,
            pki,
        }
    }

    /// Waits until the `root` user the cluster seeds exists (it is created just after the
    /// members become ready), so password logins work from the first test step.
    pub fn wait_root_user(&self, timeout: Duration) {
        // The harness's own token only works with the default verification flags and port.
        if self.certs.is_some() || self.opts.auth_args.is_some() {
            return;
        }
        let endpoint = self.endpoint(0);
        let token = self.token.clone();
        // Tests call this from inside their own runtime: ask from a thread of its own.
        let found = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                let deadline = Instant::now() + timeout;
                while Instant::now() < deadline {
                    let mut auth = raftkv_proto::etcdserverpb::auth_client::AuthClient::new(
                        channel(&endpoint).await,
                    );
                    let req = authed(
                        pb::AuthUserGetRequest {
                            name: "root".into(),
                        },
                        &token,
                    );
                    if auth.user_get(req).await.is_ok() {
                        return true;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                false
            })
        })
        .join()
        .unwrap_or(false);
        assert!(
            found,
            "the root user was not created; log:\n{}",
            self.log_tail(0)
        );
    }

    pub fn peer_scheme(&self) -> &'static str {
        if self.opts.insecure_peer {
            "http"
        } else {
            "https"
        }
    }

    pub fn initial_cluster(&self) -> String {
        let scheme = self.peer_scheme();
        self.members
            .iter()
            .map(|m| format!("{}={scheme}://127.0.0.1:{}", m.id, m.ports.peer))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn serve_command(&self, i: usize) -> Command {
        let m = &self.members[i];
        let mut cmd = Command::new(bin());
        cmd.arg("serve")
            .args(["--id", &m.id.to_string()])
            .arg("--data-dir")
            .arg(&m.dir)
            .args(["--listen-client", &format!("127.0.0.1:{}", m.ports.client)])
            .args(["--listen-peer", &format!("127.0.0.1:{}", m.ports.peer)])
            .args([
                "--listen-metrics",
                &format!("127.0.0.1:{}", m.ports.metrics),
            ])
            .args(["--initial-cluster", &self.initial_cluster()])
            .args(["--cluster-token", &self.cluster_token])
            .arg("--initial-root-password-file")
            .arg(&self.root_password_file)
            .args([
                "--heartbeat-interval-ms",
                &(self.opts.election_timeout_ms / 10).max(1).to_string(),
            ])
            .args([
                "--election-timeout-ms",
                &self.opts.election_timeout_ms.to_string(),
            ])
            .args([
                "--snapshot-threshold",
                &self.opts.snapshot_threshold.to_string(),
            ])
            .args([
                "--snapshot-log-keep",
                &self.opts.snapshot_log_keep.to_string(),
            ])
            .args(&self.opts.extra_args)
            .args(["--encryption-keyring-reload-seconds", "1"])
            .env("RUST_LOG", "info,openraft=warn")
            .stdin(Stdio::null());
        match &self.opts.auth_args {
            Some(args) => {
                cmd.args(args);
            }
            None => {
                cmd.arg("--jwt-secret-file").arg(&self.secret);
            }
        }
        if self.opts.encryption {
            cmd.arg("--encryption-keyring-file").arg(&self.keyring);
        }
        if let Some(c) = &self.certs {
            cmd.arg("--client-cert-file").arg(&c.cert);
            cmd.arg("--client-key-file").arg(&c.key);
        }
        if self.opts.insecure_peer {
            cmd.arg("--insecure-peer-plaintext");
        } else {
            let peer = member_cert(&self.pki, m.id);
            cmd.arg("--peer-cert-file").arg(&peer.cert);
            cmd.arg("--peer-key-file").arg(&peer.key);
            cmd.arg("--peer-trusted-ca-file")
                .arg(self.pki.join(raftkv::certs::CA_CERT));
            cmd.args([
                "--advertise-peer",
                &format!("https://127.0.0.1:{}", m.ports.peer),
            ]);
        }
        cmd
    }

    pub fn spawn(&mut self, i: usize) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.members[i].log)
            .unwrap();
        let child = self
            .serve_command(i)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn raftkv");
        self.members[i].child = Some(child);
    }

    /// SIGKILL: the member dies without any chance to flush.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERM and wait: a clean shutdown.
    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.members[i].child.take() {
            let _ = Command::new("kill").arg(c.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(15);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn endpoint(&self, i: usize) -> String {
        let scheme = if self.certs.is_some() {
            "https"
        } else {
            "http"
        };
        format!("{scheme}://127.0.0.1:{}", self.members[i].ports.client)
    }

    /// A channel to member `i`'s client port (TLS when the cluster serves it).
    pub async fn channel(&self, i: usize) -> Channel {
        let mut ep = tonic::transport::Endpoint::from_shared(self.endpoint(i))
            .unwrap()
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(10));
        if let Some(c) = &self.certs {
            let ca = std::fs::read(&c.ca).unwrap();
            ep = ep
                .tls_config(
                    tonic::transport::ClientTlsConfig::new()
                        .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                        .domain_name("localhost"),
                )
                .unwrap();
        }
        ep.connect_lazy()
    }

    pub fn endpoints(&self) -> Vec<String> {
        (0..self.members.len()).map(|i| self.endpoint(i)).collect()
    }

    pub fn http_get(&self, i: usize, path: &str) -> Option<(u16, String)> {
        http_get(self.members[i].ports.metrics, path)
    }

    pub fn is_ready(&self, i: usize) -> bool {
        matches!(self.http_get(i, "/readyz"), Some((200, _)))
    }

    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        for i in 0..self.members.len() {
            if self.members[i].child.is_none() {
                continue;
            }
            while !self.is_ready(i) {
                if Instant::now() > deadline {
                    panic!("member {} not ready; log:\n{}", i + 1, self.log_tail(i));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }

    /// Waits until every member has published its name and client URLs to the cluster.
    pub async fn wait_members_published(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let mut cl = raftkv_proto::etcdserverpb::cluster_client::ClusterClient::new(
                channel(&self.endpoint(0)).await,
            );
            if let Ok(r) = cl
                .member_list(authed(
                    pb::MemberListRequest {
                        linearizable: false,
                    },
                    &self.token,
                ))
                .await
            {
                let members = r.into_inner().members;
                if members.len() == self.members.len()
                    && members
                        .iter()
                        .all(|m| !m.name.is_empty() && !m.client_ur_ls.is_empty())
                {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "members did not publish their attributes in time"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn wait_member_ready(&self, i: usize, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        while !self.is_ready(i) {
            if Instant::now() > deadline {
                panic!("member {} not ready; log:\n{}", i + 1, self.log_tail(i));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_tail(&self, i: usize) -> String {
        let text = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    pub fn issue(&self, subject: &str, roles: &[&str]) -> String {
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        self.issuer.issue(subject, &roles, None).unwrap()
    }

    /// A token for `subject` that expires after `ttl`.
    pub fn issue_for(&self, subject: &str, roles: &[&str], ttl: Duration) -> String {
        let roles: Vec<String> = roles.iter().map(|r| r.to_string()).collect();
        self.issuer.issue(subject, &roles, Some(ttl)).unwrap()
    }

    pub async fn auth(
        &self,
        i: usize,
    ) -> raftkv_proto::etcdserverpb::auth_client::AuthClient<Channel> {
        raftkv_proto::etcdserverpb::auth_client::AuthClient::new(self.channel(i).await)
    }

    pub async fn lease(
        &self,
        i: usize,
    ) -> raftkv_proto::etcdserverpb::lease_client::LeaseClient<Channel> {
        raftkv_proto::etcdserverpb::lease_client::LeaseClient::new(self.channel(i).await)
    }

    pub async fn watch(
        &self,
        i: usize,
    ) -> raftkv_proto::etcdserverpb::watch_client::WatchClient<Channel> {
        raftkv_proto::etcdserverpb::watch_client::WatchClient::new(self.channel(i).await)
    }

    /// Opens a watch stream on member `i` for every key under `prefix` from `start_revision`
    /// (0: from now), and returns it once created, with the sender that keeps it open.
    pub async fn open_watch(
        &self,
        i: usize,
        prefix: &str,
        start_revision: i64,
        token: &str,
    ) -> (
        tonic::Streaming<pb::WatchResponse>,
        tokio::sync::mpsc::Sender<pb::WatchRequest>,
    ) {
        let mut w = self.watch(i).await;
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        tx.send(pb::WatchRequest {
            request_union: Some(pb::watch_request::RequestUnion::CreateRequest(
                pb::WatchCreateRequest {
                    key: prefix.into(),
                    range_end: raftkv::model::prefix_end(prefix.as_bytes()),
                    start_revision,
                    ..Default::default()
                },
            )),
        })
        .await
        .expect("watch request queued");
        let mut stream = w
            .watch(authed(
                tokio_stream::wrappers::ReceiverStream::new(rx),
                token,
            ))
            .await
            .expect("watch opened")
            .into_inner();
        let created = stream
            .message()
            .await
            .expect("watch answers")
            .expect("open");
        assert!(created.created && !created.canceled, "{created:?}");
        (stream, tx)
    }

    /// The cluster id members put in response headers (and expect on the peer port).
    pub async fn cluster_id(&self) -> u64 {
        self.status(0)
            .await
            .and_then(|s| s.header)
            .map(|h| h.cluster_id)
            .expect("status with a header")
    }

    /// Resident memory of member `i`'s process, in bytes.
    /// Sends a signal (`STOP`, `CONT`, ...) to member `i` by name, as `kill -s` takes it.
    pub fn signal(&self, i: usize, sig: &str) {
        if let Some(c) = &self.members[i].child {
            let _ = Command::new("kill")
                .args(["-s", sig, &c.id().to_string()])
                .status();
        }
    }

    pub fn rss_bytes(&self, i: usize) -> u64 {
        rss_of(self.members[i].child.as_ref().map(|c| c.id()).unwrap_or(0))
    }

    pub async fn kv(&self, i: usize) -> KvClient<Channel> {
        KvClient::new(self.channel(i).await)
    }

    pub async fn maintenance(&self, i: usize) -> MaintenanceClient<Channel> {
        MaintenanceClient::new(self.channel(i).await)
    }

    pub async fn status(&self, i: usize) -> Option<pb::StatusResponse> {
        let mut m = self.maintenance(i).await;
        m.status(authed(pb::StatusRequest {}, &self.token))
            .await
            .ok()
            .map(|r| r.into_inner())
    }

    /// Index of the current leader, as every running member agrees.
    pub async fn leader(&self, timeout: Duration) -> usize {
        let deadline = Instant::now() + timeout;
        loop {
            let mut seen = None;
            let mut agree = true;
            for i in 0..self.members.len() {
                if self.members[i].child.is_none() {
                    continue;
                }
                match self.status(i).await {
                    Some(s) if s.leader != 0 => {
                        if seen.is_some() && seen != Some(s.leader) {
                            agree = false;
                        }
                        seen = Some(s.leader);
                    }
                    _ => agree = false,
                }
            }
            if agree
                && let Some(id) = seen
                && let Some(pos) = self
                    .members
                    .iter()
                    .position(|m| m.id == id && m.child.is_some())
            {
                return pos;
            }
            if Instant::now() > deadline {
                panic!("no agreed leader within {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn data_dir(&self, i: usize) -> &Path {
        &self.members[i].dir
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for i in 0..self.members.len() {
            self.kill(i);
        }
        if std::thread::panicking() {
            for i in 0..self.members.len() {
                let text = std::fs::read_to_string(&self.members[i].log).unwrap_or_default();
                for line in text
                    .lines()
                    .filter(|l| l.contains("panicked at") || l.contains("ERROR"))
                    .take(10)
                {
                    eprintln!("member {} error: {line}", i + 1);
                }
                eprintln!("---- member {} log tail ----\n{}", i + 1, self.log_tail(i));
            }
        }
    }
}

pub async fn channel(endpoint: &str) -> Channel {
    tonic::transport::Endpoint::from_shared(endpoint.to_string())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

pub fn authed<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut r = tonic::Request::new(msg);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    r
}

pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).ok()?;
    let code = buf.split_whitespace().nth(1)?.parse().ok()?;
    let body = buf
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Some((code, body))
}

/// Puts `k`=`v` until the cluster accepts it (a leader is being elected), retrying every
/// `every`; the last refusal if `within` passes first.
pub async fn put_until_accepted(
    kv: &mut KvClient<Channel>,
    token: &str,
    (k, v): (&str, &str),
    within: Duration,
    every: Duration,
) -> Result<(), tonic::Status> {
    let deadline = Instant::now() + within;
    loop {
        match kv.put(authed(put_req(k, v), token)).await {
            Ok(_) => return Ok(()),
            Err(e) if Instant::now() >= deadline => return Err(e),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

pub fn put_req(k: &str, v: &str) -> pb::PutRequest {
    pb::PutRequest {
        key: k.as_bytes().to_vec(),
        value: v.as_bytes().to_vec(),
        ..Default::default()
    }
}

pub fn get_req(k: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: k.as_bytes().to_vec(),
        ..Default::default()
    }
}

pub fn prefix_req(p: &str) -> pb::RangeRequest {
    pb::RangeRequest {
        key: p.as_bytes().to_vec(),
        range_end: raftkv::model::prefix_end(p.as_bytes()),
        ..Default::default()
    }
}

/// Files under `dir` (recursively) whose bytes contain `needle`.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(bytes) = std::fs::read(&p)
                && bytes.windows(needle.len()).any(|w| w == needle)
            {
                hits.push(p.display().to_string());
            }
        }
    }
    hits
}

/// A metric's value in Prometheus text (summed over its series), or 0.
pub fn metric_sum(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(' ') || rest.starts_with('{'))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// A real etcd cluster on loopback (no auth, plaintext), for comparisons; stopped on drop.
pub struct Etcd {
    _dir: tempfile::TempDir,
    children: Vec<Child>,
    pub endpoints: Vec<String>,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Etcd {
    /// Starts `n` members of the etcd at `binary` with `extra` flags each, and waits until
    /// `etcdctl endpoint health` passes.
    pub fn start(binary: &str, n: usize, extra: &[&str]) -> Etcd {
        let dir = tempfile::tempdir().unwrap();
        let ports: Vec<(u16, u16)> = (0..n).map(|_| (free_port(), free_port())).collect();
        let initial: Vec<String> = ports
            .iter()
            .enumerate()
            .map(|(i, (_, p))| format!("e{i}=http://127.0.0.1:{p}"))
            .collect();
        let mut children = Vec::new();
        for (i, (c, p)) in ports.iter().enumerate() {
            let log = std::fs::File::create(dir.path().join(format!("etcd{i}.log"))).unwrap();
            children.push(
                Command::new(binary)
                    .args(["--name", &format!("e{i}")])
                    .arg("--data-dir")
                    .arg(dir.path().join(format!("e{i}")))
                    .args(["--listen-client-urls", &format!("http://127.0.0.1:{c}")])
                    .args(["--advertise-client-urls", &format!("http://127.0.0.1:{c}")])
                    .args(["--listen-peer-urls", &format!("http://127.0.0.1:{p}")])
                    .args([
                        "--initial-advertise-peer-urls",
                        &format!("http://127.0.0.1:{p}"),
                    ])
                    .args(["--initial-cluster", &initial.join(",")])
                    .args(["--initial-cluster-state", "new"])
                    .args(extra)
                    .stdout(log.try_clone().unwrap())
                    .stderr(log)
                    .spawn()
                    .unwrap_or_else(|e| {
                        panic!(
                            "start {binary} (etcd-3.6 is built by `bash e2e/cluster.sh build`): {e}"
                        )
                    }),
            );
        }
        let endpoints: Vec<String> = ports
            .iter()
            .map(|(c, _)| format!("127.0.0.1:{c}"))
            .collect();
        let etcd = Etcd {
            _dir: dir,
            children,
            endpoints,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .args([
                "--endpoints",
                &etcd.endpoints.join(","),
                "endpoint",
                "health",
            ])
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
        {
            assert!(Instant::now() < deadline, "etcd did not become healthy");
            std::thread::sleep(Duration::from_millis(200));
        }
        etcd
    }

    /// The members' process ids.
    pub fn pids(&self) -> Vec<u32> {
        self.children.iter().map(|c| c.id()).collect()
    }
}
