//! The `raftkv serve` configuration: every flag has a matching `RAFTKV_*` environment variable,
//! so the same settings work on a command line and in a Kubernetes pod spec.

use clap::{Args, ValueEnum};
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ClusterState {
    /// Form a new cluster with the members of --initial-cluster.
    New,
    /// Join a cluster that already exists (after being added with MemberAdd).
    Existing,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// This member's id (a positive integer, unique in the cluster). Derived from --pod-name
    /// when not given.
    #[arg(long = "id", env = "RAFTKV_ID")]
    pub id: Option<u64>,

    /// The pod name in a Kubernetes StatefulSet (`<set>-<ordinal>`): the member id defaults to
    /// ordinal + 1 and the name to the pod name.
    #[arg(long, env = "RAFTKV_POD_NAME")]
    pub pod_name: Option<String>,

    /// Human-readable member name (default: node-<id>).
    #[arg(long, env = "RAFTKV_NAME")]
    pub name: Option<String>,

    /// Directory for this member's data (database, snapshots, identity).
    #[arg(long, env = "RAFTKV_DATA_DIR")]
    pub data_dir: PathBuf,

    /// Address the client (etcd API) port listens on.
    #[arg(long, env = "RAFTKV_LISTEN_CLIENT", default_value = "127.0.0.1:2379")]
    pub listen_client: String,

    /// Client URLs advertised to clients (comma-separated; default: derived from --listen-client).
    #[arg(long, env = "RAFTKV_ADVERTISE_CLIENT", value_delimiter = ',')]
    pub advertise_client: Vec<String>,

    /// Address the peer (Raft) port listens on.
    #[arg(long, env = "RAFTKV_LISTEN_PEER", default_value = "127.0.0.1:2380")]
    pub listen_peer: String,

    /// Peer URL advertised to other members (default: derived from --listen-peer).
    #[arg(long, env = "RAFTKV_ADVERTISE_PEER")]
    pub advertise_peer: Option<String>,

    /// Address of the HTTP port serving /metrics, /healthz and /readyz.
    #[arg(long, env = "RAFTKV_LISTEN_METRICS", default_value = "127.0.0.1:9379")]
    pub listen_metrics: String,

    /// Members of a new cluster: id=peer-url pairs, e.g. 1=10.0.0.1:2380,2=10.0.0.2:2380.
    #[arg(long, env = "RAFTKV_INITIAL_CLUSTER", value_delimiter = ',')]
    pub initial_cluster: Vec<String>,

    /// Whether this member forms a new cluster or joins an existing one.
    #[arg(
        long,
        env = "RAFTKV_INITIAL_CLUSTER_STATE",
        value_enum,
        default_value = "new"
    )]
    pub initial_cluster_state: ClusterState,

    /// Seed this member from a backup at this HTTP(S) URL (a presigned S3 URL, say), or a
    /// `file://` path (a backup on a mounted volume, read in place), when it forms a new
    /// cluster with an empty data directory; ignored otherwise. Every first member of the
    /// cluster must get the same backup.
    #[arg(long, env = "RAFTKV_RESTORE_FROM_URL", hide_env_values = true)]
    pub restore_from_url: Option<String>,

    /// The SHA-256 (hex) the backup at --restore-from-url must have.
    #[arg(long, env = "RAFTKV_RESTORE_SHA256")]
    pub restore_sha256: Option<String>,

    /// Names the cluster; members of one cluster share it, and a data directory of another
    /// cluster is refused.
    #[arg(long, env = "RAFTKV_CLUSTER_TOKEN", default_value = "raftkv")]
    pub cluster_token: String,

    /// File holding the password of the `root` user the new cluster is created with.
    #[arg(long, env = "RAFTKV_INITIAL_ROOT_PASSWORD_FILE")]
    pub initial_root_password_file: Option<PathBuf>,

    // ---- Raft tuning ----
    /// Heartbeat interval in milliseconds.
    #[arg(long, env = "RAFTKV_HEARTBEAT_INTERVAL_MS", default_value_t = 100)]
    pub heartbeat_interval_ms: u64,

    /// Election timeout in milliseconds (elections start after 1-2x this without a leader).
    #[arg(long, env = "RAFTKV_ELECTION_TIMEOUT_MS", default_value_t = 1000)]
    pub election_timeout_ms: u64,

    /// Log entries between snapshots.
    #[arg(long, env = "RAFTKV_SNAPSHOT_THRESHOLD", default_value_t = 100_000)]
    pub snapshot_threshold: u64,

    /// Log entries kept behind a snapshot for followers that are only slightly behind.
    #[arg(long, env = "RAFTKV_SNAPSHOT_LOG_KEEP", default_value_t = 5_000)]
    pub snapshot_log_keep: u64,

    /// How long a request may wait for a leader, a commit or a read index.
    #[arg(long, env = "RAFTKV_REQUEST_TIMEOUT_MS", default_value_t = 7_000)]
    pub request_timeout_ms: u64,

    /// Threads that run requests, Raft and storage calls; 0 for one per CPU. Members sharing a
    /// machine (`raftkv dev`) do better with their share of it: with more threads than cores,
    /// every hand-off between tasks is a context switch.
    #[arg(long, env = "RAFTKV_WORKER_THREADS", default_value_t = 0)]
    pub worker_threads: usize,

    // ---- Storage ----
    /// MiB RocksDB may hold in memory: block cache and memtables together. 0 sizes it from
    /// the memory the process may use (its cgroup limit, else the machine's): a thirty-second
    /// of it, between 32 MiB and 1 GiB.
    #[arg(long, env = "RAFTKV_STORAGE_MEMORY_MIB", default_value_t = 0)]
    pub storage_memory_mib: u64,

    /// Most MiB per second RocksDB writes in the background (flushes and compactions); 0 for no
    /// limit. Unthrottled bursts delay the log's fsyncs and so every write's commit; raise it on
    /// disks that take more.
    #[arg(
        long,
        env = "RAFTKV_BACKGROUND_WRITE_MIB_PER_SEC",
        default_value_t = crate::storage::DEFAULT_BACKGROUND_WRITE_MIB_PER_SEC
    )]
    pub background_write_mib_per_sec: u64,

    // ---- Limits ----
    /// Largest accepted request in bytes (etcd's --max-request-bytes).
    #[arg(long, env = "RAFTKV_MAX_REQUEST_BYTES", default_value_t = 1536 * 1024)]
    pub max_request_bytes: usize,

    /// Most operations per transaction level (etcd's --max-txn-ops).
    #[arg(long, env = "RAFTKV_MAX_TXN_OPS", default_value_t = 128)]
    pub max_txn_ops: usize,

    /// Most operations in one transaction counting every nesting level (nested transactions
    /// would otherwise multiply --max-txn-ops).
    #[arg(long, env = "RAFTKV_MAX_TXN_TOTAL_OPS", default_value_t = 1024)]
    pub max_txn_total_ops: usize,

    /// Most bytes of key-values one read (a range or a read-only transaction) may gather on a
    /// member; larger reads are refused with ResourceExhausted and should page with `limit`.
    #[arg(long, env = "RAFTKV_MAX_RESPONSE_BYTES", default_value_t = 256 << 20)]
    pub max_response_bytes: u64,

    /// Most bytes of key-values all reads on this member may hold at once; a read that would
    /// pass it is refused with ResourceExhausted (retry, or read less at a time).
    #[arg(long, env = "RAFTKV_MAX_INFLIGHT_READ_BYTES", default_value_t = 1 << 30)]
    pub max_inflight_read_bytes: u64,

    /// Most leases the cluster holds at once.
    #[arg(long, env = "RAFTKV_MAX_LEASES", default_value_t = 1_000_000)]
    pub max_leases: usize,

    /// Most watchers one watch stream may have.
    #[arg(long, env = "RAFTKV_MAX_WATCHERS_PER_STREAM", default_value_t = 10_000)]
    pub max_watchers_per_stream: usize,

    /// Most client connections open at once; further connections are closed on accept.
    #[arg(long, env = "RAFTKV_MAX_CLIENT_CONNECTIONS", default_value_t = 10_000)]
    pub max_client_connections: usize,

    /// A client connection that has not made an authenticated request after this many seconds
    /// is closed (0: never).
    #[arg(
        long,
        env = "RAFTKV_UNAUTHENTICATED_CONNECTION_TIMEOUT_SECONDS",
        default_value_t = 30
    )]
    pub unauthenticated_connection_timeout_seconds: u64,

    /// Database size above which writes are refused (etcd's --quota-backend-bytes).
    #[arg(long, env = "RAFTKV_QUOTA_BACKEND_BYTES", default_value_t = 8 << 30)]
    pub quota_backend_bytes: u64,

    /// Interval of progress notifications to watchers that asked for them, in seconds.
    #[arg(
        long,
        env = "RAFTKV_WATCH_PROGRESS_INTERVAL_SECONDS",
        default_value_t = 600
    )]
    pub watch_progress_interval_seconds: u64,

    // ---- Authentication ----
    /// HS256 shared secret file for tokens (also signs tokens from Authenticate).
    #[arg(long, env = "RAFTKV_JWT_SECRET_FILE")]
    pub jwt_secret_file: Option<PathBuf>,

    /// RS256 public key (PEM) accepted for tokens from an external issuer.
    #[arg(long, env = "RAFTKV_JWT_RS256_PUBLIC_KEY_FILE")]
    pub jwt_rs256_public_key_file: Option<PathBuf>,

    /// ES256 public key (PEM) accepted for tokens from an external issuer.
    #[arg(long, env = "RAFTKV_JWT_ES256_PUBLIC_KEY_FILE")]
    pub jwt_es256_public_key_file: Option<PathBuf>,

    /// Private key (PEM, RS256 or ES256) for signing tokens from Authenticate instead of the
    /// HS256 secret.
    #[arg(long, env = "RAFTKV_JWT_SIGNING_KEY_FILE")]
    pub jwt_signing_key_file: Option<PathBuf>,

    /// Required `iss` claim.
    #[arg(long, env = "RAFTKV_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` claim.
    #[arg(long, env = "RAFTKV_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// Clock leeway for exp/nbf, in seconds.
    #[arg(long, env = "RAFTKV_JWT_LEEWAY_SECONDS", default_value_t = 30)]
    pub jwt_leeway_seconds: u64,

    /// Lifetime of tokens issued by Authenticate, in seconds.
    #[arg(long, env = "RAFTKV_TOKEN_TTL_SECONDS", default_value_t = 300)]
    pub token_ttl_seconds: u64,

    /// Longest lifetime a presented token may have left, in seconds; tokens minted to last
    /// longer are refused.
    #[arg(
        long,
        env = "RAFTKV_JWT_MAX_LIFETIME_SECONDS",
        default_value_t = 86_400
    )]
    pub jwt_max_lifetime_seconds: u64,

    // ---- Encryption at rest ----
    /// Keyring file (JSON) of AES-256 keys; values are encrypted when it is set.
    #[arg(long, env = "RAFTKV_ENCRYPTION_KEYRING_FILE")]
    pub encryption_keyring_file: Option<PathBuf>,

    /// How often to re-read the keyring file (a rotated Kubernetes Secret), in seconds.
    #[arg(
        long,
        env = "RAFTKV_ENCRYPTION_KEYRING_RELOAD_SECONDS",
        default_value_t = 10
    )]
    pub encryption_keyring_reload_seconds: u64,

    /// Most values one key may seal before writes are refused until a new key is active.
    #[arg(long, env = "RAFTKV_ENCRYPTION_KEY_USAGE_LIMIT", default_value_t = crate::crypto::DEFAULT_KEY_USAGE_LIMIT)]
    pub encryption_key_usage_limit: u64,

    // ---- TLS ----
    /// Certificate (PEM) of the client port; TLS is on when set.
    #[arg(long, env = "RAFTKV_CLIENT_CERT_FILE", requires = "client_key_file")]
    pub client_cert_file: Option<PathBuf>,

    #[arg(long, env = "RAFTKV_CLIENT_KEY_FILE", requires = "client_cert_file")]
    pub client_key_file: Option<PathBuf>,

    /// CA (PEM) for client certificates; when set, clients must present one (mTLS).
    #[arg(
        long,
        env = "RAFTKV_CLIENT_TRUSTED_CA_FILE",
        requires = "client_cert_file"
    )]
    pub client_trusted_ca_file: Option<PathBuf>,

    /// Authenticate requests without a token by their client certificate: its common name is
    /// the user (which must exist; its roles apply). A token, when sent, wins. On by default
    /// when --client-trusted-ca-file makes client certificates required (`false` turns it off).
    #[arg(long, env = "RAFTKV_CLIENT_CERT_AUTH", num_args = 0..=1, default_missing_value = "true")]
    pub client_cert_auth: Option<bool>,

    /// Certificate (PEM) of the peer port; peer TLS (always mutual) is on when set.
    #[arg(long, env = "RAFTKV_PEER_CERT_FILE", requires_all = ["peer_key_file", "peer_trusted_ca_file"])]
    pub peer_cert_file: Option<PathBuf>,

    #[arg(long, env = "RAFTKV_PEER_KEY_FILE", requires = "peer_cert_file")]
    pub peer_key_file: Option<PathBuf>,

    /// CA (PEM) that signed every member's peer certificate.
    #[arg(long, env = "RAFTKV_PEER_TRUSTED_CA_FILE", requires = "peer_cert_file")]
    pub peer_trusted_ca_file: Option<PathBuf>,

    /// Host names a peer certificate may name besides the hosts of the members' peer URLs
    /// (repeatable; `*.suffix` matches one label), e.g. `*.kv-peer.ns.svc` for members that
    /// join later.
    #[arg(long, env = "RAFTKV_PEER_CERT_ALLOWED_HOSTNAME", value_delimiter = ',')]
    pub peer_cert_allowed_hostname: Vec<String>,

    /// Run the peer port without TLS. Anyone who can reach the port can then rewrite the
    /// cluster's log: only for experiments on an isolated machine.
    #[arg(long, env = "RAFTKV_INSECURE_PEER_PLAINTEXT")]
    pub insecure_peer_plaintext: bool,

    // ---- Readiness ----
    /// Most entries the applied index may trail the commit index and still be ready.
    #[arg(long, env = "RAFTKV_READY_MAX_APPLY_LAG", default_value_t = 1000)]
    pub ready_max_apply_lag: u64,
}

