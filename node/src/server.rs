//! Runs one member: opens its data directory and database, starts Raft, the peer port, the client
//! port (etcd API) and the metrics port, bootstraps a new cluster when it is this member's job,
//! and shuts down cleanly on SIGINT/SIGTERM.

use crate::api::{self, Api, ApiInner, Limits};
use crate::apply::{self, Executor};
use crate::auth::Authenticator;
use crate::auth::jwt::JwtConfig;
use crate::bootstrap::DataDir;
use crate::config::{ClusterState, ServeArgs, parse_initial_cluster};
use crate::consensus::{ApplyHooks, Consensus, ConsensusConfig, MemberNode, MembershipChange};
use crate::crypto::{Keyring, Sealer};
use crate::metrics::{self, Metrics, ReadinessPolicy};
use crate::model::{AuthCommand, Command};
use crate::storage::{Store, StoreOptions};
use crate::tls;
use raftkv_proto::admin::admin_server::AdminServer;
use raftkv_proto::etcdserverpb::auth_server::AuthServer;
use raftkv_proto::etcdserverpb::cluster_server::ClusterServer;
use raftkv_proto::etcdserverpb::kv_server::KvServer;
use raftkv_proto::etcdserverpb::lease_server::LeaseServer;
use raftkv_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use raftkv_proto::etcdserverpb::watch_server::WatchServer;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tonic::transport::Server;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Config(String),
    #[error(transparent)]
    Identity(#[from] crate::bootstrap::IdentityError),
    #[error("opening the database: {0}")]
    Storage(#[from] crate::storage::StorageError),
    #[error("encryption: {0}")]
    Keyring(#[from] crate::crypto::KeyringError),
    #[error("authentication: {0}")]
    Jwt(#[from] crate::auth::jwt::JwtSetupError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("raft: {0}")]
    Raft(String),
    #[error("server: {0}")]
    Serve(String),
}

/// Checks that the keyring can read everything the data was encrypted with: every key the
/// cluster recorded must be present with the same fingerprint, unless no stored value uses it any
/// more (it was retired after re-encryption).
fn check_keyring(
    store: &Store,
    sealer: &Sealer,
    keyring_file: Option<&std::path::Path>,
) -> Result<(), NodeError> {
    let in_use = apply::keys_in_use(store)?;
    if in_use.is_empty() {
        return Ok(());
    }
    let file = keyring_file
        .map(|p| p.display().to_string())
        .unwrap_or_default();
    let ring = sealer.keyring();
    let mut missing = Vec::new();
    for (id, fp) in in_use {
        match ring.as_ref().and_then(|r| r.get(id)) {
            None => missing.push(id),
            Some(k) if k.fingerprint != fp => {
                return Err(NodeError::Config(format!(
                    "key {id} in the keyring {file} is not the key the data was encrypted with \
                     (fingerprint {} expected, {} found); refusing to start",
                    hex::encode(fp),
                    hex::encode(k.fingerprint)
                )));
            }
            Some(_) => {}
        }
    }
    if missing.is_empty() {
        return Ok(());
    }
    // A key may leave the keyring once nothing is sealed with it: look.
    let still_used = keys_sealing_stored_values(store, &missing)?;
    if let Some(id) = still_used.first() {
        if ring.is_none() {
            return Err(NodeError::Config(format!(
                "the data is encrypted (key {id}) but no --encryption-keyring-file is configured"
            )));
        }
        return Err(NodeError::Config(format!(
            "the data contains values encrypted with key {id}, which is missing from the keyring {file}; \
             put that key back (and re-encrypt with `kvctl reencrypt` before removing it)"
        )));
    }
    tracing::info!(retired = ?missing, "keys absent from the keyring seal no stored value; they were retired");
    Ok(())
}

/// Which of `ids` still seal some stored value (a full scan; only done when keys are missing).
fn keys_sealing_stored_values(store: &Store, ids: &[u32]) -> Result<Vec<u32>, NodeError> {
    let view = store.read_view()?;
    let mut found = std::collections::BTreeSet::new();
    view.scan_history(&mut |_, rec| {
        if let Some(id) = crate::crypto::envelope::Envelope::parse(&rec.value)
            .ok()
            .and_then(|e| e.key_id())
            && ids.contains(&id)
        {
            found.insert(id);
        }
        Ok(found.len() < ids.len())
    })?;
    Ok(found.into_iter().collect())
}

/// Runs a background duty for the life of the process, restarting it if it panics: one bad
/// input must never leave lease expiry or health reporting silently dead.
pub fn supervise<F, Fut>(name: &'static str, make: F)
where
    F: Fn() -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    tokio::spawn(async move {
        loop {
            match tokio::spawn(make()).await {
                Ok(()) => return,
                Err(e) if e.is_panic() => {
                    tracing::error!(task = name, "background task panicked; restarting it");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
                Err(_) => return,
            }
        }
    });
}

/// Makes files this process creates private to its user (the database holds password hashes
/// and key names), and closes an existing data directory to others.
fn private_files(data_dir: &std::path::Path) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        // SAFETY: umask only changes the process's file creation mask.
        unsafe {
            libc::umask(0o077);
        }
        if data_dir.exists()
            && let Err(e) =
                std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
        {
            tracing::warn!(dir = %data_dir.display(), error = %e, "cannot make the data directory private");
        }
    }
}

async fn listen(addr: &str) -> Result<TcpListener, NodeError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| NodeError::Listen {
            addr: addr.to_string(),
            source,
        })
}

