//! Prometheus metrics and the HTTP health endpoints of a node (`/metrics`, `/healthz`,
//! `/readyz`), served on their own port.
//!
//! Request and security counters are updated where things happen; Raft and storage gauges are
//! read from the node's state when Prometheus scrapes, so they are never stale.

use crate::consensus::Consensus;
use crate::storage::{CF_KV, Store};
use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub struct Metrics {
    registry: Registry,
    // Requests
    pub grpc_requests: IntCounterVec,
    pub grpc_latency: HistogramVec,
    // Security
    pub auth_failures: IntCounterVec,
    pub permission_denials: IntCounter,
    pub crypto_errors: IntCounterVec,
    pub connections: crate::api::connections::ConnCounters,
    pub watch_ring_bytes: IntGauge,
    pub peer_refused: IntCounter,
    // Raft
    pub proposals_committed: IntCounter,
    pub proposals_failed: IntCounter,
    pub proposals_pending: IntGauge,
    pub applied_ok: IntCounter,
    pub applied_refused: IntCounter,
    pub snapshot_installs: IntCounter,
    pub snapshot_install_seconds: Histogram,
    // Backups served by this member (Maintenance.Snapshot)
    pub backups: IntCounterVec,
    pub backup_seconds: Histogram,
    pub backup_last_bytes: IntGauge,
    pub backup_last_success: IntGauge,
    term: IntGauge,
    leader_id: IntGauge,
    is_leader: IntGauge,
    leader_changes: IntCounter,
    leader_changes_seen: Mutex<u64>,
    read_indexes: IntCounterVec,
    read_indexes_seen: Mutex<(u64, u64)>,
    commit_index: IntGauge,
    applied_index: IntGauge,
    last_log_index: IntGauge,
    snapshot_index: IntGauge,
    log_entries_since_snapshot: IntGauge,
    follower_lag: IntGaugeVec,
    members: IntGaugeVec,
    // Storage
    pub fsync_seconds: Histogram,
    pub fsync_batch: Histogram,
    db_size: IntGauge,
    db_size_in_use: IntGauge,
    keys: IntGauge,
    write_stopped: IntGauge,
    delayed_write_rate: IntGauge,
    pending_compaction: IntGauge,
    memtable_bytes: IntGauge,
    block_cache_bytes: IntGauge,
    revision: IntGauge,
    compacted_revision: IntGauge,
    quota: IntGauge,
    fs_free: IntGauge,
    fs_size: IntGauge,
}

fn reg<T: prometheus::core::Collector + Clone + 'static>(r: &Registry, c: T) -> T {
    if let Err(e) = r.register(Box::new(c.clone())) {
        tracing::error!(error = %e, "registering a metric");
    }
    c
}