impl ServeArgs {
    /// Followers campaign from a quarter of the election timeout on (see consensus): with
    /// fewer than five heartbeats per timeout they would campaign between heartbeats.
    pub fn check_timers(&self) -> Result<(), String> {
        if self.election_timeout_ms < self.heartbeat_interval_ms.max(1).saturating_mul(5) {
            return Err(format!(
                "--election-timeout-ms ({}) must be at least 5 times --heartbeat-interval-ms ({})",
                self.election_timeout_ms, self.heartbeat_interval_ms
            ));
        }
        Ok(())
    }

    /// The member id: --id, or the StatefulSet ordinal of --pod-name plus one.
    pub fn member_id(&self) -> Result<u64, String> {
        if let Some(id) = self.id {
            return if id == 0 {
                Err("--id must be a positive integer".into())
            } else {
                Ok(id)
            };
        }
        let Some(pod) = &self.pod_name else {
            return Err("give --id (or --pod-name of a StatefulSet pod)".into());
        };
        pod.rsplit_once('-')
            .and_then(|(_, ord)| ord.parse::<u64>().ok())
            .map(|o| o + 1)
            .ok_or_else(|| {
                format!(
                    "cannot derive a member id from pod name {pod:?}: it does not end in -<ordinal>"
                )
            })
    }