/// Streams a connection may reset before the server accepts them without losing the connection.
const MAX_PENDING_RESETS: usize = 10_000;

/// HTTP/2 header bytes a client request may carry (tokens are refused above
/// `jwt::MAX_TOKEN_BYTES`, well below this).
const MAX_HEADER_LIST_BYTES: u32 = 256 * 1024;

/// Runs the member until a shutdown signal.
pub async fn run(mut args: ServeArgs) -> Result<(), NodeError> {
    let my_id = args.member_id().map_err(NodeError::Config)?;
    args.id = Some(my_id);
    let initial =
        parse_initial_cluster(&args.initial_cluster, args.peer_tls()).map_err(NodeError::Config)?;
    if args.initial_cluster_state == ClusterState::New
        && !initial.iter().any(|(id, _)| *id == my_id)
    {
        return Err(NodeError::Config(format!(
            "--initial-cluster must name this member ({}) when forming a new cluster",
            my_id
        )));
    }
    if args.client_cert_auth == Some(true) && args.client_trusted_ca_file.is_none() {
        return Err(NodeError::Config(
            "--client-cert-auth needs --client-trusted-ca-file: certificates must be verified \
             before their names are believed"
                .into(),
        ));
    }
    args.check_timers().map_err(NodeError::Config)?;
    if let Some(url) = &args.restore_from_url {
        let restore = crate::restore::RestoreArgs {
            from: std::path::PathBuf::new(),
            data_dir: args.data_dir.clone(),
            id: my_id,
            cluster_token: args.cluster_token.clone(),
            encryption_keyring_file: args.encryption_keyring_file.clone(),
        };
        crate::restore::restore_from_url_if_new(
            url,
            args.restore_sha256.as_deref(),
            &restore,
            args.initial_cluster_state == ClusterState::New,
        )
        .await?;
    }
    private_files(&args.data_dir);
    let data = DataDir::claim(&args.data_dir, &args.cluster_token, my_id)?;
    let cluster_id = data.identity.cluster_id;

    let sealer = match &args.encryption_keyring_file {
        Some(p) => Sealer::new(
            Keyring::load(p)?,
            Some(p.clone()),
            args.encryption_key_usage_limit,
        ),
        None => Sealer::disabled(),
    };
    let jwt = JwtConfig {
        hs256_secret_file: args.jwt_secret_file.clone(),
        rs256_public_key_file: args.jwt_rs256_public_key_file.clone(),
        es256_public_key_file: args.jwt_es256_public_key_file.clone(),
        signing_key_file: args.jwt_signing_key_file.clone(),
        issuer: args.jwt_issuer.clone(),
        audience: args.jwt_audience.clone(),
        leeway_seconds: args.jwt_leeway_seconds,
        token_ttl: Duration::from_secs(args.token_ttl_seconds),
        max_lifetime: Duration::from_secs(args.jwt_max_lifetime_seconds),
    };
    let authn = Authenticator::new(&jwt)?;

    let store = Store::open_with(
        &data.db_path(),
        &StoreOptions {
            background_write_bytes_per_sec: args
                .background_write_mib_per_sec
                .saturating_mul(1 << 20),
            memory_bytes: args.storage_memory_mib.saturating_mul(1 << 20),
        },
    )?;
    check_keyring(&store, &sealer, args.encryption_keyring_file.as_deref())?;

    let metrics = Arc::new(Metrics::new(my_id));
    metrics.set_quota(args.quota_backend_bytes);
    {
        let m = metrics.clone();
        store.set_sync_observer(Arc::new(move |d, n| {
            m.fsync_seconds.observe(d.as_secs_f64());
            m.fsync_batch.observe(n as f64);
        }));
    }
    let watches = api::watch::WatchHub::new(Some(metrics.watch_ring_bytes.clone()));
    let lease_clock = api::lease::LeaseClock::default();
    let hooks = {
        let ok = metrics.applied_ok.clone();
        let refused = metrics.applied_refused.clone();
        let installs = metrics.snapshot_installs.clone();
        let install_secs = metrics.snapshot_install_seconds.clone();
        ApplyHooks {
            leases: lease_clock.hook(),
            events: watches.sink(),
            outcome: Arc::new(move |good| if good { ok.inc() } else { refused.inc() }),
            snapshot_installed: Arc::new(move |_, d| {
                installs.inc();
                install_secs.observe(d.as_secs_f64());
            }),
        }
    };
    let executor = Executor::new(&store, Arc::new(sealer.clone()))?;
    let peer_tls = match (
        &args.peer_cert_file,
        &args.peer_key_file,
        &args.peer_trusted_ca_file,
    ) {
        (Some(c), Some(k), Some(ca)) => {
            let identity = Arc::new(tls::PeerIdentity::load(
                ca,
                args.peer_cert_allowed_hostname.clone(),
            )?);
            let server =
                tls::PeerServerTls::load(c, k, ca, identity.clone(), metrics.peer_refused.clone())?;
            Some((tls::peer_client(c, k, ca)?, server, identity))
        }
        _ if args.insecure_peer_plaintext => {
            tracing::warn!(
                "the peer port runs WITHOUT TLS (--insecure-peer-plaintext): anyone who can reach \
                 it can rewrite this cluster's data"
            );
            None
        }
        _ => {
            return Err(NodeError::Config(
                "the peer port needs mutual TLS: give --peer-cert-file, --peer-key-file and \
                 --peer-trusted-ca-file (`raftkv certs` makes a CA and member certificates), or \
                 --insecure-peer-plaintext for an experiment on an isolated machine"
                    .into(),
            ));
        }
    };
    let mut known_peer_hosts: Vec<String> = initial
        .iter()
        .filter_map(|(_, url)| tls::url_host(url))
        .collect();
    known_peer_hosts.extend(tls::url_host(&args.advertised_peer_url()));
    let consensus = Consensus::start(
        ConsensusConfig {
            node_id: my_id,
            cluster_id,
            heartbeat_interval: args.heartbeat(),
            election_timeout: args.election_timeout(),
            snapshot_threshold: args.snapshot_threshold,
            snapshot_log_keep: args.snapshot_log_keep,
            request_timeout: Duration::from_millis(args.request_timeout_ms),
            peer_tls: peer_tls.as_ref().map(|(c, _, _)| c.clone()),
            peer_identity: peer_tls.as_ref().map(|(_, _, i)| i.clone()),
            known_peer_hosts,
        },
        store.clone(),
        executor.clone(),
        hooks,
    )
    .await
    .map_err(NodeError::Raft)?;

    if data.fresh && args.initial_cluster_state == ClusterState::Existing {
        consensus.abstain_until_caught_up();
    }

    // Peer port first: other members may be waiting for us.
    let peer_listener = listen(&args.listen_peer).await?;
    // A member that wakes from a stall finds many requests its peers gave up on: their resets
    // must not cost the connection (hyper's default tolerates 20 before GOAWAY).
    let peer_server = Server::builder()
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        .http2_keepalive_interval(Some(Duration::from_secs(10)))
        .http2_keepalive_timeout(Some(Duration::from_secs(5)));
    let peer_server_tls: Option<tls::SharedServerConfig> = match &peer_tls {
        Some((_, server_tls, _)) => {
            let c = consensus.clone();
            server_tls.set_hosts(Arc::new(move || c.member_hosts()));
            Some(Arc::new(std::sync::RwLock::new(server_tls.config.clone())))
        }
        None => None,
    };
    if let (Some(shared), Some(cert), Some(key), Some(ca)) = (
        &peer_server_tls,
        &args.peer_cert_file,
        &args.peer_key_file,
        &args.peer_trusted_ca_file,
    ) {
        let files = Arc::new(tls::PeerTlsFiles::new(
            cert,
            key,
            ca,
            args.peer_cert_allowed_hostname.clone(),
        ));
        let (shared, consensus, refused) = (
            shared.clone(),
            consensus.clone(),
            metrics.peer_refused.clone(),
        );
        supervise("peer certificate reload", move || {
            peer_tls_reload_loop(
                files.clone(),
                shared.clone(),
                consensus.clone(),
                refused.clone(),
            )
        });
    }
    let shutdown = Arc::new(tokio::sync::Notify::new());
    let peer_task = {
        let mut peer_server = peer_server;
        let router = peer_server.add_service(consensus.peer_service().into_server());
        let incoming = tls::peer_incoming(peer_listener, peer_server_tls);
        let stop = shutdown.clone();
        tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async move { stop.notified().await })
                .await
        })
    };

    let me = MemberNode {
        name: args.name(),
        peer_url: args.advertised_peer_url(),
        client_urls: args.advertised_client_urls(),
    };
    let mut data = data;
    if args.initial_cluster_state == ClusterState::New
        && !data.identity.initialized
        && initial.iter().map(|(id, _)| *id).min() == Some(my_id)
    {
        if consensus.is_initialized().await {
            tracing::info!("raft state already present; not initializing");
        } else {
            let members: BTreeMap<u64, MemberNode> = initial
                .iter()
                .map(|(id, url)| {
                    let node = if *id == my_id {
                        me.clone()
                    } else {
                        MemberNode {
                            name: String::new(),
                            peer_url: url.clone(),
                            client_urls: Vec::new(),
                        }
                    };
                    (*id, node)
                })
                .collect();
            consensus
                .initialize(members)
                .await
                .map_err(NodeError::Raft)?;
            tracing::info!(cluster = %format!("{cluster_id:x}"), members = initial.len(), "initialized a new cluster");
        }
        data.identity.initialized = true;
        data.save()?;
    }

    let limits = Limits {
        max_request_bytes: args.max_request_bytes,
        max_txn_ops: args.max_txn_ops,
        max_txn_total_ops: args.max_txn_total_ops,
        max_response_bytes: args.max_response_bytes,
        quota_bytes: args.quota_backend_bytes,
        max_leases: args.max_leases,
        max_watchers_per_stream: args.max_watchers_per_stream,
    };
    let leases =
        api::lease::LeaseKeeper::new(consensus.clone(), args.election_timeout(), lease_clock);
    consensus.set_leader_handler(leases.leader_handler());
    let api = Api::new(ApiInner {
        executor: executor.clone(),
        consensus: consensus.clone(),
        authn: authn.clone(),
        sealer: sealer.clone(),
        limits: limits.clone(),
        watches,
        leases: leases.clone(),
        metrics: metrics.clone(),
        logins: Default::default(),
        read_inflight: Arc::new(crate::storage::mvcc::InflightBytes::new(
            args.max_inflight_read_bytes,
        )),
        backup_slot: Arc::new(tokio::sync::Semaphore::new(1)),
        nospace: AtomicBool::new(false),
        stopping: tokio::sync::watch::channel(false).0,
        client_urls: me.client_urls.clone(),
        name: me.name.clone(),
    });
    consensus.set_gatekeeper(Arc::new(api::forwarded::ForwardedGate::new(api.clone())));
    {
        let (leases, api) = (leases.clone(), api.clone());
        supervise("lease expiry", move || {
            leases.clone().run_expiry(api.clone())
        });
    }

    // Client port.
    let client_listener = listen(&args.listen_client).await?;
    let mut client_server = Server::builder()
        .tcp_nodelay(true)
        // Clients cancel requests that time out (a member stalled, a leader changed): those
        // resets must not make the member drop their connections.
        .http2_max_pending_accept_reset_streams(Some(MAX_PENDING_RESETS))
        // Room for any token a client may send, so an oversized one is answered with
        // Unauthenticated instead of costing the connection.
        .http2_max_header_list_size(MAX_HEADER_LIST_BYTES);
    if let (Some(c), Some(k)) = (&args.client_cert_file, &args.client_key_file) {
        let cfg = tls::server(c, k, args.client_trusted_ca_file.as_deref())?;
        client_server = client_server
            .tls_config(cfg)
            .map_err(|e| NodeError::Serve(format!("client TLS: {e}")))?;
    }
    let max_msg = limits.max_request_bytes + 512 * 1024;
    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    let policy = ReadinessPolicy {
        max_leader_silence: args.election_timeout() * 3,
        max_apply_lag: args.ready_max_apply_lag,
    };
    let client_task = {
        let router = client_server
            .layer(api::edge::EdgeLayer::new(
                authn.clone(),
                metrics.clone(),
                executor.auth().clone(),
                args.client_cert_auth(),
                {
                    let c = consensus.clone();
                    Arc::new(move || c.has_leader())
                },
            ))
            .add_service(health_service)
            .add_service(
                KvServer::new(api::kv::KvService::new(api.clone()))
                    .max_decoding_message_size(max_msg)
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(
                WatchServer::new(api::watch::WatchService::new(
                    api.clone(),
                    Duration::from_secs(args.watch_progress_interval_seconds.max(1)),
                ))
                .max_decoding_message_size(max_msg)
                .max_encoding_message_size(usize::MAX),
            )
            // Every service takes requests up to the same limit as KV (etcd's
            // --max-request-bytes plus gRPC overhead), not tonic's 4 MiB default.
            .add_service(
                LeaseServer::new(api::lease::LeaseService::new(api.clone()))
                    .max_decoding_message_size(max_msg),
            )
            .add_service(
                ClusterServer::new(api::cluster::ClusterService::new(api.clone()))
                    .max_decoding_message_size(max_msg),
            )
            .add_service(
                MaintenanceServer::new(api::maintenance::MaintenanceService::new(api.clone()))
                    .max_decoding_message_size(max_msg)
                    .max_encoding_message_size(usize::MAX),
            )
            .add_service(
                AuthServer::new(api::auth::AuthService::new(api.clone()))
                    .max_decoding_message_size(max_msg),
            )
            .add_service(
                AdminServer::new(api::admin::AdminService::new(api.clone()))
                    .max_decoding_message_size(max_msg),
            )
            .add_service(
                raftkv_proto::v3lockpb::lock_server::LockServer::new(api::lock::LockService::new(
                    api.clone(),
                ))
                .max_decoding_message_size(max_msg),
            )
            .add_service(
                raftkv_proto::v3electionpb::election_server::ElectionServer::new(
                    api::election::ElectionService::new(api.clone()),
                )
                .max_decoding_message_size(max_msg),
            );
        let incoming = api::connections::incoming(
            client_listener,
            args.max_client_connections,
            Duration::from_secs(args.unauthenticated_connection_timeout_seconds),
            metrics.connections.clone(),
        );
        let stop = shutdown.clone();
        tokio::spawn(async move {
            router
                .serve_with_incoming_shutdown(incoming, async move { stop.notified().await })
                .await
        })
    };

    // Metrics port.
    let metrics_listener = listen(&args.listen_metrics).await?;
    let metrics_task = {
        let app = metrics::router(metrics.clone(), consensus.clone(), policy.clone());
        let stop = shutdown.clone();
        tokio::spawn(async move {
            axum::serve(metrics_listener, app)
                .with_graceful_shutdown(async move { stop.notified().await })
                .await
        })
    };

    tracing::info!(
        member = my_id,
        name = %me.name,
        cluster = %format!("{cluster_id:x}"),
        client = %me.client_urls.join(","),
        peer = %me.peer_url,
        metrics = %args.listen_metrics,
        encryption = sealer.enabled(),
        "raftkv member started"
    );

    {
        let (c, p, r) = (consensus.clone(), policy.clone(), health_reporter.clone());
        supervise("health", move || {
            health_loop(c.clone(), p.clone(), r.clone())
        });
    }
    {
        let (c, me, a) = (consensus.clone(), me.clone(), authn.clone());
        supervise("member attributes", move || {
            publish_attributes(c.clone(), me.clone(), a.clone())
        });
    }
    {
        let a = api.clone();
        supervise("quota", move || quota_loop(a.clone()));
    }
    if args.encryption_keyring_file.is_some() {
        let s = sealer.clone();
        let every = Duration::from_secs(args.encryption_keyring_reload_seconds.max(1));
        supervise("keyring reload", move || {
            keyring_reload_loop(s.clone(), every)
        });
    }
    if let Some(pw_file) = &args.initial_root_password_file
        && data.identity.initialized
        && !data.identity.root_seeded
    {
        match seed_root(&api, pw_file).await {
            Ok(()) => {
                data.identity.root_seeded = true;
                data.save()?;
            }
            Err(e) => {
                tracing::error!(error = %e, "creating the initial root user failed; it will be retried at the next start")
            }
        }
    }

    let removed = tokio::select! {
        _ = wait_for_signal() => false,
        _ = consensus.removed() => true,
    };
    tracing::info!(member = my_id, "shutting down");
    // As etcd: hand leadership over first, so that the others do not wait out an election
    // timeout, then end long-lived streams so their clients move to another member at once.
    // A removed leader hands nothing over: the remaining voters no longer count it, and a
    // transfer from outside the configuration stalled the member it named.
    if !removed {
        consensus.step_down(args.election_timeout() * 2).await;
    }
    api.stopping.send_replace(true);
    shutdown.notify_waiters();
    consensus.shutdown().await;
    for (name, task) in [("peer", peer_task), ("client", client_task)] {
        match tokio::time::timeout(Duration::from_secs(5), task).await {
            Ok(Ok(Ok(()))) => {}
            Ok(Ok(Err(e))) => tracing::warn!(port = name, error = %e, "server ended with an error"),
            Ok(Err(e)) => tracing::warn!(port = name, error = %e, "server task failed"),
            Err(_) => tracing::warn!(port = name, "server did not stop in time"),
        }
    }
    let _ = tokio::time::timeout(Duration::from_secs(2), metrics_task).await;
    store.sync_wal()?;
    store.flush_all()?;
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C.
pub(crate) async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let term = signal(SignalKind::terminate());
        match term {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}

/// Keeps the gRPC health status in line with readiness.
async fn health_loop(
    consensus: Consensus,
    policy: ReadinessPolicy,
    reporter: tonic_health::server::HealthReporter,
) {
    let mut last: Option<bool> = None;
    loop {
        let ready = metrics::not_ready_reason(&consensus, &policy).is_none();
        if last != Some(ready) {
            let status = if ready {
                tonic_health::ServingStatus::Serving
            } else {
                tonic_health::ServingStatus::NotServing
            };
            reporter.set_service_status("", status).await;
            last = Some(ready);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// Makes the cluster's record of this member (name, URLs) match how it runs now.
async fn publish_attributes(consensus: Consensus, me: MemberNode, authn: Authenticator) {
    loop {
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = consensus.status();
        let Some(current) = s.nodes.get(&consensus.id()) else {
            continue;
        };
        if *current == me || s.leader.is_none() {
            if *current == me {
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
            continue;
        }
        // Off the leader the change travels with this member's own credential when it can sign
        // one; otherwise the leader accepts it on the strength of the member certificate.
        let credential = authn.member_caller().ok().map(|c| c.credential);
        match consensus
            .change_membership(
                MembershipChange::UpdateNode {
                    id: consensus.id(),
                    node: me.clone(),
                },
                credential,
            )
            .await
        {
            Ok(()) => {
                tracing::info!(name = %me.name, client = %me.client_urls.join(","), "published member attributes")
            }
            Err(e) => tracing::debug!(error = %e, "publishing member attributes; will retry"),
        }
    }
}

/// Raises etcd's NOSPACE alarm while the database is over quota.
async fn quota_loop(api: Api) {
    loop {
        tokio::time::sleep(Duration::from_secs(5)).await;
        let size = api.consensus.store().disk_size();
        if size > api.limits.quota_bytes && !api.nospace.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                size,
                quota = api.limits.quota_bytes,
                "database over quota: writes refused (NOSPACE alarm)"
            );
        }
    }
}

/// How often peer certificate files are checked for a rotation.
const PEER_TLS_RELOAD_SECONDS: u64 = 10;

/// Picks up rotated peer certificates (a renewed Kubernetes Secret) without a restart: new
/// connections in both directions use them; open ones carry on.
async fn peer_tls_reload_loop(
    files: Arc<tls::PeerTlsFiles>,
    shared: tls::SharedServerConfig,
    consensus: Consensus,
    refused: prometheus::IntCounter,
) {
    loop {
        tokio::time::sleep(Duration::from_secs(PEER_TLS_RELOAD_SECONDS)).await;
        let Some(digest) = files.changed() else {
            continue;
        };
        let reloaded = (|| -> Result<_, tls::TlsError> {
            let identity = Arc::new(tls::PeerIdentity::load(
                &files.ca,
                files.allowed_hostnames.clone(),
            )?);
            let server = tls::PeerServerTls::load(
                &files.cert,
                &files.key,
                &files.ca,
                identity,
                refused.clone(),
            )?;
            let client = tls::peer_client(&files.cert, &files.key, &files.ca)?;
            Ok((server, client))
        })();
        match reloaded {
            Ok((server, client)) => {
                let c = consensus.clone();
                server.set_hosts(Arc::new(move || c.member_hosts()));
                if let Ok(mut s) = shared.write() {
                    *s = server.config.clone();
                }
                consensus.set_peer_client_tls(client);
                files.accept(digest);
                tracing::info!(cert = %files.cert.display(), "reloaded the peer certificate");
            }
            Err(e) => {
                tracing::warn!(error = %e, "peer certificate files changed but are unusable; keeping the current ones")
            }
        }
    }
}

/// Picks up keyring changes (a rotated Kubernetes Secret) without a restart.
async fn keyring_reload_loop(sealer: Sealer, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        match sealer.reload() {
            Ok(true) => {
                tracing::info!(active = ?sealer.active_key().map(|k| k.0), "keyring reloaded")
            }
            Ok(false) => {}
            Err(e) => {
                tracing::warn!(error = %e, "keyring file unreadable; keeping the current keyring")
            }
        }
    }
}

/// Creates the `root` user (with the root role) a new cluster starts with.
async fn seed_root(api: &Api, password_file: &std::path::Path) -> Result<(), String> {
    let password = std::fs::read_to_string(password_file)
        .map_err(|e| format!("reading {}: {e}", password_file.display()))?
        .trim()
        .to_string();
    if password.is_empty() {
        return Err(format!("{} is empty", password_file.display()));
    }
    let hash = tokio::task::spawn_blocking(move || crate::auth::password::hash(&password))
        .await
        .map_err(|e| e.to_string())??;
    // This member may not lead: its change travels to the leader with a credential the leader
    // verifies, like any client's. A member that cannot sign tokens (only an external issuer's
    // public key) makes the change itself once it leads, which the bootstrapping member
    // usually does first.
    let caller = api.authn.member_caller().ok();
    let attempts_allowed = if caller.is_some() { 20 } else { 120 };
    for cmd in [
        AuthCommand::UserAdd {
            name: "root".into(),
            password_hash: Some(hash),
        },
        AuthCommand::UserGrantRole {
            user: "root".into(),
            role: "root".into(),
        },
        AuthCommand::Enable,
    ] {
        let mut attempts = 0;
        loop {
            match api
                .propose(caller.as_ref(), None, Command::Auth(cmd.clone()))
                .await
            {
                Ok(_) => break,
                Err(s) if s.message().contains("already exists") => break,
                Err(s) if attempts < attempts_allowed => {
                    attempts += 1;
                    tracing::debug!(error = %s.message(), "seeding root user; retrying");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(s) => return Err(s.message().to_string()),
            }
        }
    }
    tracing::info!("created the initial root user");
    Ok(())
}