impl Metrics {
    pub fn new(node_id: u64) -> Metrics {
        let mut labels = std::collections::HashMap::new();
        labels.insert("member".to_string(), format!("{node_id:x}"));
        let r = Registry::new_custom(None, Some(labels)).expect("static registry labels");
        #[cfg(target_os = "linux")]
        if let Err(e) = r.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        )) {
            tracing::warn!(error = %e, "process metrics unavailable");
        }
        let counter = |name: &str, help: &str| {
            reg(
                &r,
                IntCounter::new(name, help).expect("static metric definition"),
            )
        };
        let gauge = |name: &str, help: &str| {
            reg(
                &r,
                IntGauge::new(name, help).expect("static metric definition"),
            )
        };
        let latency_buckets = vec![
            0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
            2.5, 5.0, 10.0,
        ];
        let m = Metrics {
            grpc_requests: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "raftkv_grpc_requests_total",
                        "gRPC requests handled, by service, method and status code.",
                    ),
                    &["service", "method", "code"],
                )
                .expect("static metric definition"),
            ),
            grpc_latency: reg(
                &r,
                HistogramVec::new(
                    HistogramOpts::new(
                        "raftkv_grpc_request_duration_seconds",
                        "gRPC request latency until the response starts, by service and method.",
                    )
                    .buckets(latency_buckets.clone()),
                    &["service", "method"],
                )
                .expect("static metric definition"),
            ),
            auth_failures: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "raftkv_auth_failures_total",
                        "Requests refused for their token, by reason.",
                    ),
                    &["reason"],
                )
                .expect("static metric definition"),
            ),
            permission_denials: counter(
                "raftkv_auth_permission_denials_total",
                "Requests refused because the token's roles do not allow them.",
            ),
            connections: crate::api::connections::ConnCounters {
                over_limit: counter(
                    "raftkv_client_connections_refused_total",
                    "Client connections closed on accept because --max-client-connections were open.",
                ),
                idle_closed: counter(
                    "raftkv_client_connections_unauthenticated_closed_total",
                    "Client connections closed for making no authenticated request in time.",
                ),
                open: gauge(
                    "raftkv_client_connections_open",
                    "Client connections open now (bounded by --max-client-connections).",
                ),
            },
            watch_ring_bytes: gauge(
                "raftkv_watch_ring_bytes",
                "Bytes of recent writes this member keeps for its watch streams (bounded; streams behind it read storage).",
            ),
            peer_refused: counter(
                "raftkv_peer_connections_refused_total",
                "Peer connections refused in the TLS handshake for their certificate: not from the peer CA, or not a member certificate naming a member.",
            ),
            crypto_errors: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "raftkv_encryption_errors_total",
                        "Encryption failures, by operation (encrypt, decrypt, key_exhausted).",
                    ),
                    &["op"],
                )
                .expect("static metric definition"),
            ),
            proposals_committed: counter(
                "raftkv_raft_proposals_committed_total",
                "Proposals made through this node that were committed and applied.",
            ),
            proposals_failed: counter(
                "raftkv_raft_proposals_failed_total",
                "Proposals made through this node that failed (no leader, timeout, unknown outcome).",
            ),
            proposals_pending: gauge(
                "raftkv_raft_proposals_pending",
                "Proposals made through this node that are waiting for commit.",
            ),
            applied_ok: counter(
                "raftkv_raft_applied_proposals_total",
                "Proposals this node's state machine applied successfully.",
            ),
            applied_refused: counter(
                "raftkv_raft_applied_refusals_total",
                "Proposals this node's state machine refused deterministically (permission, compaction, missing key).",
            ),
            snapshot_installs: counter(
                "raftkv_raft_snapshot_installs_total",
                "Snapshots received from a leader and installed.",
            ),
            snapshot_install_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "raftkv_raft_snapshot_install_duration_seconds",
                        "Time to install a received snapshot.",
                    )
                    .buckets(vec![
                        0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0,
                    ]),
                )
                .expect("static metric definition"),
            ),
            backups: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "raftkv_backups_total",
                        "Backups this member made (Maintenance.Snapshot), by result.",
                    ),
                    &["result"],
                )
                .expect("static metric definition"),
            ),
            backup_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "raftkv_backup_duration_seconds",
                        "Time to write a backup file, before it is streamed.",
                    )
                    .buckets(vec![
                        0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
                    ]),
                )
                .expect("static metric definition"),
            ),
            backup_last_bytes: gauge(
                "raftkv_backup_last_bytes",
                "Size of the last backup this member made.",
            ),
            backup_last_success: gauge(
                "raftkv_backup_last_success_timestamp_seconds",
                "When this member last made a backup (Unix time; 0: never).",
            ),
            term: gauge("raftkv_raft_term", "Current Raft term."),
            leader_id: gauge(
                "raftkv_raft_leader_id",
                "Member id of the current leader (0 when there is none).",
            ),
            is_leader: gauge("raftkv_raft_is_leader", "1 if this member is the leader."),
            leader_changes: counter(
                "raftkv_raft_leader_changes_total",
                "Leader changes this member has seen since it started.",
            ),
            leader_changes_seen: Mutex::new(0),
            read_indexes: reg(
                &r,
                IntCounterVec::new(
                    Opts::new(
                        "raftkv_raft_read_index_total",
                        "Read indexes this member confirmed as leader, by how: a quorum round of heartbeats, or the acknowledgement a follower's request carried.",
                    ),
                    &["how"],
                )
                .expect("static metric definition"),
            ),
            read_indexes_seen: Mutex::new((0, 0)),
            commit_index: gauge(
                "raftkv_raft_commit_index",
                "Highest log index known committed.",
            ),
            applied_index: gauge(
                "raftkv_raft_applied_index",
                "Highest log index applied to the state machine.",
            ),
            last_log_index: gauge(
                "raftkv_raft_last_log_index",
                "Index of the last entry in this member's log.",
            ),
            snapshot_index: gauge(
                "raftkv_raft_snapshot_index",
                "Last log index covered by the newest snapshot.",
            ),
            log_entries_since_snapshot: gauge(
                "raftkv_raft_log_entries_since_snapshot",
                "Log entries not yet covered by a snapshot.",
            ),
            follower_lag: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "raftkv_raft_follower_replication_lag_entries",
                        "On the leader: log entries each follower is behind.",
                    ),
                    &["follower"],
                )
                .expect("static metric definition"),
            ),
            members: reg(
                &r,
                IntGaugeVec::new(
                    Opts::new(
                        "raftkv_raft_members",
                        "Cluster members by role (voter, learner).",
                    ),
                    &["role"],
                )
                .expect("static metric definition"),
            ),
            fsync_seconds: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "raftkv_storage_fsync_duration_seconds",
                        "Write-ahead log fsync latency.",
                    )
                    .buckets(vec![
                        0.0001, 0.00025, 0.0005, 0.001, 0.002, 0.004, 0.008, 0.016, 0.032, 0.064,
                        0.128, 0.256, 0.512, 1.0,
                    ]),
                )
                .expect("static metric definition"),
            ),
            fsync_batch: reg(
                &r,
                Histogram::with_opts(
                    HistogramOpts::new(
                        "raftkv_storage_fsync_batch_appends",
                        "Log appends made durable by one fsync (group commit).",
                    )
                    .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
                )
                .expect("static metric definition"),
            ),
            db_size: gauge(
                "raftkv_storage_db_size_bytes",
                "Bytes the database occupies on disk.",
            ),
            db_size_in_use: gauge(
                "raftkv_storage_db_size_in_use_bytes",
                "Bytes of live data in the database.",
            ),
            keys: gauge("raftkv_storage_keys", "Live keys (RocksDB estimate)."),
            write_stopped: gauge(
                "raftkv_storage_write_stall",
                "1 while RocksDB stops writes (a write stall).",
            ),
            delayed_write_rate: gauge(
                "raftkv_storage_delayed_write_rate_bytes",
                "Write rate RocksDB throttles to while slowing writes (0 when not slowed).",
            ),
            pending_compaction: gauge(
                "raftkv_storage_pending_compaction_bytes",
                "Bytes RocksDB estimates compaction still has to rewrite.",
            ),
            memtable_bytes: gauge(
                "raftkv_storage_memtable_bytes",
                "Memory held by RocksDB's memtables (all column families, flushing ones included).",
            ),
            block_cache_bytes: gauge(
                "raftkv_storage_block_cache_bytes",
                "Memory held by RocksDB's block cache (memtable reservations included).",
            ),
            revision: gauge("raftkv_store_revision", "Current store revision."),
            compacted_revision: gauge(
                "raftkv_store_compacted_revision",
                "Revision at or below which history has been compacted.",
            ),
            quota: gauge(
                "raftkv_storage_quota_bytes",
                "Database size above which writes are refused (NOSPACE).",
            ),
            fs_free: gauge(
                "raftkv_storage_filesystem_free_bytes",
                "Free bytes on the filesystem holding the data directory.",
            ),
            fs_size: gauge(
                "raftkv_storage_filesystem_size_bytes",
                "Size in bytes of the filesystem holding the data directory.",
            ),
            registry: r,
        };
        m.init_series();
        m
    }

    /// Creates the series of every known label value at zero, so rates and alerts work before
    /// the first event.
    fn init_series(&self) {
        for reason in [
            "missing",
            "malformed",
            "algorithm",
            "signature",
            "expired",
            "not_yet_valid",
            "issuer",
            "audience",
            "claims",
            "password",
        ] {
            self.auth_failures.with_label_values(&[reason]);
        }
        for op in ["encrypt", "decrypt", "key_exhausted"] {
            self.crypto_errors.with_label_values(&[op]);
        }
        for role in ["voter", "learner"] {
            self.members.with_label_values(&[role]);
        }
    }

    pub fn set_quota(&self, bytes: u64) {
        self.quota.set(bytes as i64);
    }

    /// Reads Raft and storage state into the gauges.
    pub fn refresh(&self, consensus: &Consensus, store: &Store) {
        if let Some((free, size)) = filesystem_space(store.dir()) {
            self.fs_free.set(free as i64);
            self.fs_size.set(size as i64);
        }
        let s = consensus.status();
        self.term.set(s.term as i64);
        self.leader_id.set(s.leader.unwrap_or(0) as i64);
        self.is_leader.set(s.is_leader() as i64);
        let changes = consensus.leader_changes();
        if let Ok(mut seen) = self.leader_changes_seen.lock() {
            if changes > *seen {
                self.leader_changes.inc_by(changes - *seen);
            }
            *seen = changes;
        }
        let (rounds, acked) = consensus.read_indexes();
        if let Ok(mut seen) = self.read_indexes_seen.lock() {
            self.read_indexes
                .with_label_values(&["quorum_round"])
                .inc_by(rounds.saturating_sub(seen.0));
            self.read_indexes
                .with_label_values(&["follower_acknowledged"])
                .inc_by(acked.saturating_sub(seen.1));
            *seen = (rounds.max(seen.0), acked.max(seen.1));
        }
        self.commit_index.set(s.committed as i64);
        self.applied_index.set(s.applied as i64);
        self.last_log_index.set(s.last_log_index as i64);
        self.snapshot_index.set(s.snapshot_index as i64);
        self.log_entries_since_snapshot
            .set(s.last_log_index.saturating_sub(s.snapshot_index) as i64);
        self.follower_lag.reset();
        if s.is_leader() {
            for (id, matched) in &s.replication {
                if *id != s.id {
                    let lag = s.last_log_index.saturating_sub(matched.unwrap_or(0));
                    self.follower_lag
                        .with_label_values(&[&format!("{id:x}")])
                        .set(lag as i64);
                }
            }
        }
        self.members
            .with_label_values(&["voter"])
            .set(s.voters.len() as i64);
        self.members
            .with_label_values(&["learner"])
            .set(s.learners.len() as i64);
        self.db_size.set(store.disk_size() as i64);
        self.db_size_in_use.set(store.live_data_size() as i64);
        self.keys
            .set(store.int_property(CF_KV, "rocksdb.estimate-num-keys") as i64);
        self.write_stopped
            .set(store.int_property_sum("rocksdb.is-write-stopped").min(1) as i64);
        self.delayed_write_rate
            .set(store.int_property_sum("rocksdb.actual-delayed-write-rate") as i64);
        self.pending_compaction
            .set(store.int_property_sum("rocksdb.estimate-pending-compaction-bytes") as i64);
        self.memtable_bytes
            .set(store.int_property_sum("rocksdb.size-all-mem-tables") as i64);
        self.block_cache_bytes
            .set(store.int_property(CF_KV, "rocksdb.block-cache-usage") as i64);
        if let Ok((rev, compacted)) = store.revisions() {
            self.revision.set(rev);
            self.compacted_revision.set(compacted);
        }
    }

    pub fn encode(&self) -> String {
        let mut buf = Vec::new();
        if let Err(e) = TextEncoder::new().encode(&self.registry.gather(), &mut buf) {
            tracing::error!(error = %e, "encoding metrics");
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}

/// Free and total bytes of the filesystem holding `path`.
fn filesystem_space(path: &std::path::Path) -> Option<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).ok()?;
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated path and `st` a properly sized out-parameter.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return None;
    }
    let frsize = st.f_frsize as u64;
    Some((st.f_bavail as u64 * frsize, st.f_blocks as u64 * frsize))
}