    pub fn name(&self) -> String {
        self.name
            .clone()
            .or_else(|| self.pod_name.clone())
            .unwrap_or_else(|| format!("node-{}", self.id.unwrap_or(0)))
    }

    fn scheme(tls: bool) -> &'static str {
        if tls { "https" } else { "http" }
    }

    pub fn peer_tls(&self) -> bool {
        self.peer_cert_file.is_some()
    }

    pub fn client_tls(&self) -> bool {
        self.client_cert_file.is_some()
    }

    /// Whether client certificates identify users (see --client-cert-auth).
    pub fn client_cert_auth(&self) -> bool {
        self.client_cert_auth
            .unwrap_or(self.client_trusted_ca_file.is_some())
            && self.client_trusted_ca_file.is_some()
    }

    /// The peer URL other members use to reach this one.
    pub fn advertised_peer_url(&self) -> String {
        match &self.advertise_peer {
            Some(u) => normalize_url(u, self.peer_tls()),
            None => normalize_url(&self.listen_peer, self.peer_tls()),
        }
    }

    pub fn advertised_client_urls(&self) -> Vec<String> {
        if self.advertise_client.is_empty() {
            vec![normalize_url(&self.listen_client, self.client_tls())]
        } else {
            self.advertise_client
                .iter()
                .map(|u| normalize_url(u, self.client_tls()))
                .collect()
        }
    }

    pub fn heartbeat(&self) -> Duration {
        Duration::from_millis(self.heartbeat_interval_ms)
    }

    pub fn election_timeout(&self) -> Duration {
        Duration::from_millis(self.election_timeout_ms)
    }
}