/// What decides readiness.
#[derive(Debug, Clone)]
pub struct ReadinessPolicy {
    /// Longest silence from the leader (or, on the leader, from a quorum) still considered
    /// connected.
    pub max_leader_silence: Duration,
    /// Most log entries applied may trail the commit index.
    pub max_apply_lag: u64,
}

/// Why a node is not ready, or None if it is.
pub fn not_ready_reason(consensus: &Consensus, policy: &ReadinessPolicy) -> Option<String> {
    let s = consensus.status();
    if !s.voters.contains(&s.id) && !s.learners.contains(&s.id) {
        return Some("not a member of any cluster yet".into());
    }
    let Some(leader) = s.leader else {
        return Some("no known leader".into());
    };
    let silence = policy.max_leader_silence.as_millis() as u64;
    if leader == s.id {
        if s.voters.len() > 1 && s.quorum_ack_age_ms.map(|a| a > silence).unwrap_or(true) {
            return Some("leader has not heard from a quorum recently".into());
        }
    } else if s.leader_contact_age_ms.map(|a| a > silence).unwrap_or(true) {
        return Some(format!("no contact from leader {leader:x} recently"));
    }
    let lag = s.committed.saturating_sub(s.applied);
    if lag > policy.max_apply_lag {
        return Some(format!(
            "applied index trails the commit index by {lag} entries"
        ));
    }
    None
}

#[derive(Clone)]
struct HttpState {
    metrics: Arc<Metrics>,
    consensus: Consensus,
    policy: ReadinessPolicy,
}

async fn metrics_handler(State(st): State<HttpState>) -> impl IntoResponse {
    st.metrics.refresh(&st.consensus, st.consensus.store());
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        st.metrics.encode(),
    )
}

async fn healthz() -> impl IntoResponse {
    (StatusCode::OK, "ok\n")
}

async fn readyz(State(st): State<HttpState>) -> impl IntoResponse {
    match not_ready_reason(&st.consensus, &st.policy) {
        None => (StatusCode::OK, "ready\n".to_string()),
        Some(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        ),
    }
}

/// The HTTP router of the metrics port.
pub fn router(metrics: Arc<Metrics>, consensus: Consensus, policy: ReadinessPolicy) -> Router {
    Router::new()
        .route("/metrics", get(metrics_handler))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(HttpState {
            metrics,
            consensus,
            policy,
        })
}