/// Adds a scheme to `host:port` forms.
pub fn normalize_url(u: &str, tls: bool) -> String {
    if u.contains("://") {
        u.to_string()
    } else {
        format!("{}://{u}", ServeArgs::scheme(tls))
    }
}

/// Parses `id=url` pairs of --initial-cluster.
pub fn parse_initial_cluster(items: &[String], tls: bool) -> Result<Vec<(u64, String)>, String> {
    let mut out = Vec::new();
    for item in items.iter().map(|s| s.trim()).filter(|s| !s.is_empty()) {
        let (id, url) = item
            .split_once('=')
            .ok_or_else(|| format!("--initial-cluster entry {item:?} is not id=host:port"))?;
        let id: u64 = id.trim().parse().map_err(|_| {
            format!("--initial-cluster entry {item:?}: the id must be a positive integer")
        })?;
        if id == 0 {
            return Err(format!(
                "--initial-cluster entry {item:?}: member id 0 is not allowed"
            ));
        }
        if out.iter().any(|(i, _)| *i == id) {
            return Err(format!("--initial-cluster names member {id} twice"));
        }
        out.push((id, normalize_url(url.trim(), tls)));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_id_from_pod_name() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: ServeArgs,
        }
        let t = T::parse_from(["t", "--data-dir", "/d", "--pod-name", "kv-2"]);
        assert_eq!(t.a.member_id().unwrap(), 3);
        assert_eq!(t.a.name(), "kv-2");
        let t = T::parse_from(["t", "--data-dir", "/d", "--pod-name", "nope"]);
        assert!(t.a.member_id().is_err());
        let t = T::parse_from(["t", "--data-dir", "/d", "--id", "7"]);
        assert_eq!(t.a.member_id().unwrap(), 7);
        let t = T::parse_from(["t", "--data-dir", "/d", "--id", "0"]);
        assert!(t.a.member_id().is_err());
    }

    #[test]
    fn an_election_timeout_under_five_heartbeats_is_refused() {
        use clap::Parser;
        #[derive(Parser)]
        struct T {
            #[command(flatten)]
            a: ServeArgs,
        }
        let timers = |e: &str, h: &str| {
            T::parse_from([
                "t",
                "--data-dir",
                "/d",
                "--election-timeout-ms",
                e,
                "--heartbeat-interval-ms",
                h,
            ])
            .a
            .check_timers()
        };
        assert!(timers("1000", "100").is_ok());
        assert!(timers("500", "100").is_ok());
        let err = timers("400", "100").unwrap_err();
        assert!(err.contains("at least 5 times"), "{err}");
        assert!(timers("100", "0").is_ok());
    }

    #[test]
    fn initial_cluster_parsing() {
        let v = parse_initial_cluster(
            &["1=127.0.0.1:2380".into(), "2=https://h:2380".into()],
            false,
        )
        .unwrap();
        assert_eq!(
            v,
            vec![
                (1, "http://127.0.0.1:2380".into()),
                (2, "https://h:2380".into())
            ]
        );
        assert!(parse_initial_cluster(&["x=1".into()], false).is_err());
        assert!(parse_initial_cluster(&["1=a:1".into(), "1=b:1".into()], false).is_err());
        assert!(parse_initial_cluster(&["1".into()], false).is_err());
    }
}
