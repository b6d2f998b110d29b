//! Consensus: the only module that talks to openraft. The rest of the node proposes commands,
//! asks for read barriers, changes membership and reads status through `Consensus`, so an
//! openraft upgrade touches this directory alone.
//!
//! Any node serves any request: proposals and read-index requests made on a follower are
//! forwarded to the leader over the peer port.

mod forward;
mod log_store;
mod network;
mod peer;
mod pipe;
mod reads;
mod state_machine;
#[cfg(test)]
mod suite_tests;
pub mod types;

pub use network::{CLUSTER_ID_HEADER, PeerChannels};

/// Decodes bytes as each Raft message the peer port accepts (for fuzzing the decoder).
pub fn decode_raft_messages(data: &[u8]) {
    let _ = decode::<openraft::raft::AppendEntriesRequest<TypeConfig>>(data);
    let _ = decode::<openraft::raft::VoteRequest<TypeConfig>>(data);
    let _ = decode::<openraft::raft::TransferLeaderRequest<TypeConfig>>(data);
    let _ = decode::<(types::Vote, types::SnapshotMeta)>(data);
}
pub use peer::PeerService;
pub use state_machine::{ApplyHooks, EventSink};
pub use types::{MemberNode, NodeId};

use crate::apply::Executor;
use crate::model::{ApplyResponse, Credential, Proposal};
use crate::storage::Store;
use log_store::LogStore;
use network::PeerNetwork;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, RaftMetrics, ServerState, SnapshotPolicy};
use reads::ReadBatcher;
use serde::{Deserialize, Serialize};
use state_machine::StateMachine;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use types::{TypeConfig, Vote, decode, encode};

type Raft = openraft::Raft<TypeConfig, StateMachine>;

/// Tuning and identity for the consensus layer.
#[derive(Debug, Clone)]
pub struct ConsensusConfig {
    pub node_id: NodeId,
    pub cluster_id: u64,
    pub heartbeat_interval: Duration,
    pub election_timeout: Duration,
    /// Build a snapshot after this many log entries since the last one.
    pub snapshot_threshold: u64,
    /// Log entries kept behind a snapshot, so slightly lagging followers catch up from the log.
    pub snapshot_log_keep: u64,
    /// How long a request waits for a leader, a commit or a read index.
    pub request_timeout: Duration,
    pub peer_tls: Option<tonic::transport::ClientTlsConfig>,
    /// With peer TLS: what a connecting member's certificate must show.
    pub peer_identity: Option<Arc<crate::tls::PeerIdentity>>,
    /// Hosts a member certificate may name besides those of the current members' peer URLs
    /// (the initial cluster and this member, for before the membership is known).
    pub known_peer_hosts: Vec<String>,
}

/// Decides what the leader accepts from other members on behalf of clients. A forwarded
/// request is never trusted as the forwarding member's own: it must carry the caller's
/// credential, which is verified and authorized here, on the leader.
pub trait Gatekeeper: Send + Sync {
    /// Verifies `credential`, sets the proposal's principal from it, and checks the proposal
    /// (its values must be sealed when this cluster encrypts). `peer_verified` says whether
    /// the forwarding member proved its identity with a member certificate.
    fn admit_proposal(
        &self,
        proposal: &mut Proposal,
        credential: Option<&Credential>,
        peer_verified: bool,
    ) -> Result<(), ProposeError>;

    /// Same for a membership change (administrators only, or a member's own attributes from
    /// a verified member).
    fn admit_membership(
        &self,
        change: &MembershipChange,
        credential: Option<&Credential>,
        peer_verified: bool,
    ) -> Result<(), ProposeError>;
}

/// Refuses everything: the gatekeeper until the API is ready.
struct Closed;

impl Gatekeeper for Closed {
    fn admit_proposal(
        &self,
        _: &mut Proposal,
        _: Option<&Credential>,
        _: bool,
    ) -> Result<(), ProposeError> {
        Err(ProposeError::Unavailable("leader not ready".into()))
    }
    fn admit_membership(
        &self,
        _: &MembershipChange,
        _: Option<&Credential>,
        _: bool,
    ) -> Result<(), ProposeError> {
        Err(ProposeError::Unavailable("leader not ready".into()))
    }
}

/// Why a proposal did not produce a result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
pub enum ProposeError {
    #[error("etcdserver: no leader")]
    NoLeader,
    /// The proposal may or may not have been committed; the caller must not assume either.
    #[error("etcdserver: request timed out, the outcome is unknown: {0}")]
    OutcomeUnknown(String),
    #[error("etcdserver: {0}")]
    Unavailable(String),
    #[error("etcdserver: server stopped")]
    Stopped,
    #[error("etcdserver: {0}")]
    Rejected(String),
    /// The leader could not verify who the caller is.
    #[error("{0}")]
    Unauthenticated(String),
    /// The leader verified the caller, who may not do this.
    #[error("etcdserver: permission denied")]
    PermissionDenied,
}

/// A committed and applied proposal.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Proposed {
    pub response: ApplyResponse,
    pub term: u64,
    pub index: u64,
}

/// A membership change, executed by the leader one at a time.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum MembershipChange {
    AddLearner { id: NodeId, node: MemberNode },
    AddVoter { id: NodeId, node: MemberNode },
    Promote { id: NodeId },
    Remove { id: NodeId },
    UpdateNode { id: NodeId, node: MemberNode },
    TransferLeader { to: NodeId },
}

/// What this node knows about itself and the cluster.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    pub id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub state: String,
    pub last_log_index: u64,
    pub committed: u64,
    pub applied: u64,
    pub snapshot_index: u64,
    pub purged_index: u64,
    pub voters: BTreeSet<NodeId>,
    pub learners: BTreeSet<NodeId>,
    pub nodes: BTreeMap<NodeId, MemberNode>,
    /// On the leader: the last log index each member has matched.
    pub replication: BTreeMap<NodeId, Option<u64>>,
    /// On the leader: milliseconds since a quorum last acknowledged it.
    pub quorum_ack_age_ms: Option<u64>,
    /// Whether the newest membership entry is committed (no change in progress).
    pub membership_settled: bool,
    /// On a follower: milliseconds since a leader last reached this node.
    pub leader_contact_age_ms: Option<u64>,
}

impl NodeStatus {
    pub fn is_leader(&self) -> bool {
        self.leader == Some(self.id) && self.state == "leader"
    }
    pub fn is_learner(&self) -> bool {
        self.learners.contains(&self.id)
    }
}

/// Handle to the node's Raft instance. Cheap to clone.
#[derive(Clone)]
pub struct Consensus {
    inner: Arc<Inner>,
}

/// Answers requests that only the leader can answer (see `Consensus::call_leader`).
pub type LeaderHandler = Arc<
    dyn Fn(Vec<u8>) -> futures::future::BoxFuture<'static, Result<Vec<u8>, String>> + Send + Sync,
>;

struct Inner {
    /// Set as the member stops: long-lived streams from peers end then, or the peer server
    /// would wait for them.
    stopping: watch::Sender<bool>,
    /// While set, this member grants no votes (see `abstain_until_caught_up`).
    abstaining: std::sync::atomic::AtomicBool,
    /// One membership change at a time on the leader: openraft makes a change in two steps
    /// (joint, then uniform) and a change proposed between them fails the second step, so a
    /// promotion that a member's own attribute update overtook was reported failed although
    /// the member had become a voter.
    membership_changes: tokio::sync::Mutex<()>,
    leader_changes: std::sync::atomic::AtomicU64,
    /// Read indexes this member confirmed as leader: with a quorum round of heartbeats, and
    /// from a follower's acknowledgement (see `read_index_for`).
    read_rounds: std::sync::atomic::AtomicU64,
    read_acknowledged: std::sync::atomic::AtomicU64,
    /// Becomes true once this member applied a membership that no longer names it, or a
    /// member answered its vote request saying so.
    removed: Arc<tokio::sync::watch::Sender<bool>>,
    /// When a leader last sent this node anything (replication or heartbeat).
    last_leader_contact: std::sync::Mutex<Option<std::time::Instant>>,
    leader_handler: std::sync::RwLock<Option<LeaderHandler>>,
    gatekeeper: std::sync::RwLock<Arc<dyn Gatekeeper>>,
    config: ConsensusConfig,
    raft: Raft,
    store: Store,
    channels: PeerChannels,
    applied: watch::Receiver<u64>,
    /// This member's linearizable reads: one request to the leader serves a batch.
    reads: ReadBatcher,
    /// On the leader, its own batches and every follower's share quorum rounds.
    leader_reads: ReadBatcher,
    forwarder: forward::Forwarder,
}

impl Consensus {
    /// Opens the Raft log and state machine in `store` and starts Raft.
    pub async fn start(
        config: ConsensusConfig,
        store: Store,
        executor: Executor,
        hooks: ApplyHooks,
    ) -> Result<Consensus, String> {
        let election_ms = (config.election_timeout.as_millis() as u64).max(4);
        let raft_config = Config {
            cluster_name: format!("raftkv-{:x}", config.cluster_id),
            heartbeat_interval: config.heartbeat_interval.as_millis() as u64,
            // openraft's followers refuse votes for `election_timeout_max` after they last heard
            // from the leader (its leader lease), and campaign only once that lease and then a
            // random time in [min, max) have passed: between max + min and 2 * max after the
            // last heartbeat. With max = 3/4 and min = 1/4 of the configured election timeout,
            // a follower campaigns 1 to 1.5 election timeouts after the leader went silent,
            // as an etcd follower does at 1 to 2 (max = ET, min = ET/2 made it 1.5 to 2, and
            // failover measurably slower than etcd's in the robustness suite).
            election_timeout_min: election_ms / 4,
            election_timeout_max: election_ms * 3 / 4,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_threshold),
            max_in_snapshot_log_to_keep: config.snapshot_log_keep,
            replication_lag_threshold: config
                .snapshot_threshold
                .saturating_add(config.snapshot_log_keep),
            max_payload_entries: 1024,
            install_snapshot_timeout: 300_000,
            enable_pre_vote: Some(true),
            // A leader commits once a quorum of followers has its entries, before its own log
            // is fsynced. After a crash its log can therefore be shorter than what it committed;
            // resuming leadership without an election would overwrite committed entries on the
            // followers. It must win a fresh election (with Raft's up-to-date check) instead.
            enable_leader_restore: Some(false),
            // openraft's default has a removed leader hand leadership to a remaining voter
            // 150 ms after its removal commits; the member it names, asked by a node outside
            // its configuration, stopped answering votes for one to two request timeouts
            // (7-14 s without a leader in the robustness suite, replace-member of the leader).
            // A removed member stops instead (see `observe`), and the remaining voters elect
            // on their own within 1-1.5 election timeouts.
            removed_leader_step_down: openraft::StepDownPolicy::Never,
            ..Default::default()
        }
        .validate()
        .map_err(|e| format!("raft config: {e}"))?;
        let channels = PeerChannels::new(config.cluster_id, config.peer_tls.clone());
        let (sm, applied) = StateMachine::open(store.clone(), executor, hooks)
            .map_err(|e| format!("opening the state machine: {e}"))?;
        let raft = Raft::new(
            config.node_id,
            Arc::new(raft_config),
            PeerNetwork::new(channels.clone()),
            LogStore::new(store.clone()),
            sm,
        )
        .await
        .map_err(|e| format!("starting raft: {e}"))?;
        let inner = Arc::new(Inner {
            stopping: watch::channel(false).0,
            abstaining: std::sync::atomic::AtomicBool::new(false),
            membership_changes: tokio::sync::Mutex::new(()),
            leader_changes: std::sync::atomic::AtomicU64::new(0),
            read_rounds: std::sync::atomic::AtomicU64::new(0),
            read_acknowledged: std::sync::atomic::AtomicU64::new(0),
            removed: channels.removed.clone(),
            last_leader_contact: std::sync::Mutex::new(None),
            leader_handler: std::sync::RwLock::new(None),
            gatekeeper: std::sync::RwLock::new(Arc::new(Closed)),
            config,
            raft,
            store,
            channels,
            applied,
            reads: ReadBatcher::default(),
            leader_reads: ReadBatcher::default(),
            forwarder: forward::Forwarder::default(),
        });
        let c = Consensus { inner };
        tokio::spawn(observe(c.clone()));
        Ok(c)
    }

    pub fn id(&self) -> NodeId {
        self.inner.config.node_id
    }

    pub fn cluster_id(&self) -> u64 {
        self.inner.config.cluster_id
    }

    pub fn store(&self) -> &Store {
        &self.inner.store
    }

    pub fn request_timeout(&self) -> Duration {
        self.inner.config.request_timeout
    }

    /// The gRPC service for the peer port.
    pub fn peer_service(&self) -> PeerService {
        PeerService::new(self.clone())
    }

    /// True if this node's Raft state was ever initialized or it has received any log.
    pub async fn is_initialized(&self) -> bool {
        self.inner.raft.is_initialized().await.unwrap_or(false)
    }

    /// Initializes a new cluster with the given voters. Only one member of a new cluster does
    /// this; the others learn the membership from it.
    pub async fn initialize(&self, members: BTreeMap<NodeId, MemberNode>) -> Result<(), String> {
        self.inner
            .raft
            .initialize(members)
            .await
            .map_err(|e| e.to_string())
    }

    /// Read indexes confirmed as leader so far: (with a quorum round, from a follower's
    /// acknowledgement).
    pub fn read_indexes(&self) -> (u64, u64) {
        use std::sync::atomic::Ordering::Relaxed;
        (
            self.inner.read_rounds.load(Relaxed),
            self.inner.read_acknowledged.load(Relaxed),
        )
    }

    /// How many times this node has seen the leader change since it started.
    pub fn leader_changes(&self) -> u64 {
        self.inner
            .leader_changes
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The index up to which this node's state machine has applied.
    pub fn applied_index(&self) -> u64 {
        *self.inner.applied.borrow()
    }

    /// What this member knows. `leader` is the leader as this member can vouch for it now, as
    /// etcd reports it: a leader that has not heard from a quorum within an election timeout
    /// (it is cut off, and the others elect another) reports none, and so does a follower that
    /// has not heard from its leader within one.
    pub fn status(&self) -> NodeStatus {
        let mut s = status_from(&self.inner.raft.metrics().borrow_watched());
        s.leader_contact_age_ms = self
            .inner
            .last_leader_contact
            .lock()
            .ok()
            .and_then(|t| *t)
            .map(|t| t.elapsed().as_millis() as u64);
        let limit = self.inner.config.election_timeout.as_millis() as u64;
        // A leader hears from its quorum every heartbeat. It stops vouching for itself two
        // heartbeats short of an election timeout without it, so that clients learn it is cut
        // off within one election timeout (as etcd's check-quorum) even counting the time
        // to ask; the others may elect a successor from one election timeout on.
        let heartbeat = self.inner.config.heartbeat_interval.as_millis() as u64;
        let leader_limit = limit.saturating_sub(2 * heartbeat).max(limit / 2);
        let vouched = match s.leader {
            Some(l) if l == s.id => {
                s.voters.len() <= 1 || s.quorum_ack_age_ms.is_some_and(|a| a <= leader_limit)
            }
            Some(_) => s.leader_contact_age_ms.is_some_and(|a| a <= limit),
            None => false,
        };
        if !vouched {
            s.leader = None;
        }
        s
    }

    /// Whether this member can vouch for a leader now (see `status`).
    pub fn has_leader(&self) -> bool {
        self.status().leader.is_some()
    }

    /// Hands leadership to the most up-to-date other voter, if this member leads, and waits up
    /// to `within` for it to move: what a member does before it stops, so that clients see no
    /// election timeout.
    pub async fn step_down(&self, within: Duration) -> bool {
        if !self.is_leader() {
            return false;
        }
        let s = self.status();
        let Some((&to, _)) = s
            .replication
            .iter()
            .filter(|(id, _)| **id != s.id && s.voters.contains(id))
            .max_by_key(|(_, matched)| matched.unwrap_or(0))
        else {
            return false;
        };
        if self.inner.raft.trigger().transfer_leader(to).await.is_err() {
            return false;
        }
        let mut rx = self.inner.raft.metrics();
        let moved = async {
            loop {
                let l = rx.borrow_and_update().current_leader;
                if l.is_some() && l != Some(self.id()) {
                    return;
                }
                if rx.changed().await.is_err() {
                    return;
                }
            }
        };
        let ok = tokio::time::timeout(within, moved).await.is_ok();
        if ok {
            tracing::info!(
                node = self.id(),
                to,
                "handed leadership over before stopping"
            );
        }
        ok
    }

    /// For a member that joins an existing cluster with empty storage: it grants no votes until
    /// it holds the cluster's committed data. A member that lost its disk could otherwise help
    /// elect a leader that lacks entries this member had acknowledged before the loss.
    pub fn abstain_until_caught_up(&self) {
        use std::sync::atomic::Ordering;
        self.inner.abstaining.store(true, Ordering::SeqCst);
        tracing::info!(
            node = self.id(),
            "joining with empty storage: abstaining from elections until caught up"
        );
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let s = this.status();
                if s.applied > 0 && s.applied >= s.committed && s.leader.is_some() {
                    this.inner.abstaining.store(false, Ordering::SeqCst);
                    tracing::info!(
                        node = this.id(),
                        applied = s.applied,
                        "caught up: taking part in elections"
                    );
                    return;
                }
            }
        });
    }

    pub(crate) fn is_abstaining(&self) -> bool {
        self.inner
            .abstaining
            .load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Records that a leader just reached this node.
    pub(crate) fn touch_leader_contact(&self) {
        if let Ok(mut t) = self.inner.last_leader_contact.lock() {
            *t = Some(std::time::Instant::now());
        }
    }

    /// Hosts a member certificate may name: those of the members' peer URLs, and the ones
    /// configured as known.
    pub(crate) fn member_hosts(&self) -> Vec<String> {
        let mut hosts: Vec<String> = {
            let m = self.inner.raft.metrics();
            let m = m.borrow_watched();
            m.membership_config
                .membership()
                .nodes()
                .filter_map(|(_, n)| crate::tls::url_host(&n.peer_url))
                .collect()
        };
        hosts.extend(self.inner.config.known_peer_hosts.iter().cloned());
        hosts.sort();
        hosts.dedup();
        hosts
    }

    /// Presents a new member certificate on connections to other members from now on.
    pub fn set_peer_client_tls(&self, tls: tonic::transport::ClientTlsConfig) {
        self.inner.channels.set_tls(tls);
    }

    pub(crate) fn peer_identity(&self) -> Option<&Arc<crate::tls::PeerIdentity>> {
        self.inner.config.peer_identity.as_ref()
    }

    /// The election timeout this node runs with.
    pub fn election_timeout(&self) -> Duration {
        self.inner.config.election_timeout
    }

    fn leader_node(&self) -> Option<(NodeId, MemberNode)> {
        leader_in(&self.inner.raft.metrics().borrow_watched())
    }

    /// Waits until some leader is known, up to `timeout`.
    async fn wait_for_leader(&self, timeout: Duration) -> Option<NodeId> {
        tokio::time::timeout(timeout, self.leader_when(|_| true))
            .await
            .ok()
            .flatten()
    }

    /// Resolves once a member other than `old` is known to lead (never while none is, nor
    /// once Raft stopped: the caller's own request then says so).
    async fn wait_leader_other_than(&self, old: NodeId) {
        if self.leader_when(|l| l != old).await.is_none() {
            std::future::pending::<()>().await;
        }
    }

    /// The leader, once there is one that `wanted` accepts; `None` if Raft stopped first.
    /// Only a leader the membership names counts, as for `leader_node`: after the leader's own
    /// removal, Raft still names it until another is elected, and a caller that took that for
    /// a leader and went back to `leader_node` would loop without ever waiting.
    async fn leader_when(&self, wanted: impl Fn(NodeId) -> bool) -> Option<NodeId> {
        let mut rx = self.inner.raft.metrics();
        loop {
            if let Some((l, _)) = leader_in(&rx.borrow_and_update()).filter(|(l, _)| wanted(*l)) {
                return Some(l);
            }
            rx.changed().await.ok()?;
        }
    }

    /// Commits a proposal and returns the state machine's response, forwarding it with the
    /// caller's `credential` to the leader if this node is not it. A proposal without a
    /// credential (the leader's own housekeeping) is never forwarded.
    pub async fn propose(
        &self,
        proposal: Proposal,
        credential: Option<Credential>,
    ) -> Result<Proposed, ProposeError> {
        let deadline = tokio::time::Instant::now() + self.inner.config.request_timeout;
        loop {
            match self.propose_local(proposal.clone()).await {
                Ok(p) => return Ok(p),
                Err(LocalError::Forward) => {}
                Err(LocalError::Failed(e)) => return Err(e),
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(ProposeError::NoLeader);
            }
            match self.leader_node() {
                Some(_) if credential.is_none() => {
                    return Err(ProposeError::Unavailable(
                        "this member's own proposal can only be made while it leads".into(),
                    ));
                }
                Some((id, node)) if id != self.id() => {
                    let forwarded =
                        self.forward_propose(&node, credential.as_ref(), &proposal, remaining);
                    // A leader that was paused or cut off holds the request until the caller
                    // gives up; once another member leads, say so at once (as etcd's "leader
                    // changed") so the client moves on. Whether the old leader had already
                    // replicated it is not known, so it is not sent again.
                    let outcome = tokio::select! {
                        r = forwarded => r,
                        () = self.wait_leader_other_than(id) => {
                            return Err(ProposeError::OutcomeUnknown(
                                "the leader changed while it held the request".into(),
                            ));
                        }
                    };
                    match outcome {
                        Ok(p) => return Ok(p),
                        // The leader moved on before accepting it: safe to try again.
                        Err(ForwardError::NotDelivered) => {
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                        Err(ForwardError::Failed(e)) => return Err(e),
                    }
                }
                _ => {
                    if self
                        .wait_for_leader(remaining.min(self.inner.config.election_timeout * 3))
                        .await
                        .is_none()
                        && tokio::time::Instant::now() >= deadline
                    {
                        return Err(ProposeError::NoLeader);
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
            }
        }
    }

    /// Proposes on this node if it is the leader.
    async fn propose_local(&self, proposal: Proposal) -> Result<Proposed, LocalError> {
        let timeout = self.inner.config.request_timeout;
        let fut = self.inner.raft.client_write(proposal);
        match tokio::time::timeout(timeout, fut).await {
            Err(_) => Err(LocalError::Failed(ProposeError::OutcomeUnknown(
                "no commit within the request timeout".into(),
            ))),
            Ok(Ok(resp)) => Ok(Proposed {
                response: resp.data,
                term: resp.log_id.committed_leader_id().term,
                index: resp.log_id.index(),
            }),
            Ok(Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_)))) => {
                Err(LocalError::Forward)
            }
            Ok(Err(RaftError::APIError(ClientWriteError::LogEntryDiscarded(_)))) => {
                Err(LocalError::Failed(ProposeError::OutcomeUnknown(
                    "leadership changed while the entry was in flight".into(),
                )))
            }
            Ok(Err(RaftError::APIError(e))) => {
                Err(LocalError::Failed(ProposeError::Rejected(e.to_string())))
            }
            Ok(Err(RaftError::Fatal(_))) => Err(LocalError::Failed(ProposeError::Stopped)),
        }
    }

    async fn forward_propose(
        &self,
        leader: &MemberNode,
        credential: Option<&Credential>,
        proposal: &Proposal,
        timeout: Duration,
    ) -> Result<Proposed, ForwardError> {
        self.inner
            .forwarder
            .forward(
                &self.inner.channels,
                &leader.peer_url,
                credential,
                proposal,
                timeout,
            )
            .await
    }

    /// Sets who decides what forwarded requests the leader accepts.
    pub fn set_gatekeeper(&self, g: Arc<dyn Gatekeeper>) {
        if let Ok(mut slot) = self.inner.gatekeeper.write() {
            *slot = g;
        }
    }

    fn gatekeeper(&self) -> Arc<dyn Gatekeeper> {
        self.inner
            .gatekeeper
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|_| Arc::new(Closed))
    }

    /// Handles a proposal a member forwarded: the leader authenticates the caller and sets
    /// the principal itself, then proposes.
    pub(crate) async fn propose_forwarded(
        &self,
        mut proposal: Proposal,
        credential: Option<Credential>,
        peer_verified: bool,
    ) -> Result<Proposed, ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NoLeader);
        }
        self.gatekeeper()
            .admit_proposal(&mut proposal, credential.as_ref(), peer_verified)?;
        self.propose_as_leader(proposal).await
    }

    /// Handles a proposal forwarded by a follower: only the leader accepts it.
    pub(crate) async fn propose_as_leader(
        &self,
        proposal: Proposal,
    ) -> Result<Proposed, ProposeError> {
        match self.propose_local(proposal).await {
            Ok(p) => Ok(p),
            Err(LocalError::Forward) => Err(ProposeError::NoLeader),
            Err(LocalError::Failed(e)) => Err(e),
        }
    }

    /// Returns once this node's state machine reflects every write committed before the call
    /// (ReadIndex): reads served afterwards are linearizable. Concurrent callers share one
    /// round trip to the quorum.
    pub async fn read_barrier(&self) -> Result<(), ProposeError> {
        let index = self.read_index().await?;
        let mut rx = self.inner.applied.clone();
        let wait = rx.wait_for(|applied| *applied >= index);
        match tokio::time::timeout(self.inner.config.request_timeout, wait).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(_)) => Err(ProposeError::Stopped),
            Err(_) => Err(ProposeError::Unavailable(
                "request timed out, waiting for the applied index took too long".into(),
            )),
        }
    }

    /// The commit index a linearizable read must wait for, from the leader (batched).
    pub async fn read_index(&self) -> Result<u64, ProposeError> {
        let this = self.clone();
        self.inner
            .reads
            .run(move || {
                let this = this.clone();
                async move { this.fetch_read_index().await }
            })
            .await
    }

    async fn fetch_read_index(&self) -> Result<u64, ProposeError> {
        let timeout = self.inner.config.request_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let leader = match self.leader_node() {
                Some(l) => l,
                None => {
                    let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if remaining.is_zero() || self.wait_for_leader(remaining).await.is_none() {
                        return Err(ProposeError::NoLeader);
                    }
                    continue;
                }
            };
            if leader.0 == self.id() {
                // The same rounds as followers' requests: one quorum round serves both.
                match self.read_index_as_leader().await {
                    Ok(i) => return Ok(i),
                    Err(ProposeError::NoLeader) => {}
                    Err(e) => return Err(e),
                }
            } else {
                let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
                // A leader that was cut off or paused holds the request until it times out;
                // once another member leads, ask that one instead. Reads can be asked again.
                let asked = tokio::select! {
                    r = self.remote_read_index(leader.0, &leader.1, remaining) => Some(r),
                    () = self.wait_leader_other_than(leader.0) => None,
                };
                match asked {
                    Some(Ok(i)) => return Ok(i),
                    Some(Err(ForwardError::NotDelivered)) | None => {}
                    Some(Err(ForwardError::Failed(e))) => return Err(e),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProposeError::NoLeader);
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn local_read_index(&self) -> Result<u64, LocalError> {
        self.inner
            .read_rounds
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let fut = self
            .inner
            .raft
            .get_read_linearizer(openraft::ReadPolicy::ReadIndex);
        match tokio::time::timeout(self.inner.config.request_timeout, fut).await {
            Err(_) => Err(LocalError::Failed(ProposeError::Unavailable(
                "request timed out confirming leadership".into(),
            ))),
            Ok(Ok(lin)) => Ok(lin.read_log_id().index()),
            Ok(Err(RaftError::APIError(
                openraft::errors::LinearizableReadError::ForwardToLeader(_),
            ))) => Err(LocalError::Forward),
            // One round of heartbeats missed its quorum (a busy machine, a follower restarting):
            // the caller tries again until its deadline rather than failing the read at once.
            Ok(Err(RaftError::APIError(
                openraft::errors::LinearizableReadError::QuorumNotEnough(_),
            ))) => Err(LocalError::Forward),
            Ok(Err(RaftError::Fatal(_))) => Err(LocalError::Failed(ProposeError::Stopped)),
        }
    }

    /// This member's vote as its Raft core holds it now (published metrics may lag it).
    async fn vote_now(&self) -> Option<Vote> {
        self.inner
            .raft
            .with_raft_state(|st| *st.vote_ref())
            .await
            .ok()
    }

    /// Serves a follower's read-index request that carries the follower's vote, read after its
    /// reads arrived. If that is this leader's own committed vote, the follower acknowledged
    /// this leader's term after the reads began: with this leader, a quorum did. A leader of a
    /// later term needs a quorum too, so it needs this member or that follower, and: this
    /// member has not voted for it (its vote is still its own, checked in its Raft core, not in
    /// published metrics), and the follower can only have voted for it after sending, so
    /// anything that leader commits is committed after the reads began. Writes acknowledged
    /// before they began are all in this leader's commit index once it has committed an entry
    /// of its own term. So that index is a read index, without a heartbeat round. Anything
    /// short of that (another vote, a quorum that needs a third member, nothing committed in
    /// this term yet) takes the round.
    pub(crate) async fn read_index_for(
        &self,
        ack: Option<(NodeId, Vote)>,
    ) -> Result<u64, ProposeError> {
        if let Some((follower, theirs)) = ack {
            let me = self.id();
            let answered = self
                .inner
                .raft
                .with_raft_state(move |st| read_index_acknowledged(st, me, follower, &theirs))
                .await;
            if let Ok(Some(index)) = answered {
                self.inner
                    .read_acknowledged
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Ok(index);
            }
        }
        self.read_index_as_leader().await
    }

    /// Serves a follower's read-index request: only the leader answers.
    pub(crate) async fn read_index_as_leader(&self) -> Result<u64, ProposeError> {
        let this = self.clone();
        self.inner
            .leader_reads
            .run(move || {
                let this = this.clone();
                async move {
                    match this.local_read_index().await {
                        Ok(i) => Ok(i),
                        Err(LocalError::Forward) => Err(ProposeError::NoLeader),
                        Err(LocalError::Failed(e)) => Err(e),
                    }
                }
            })
            .await
    }

    async fn remote_read_index(
        &self,
        leader_id: NodeId,
        leader: &MemberNode,
        timeout: Duration,
    ) -> Result<u64, ForwardError> {
        use openraft::vote::RaftLeaderId;
        // Read after every read of the batch arrived: this member's acknowledgement of the
        // leader's term, which lets the leader answer without a quorum round of its own.
        let ack = self
            .vote_now()
            .await
            .filter(|v| v.is_committed() && *v.leader_id().node_id() == leader_id)
            .map(|v| (self.id(), v));
        let answer = self
            .inner
            .channels
            .call_pipe(&leader.peer_url, pipe::PipeRequest::ReadIndex(ack), timeout)
            .await;
        let r = match answer {
            Ok(pipe::PipeAnswer::ReadIndex(r)) => r,
            Ok(other) => {
                return Err(ForwardError::Failed(ProposeError::Unavailable(format!(
                    "the leader answered a read-index request with {other:?}"
                ))));
            }
            Err(pipe::PipeError::Unsupported) => {
                return self.remote_read_index_call(leader, timeout).await;
            }
            // Reads are idempotent: any transport failure can be retried.
            Err(pipe::PipeError::Failed(_)) => return Err(ForwardError::NotDelivered),
        };
        match r {
            Ok(i) => Ok(i),
            Err(ProposeError::NoLeader) => Err(ForwardError::NotDelivered),
            Err(e) => Err(ForwardError::Failed(e)),
        }
    }

    /// The read-index request as a call of its own, for a leader that has no pipe.
    async fn remote_read_index_call(
        &self,
        leader: &MemberNode,
        timeout: Duration,
    ) -> Result<u64, ForwardError> {
        let mut client = self
            .inner
            .channels
            .client(&leader.peer_url)
            .map_err(|e| ForwardError::Failed(ProposeError::Unavailable(e)))?;
        let mut req = self
            .inner
            .channels
            .request(raftkv_proto::peer::Frame { data: Vec::new() });
        req.set_timeout(timeout);
        match client.read_index(req).await {
            Ok(resp) => {
                let r: Result<u64, ProposeError> = decode(&resp.into_inner().data)
                    .map_err(|e| ForwardError::Failed(ProposeError::Unavailable(e.to_string())))?;
                match r {
                    Ok(i) => Ok(i),
                    Err(ProposeError::NoLeader) => Err(ForwardError::NotDelivered),
                    Err(e) => Err(ForwardError::Failed(e)),
                }
            }
            // Reads are idempotent: any transport failure can be retried.
            Err(_) => Err(ForwardError::NotDelivered),
        }
    }

    /// Resolves once the member is stopping.
    pub(crate) fn stopped(&self) -> impl Future<Output = ()> + Send + 'static {
        let mut rx = self.inner.stopping.subscribe();
        async move {
            let _ = rx.wait_for(|s| *s).await;
        }
    }

    /// Applies a membership change through the leader and waits until it is committed. Off the
    /// leader, `credential` travels with it so the leader can authorize the change.
    pub async fn change_membership(
        &self,
        change: MembershipChange,
        credential: Option<Credential>,
    ) -> Result<(), ProposeError> {
        let deadline = tokio::time::Instant::now() + self.inner.config.request_timeout;
        loop {
            let leader = self.leader_node();
            match leader {
                Some((id, _)) if id == self.id() => {
                    match self.change_membership_local(change.clone()).await {
                        Err(LocalError::Forward) => {}
                        Ok(()) => return Ok(()),
                        Err(LocalError::Failed(e)) => return Err(e),
                    }
                }
                Some((_, node)) => {
                    let data = encode(&(&credential, &change))
                        .map_err(|e| ProposeError::Rejected(e.to_string()))?;
                    let mut client = self
                        .inner
                        .channels
                        .client(&node.peer_url)
                        .map_err(ProposeError::Unavailable)?;
                    let mut req = self
                        .inner
                        .channels
                        .request(raftkv_proto::peer::Frame { data });
                    req.set_timeout(self.inner.config.request_timeout);
                    match client.change_membership(req).await {
                        Ok(resp) => {
                            let r: Result<(), ProposeError> = decode(&resp.into_inner().data)
                                .map_err(|e| ProposeError::OutcomeUnknown(e.to_string()))?;
                            match r {
                                Err(ProposeError::NoLeader) => {}
                                other => return other,
                            }
                        }
                        Err(s) if is_connect_failure(&s) => {}
                        Err(s) => {
                            return Err(ProposeError::OutcomeUnknown(s.message().to_string()));
                        }
                    }
                }
                None => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(ProposeError::NoLeader);
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            self.wait_for_leader(remaining).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Handles a membership change forwarded by a follower, once the gatekeeper allows it.
    pub(crate) async fn change_membership_as_leader(
        &self,
        change: MembershipChange,
        credential: Option<Credential>,
        peer_verified: bool,
    ) -> Result<(), ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NoLeader);
        }
        self.gatekeeper()
            .admit_membership(&change, credential.as_ref(), peer_verified)?;
        match self.change_membership_local(change).await {
            Ok(()) => Ok(()),
            Err(LocalError::Forward) => Err(ProposeError::NoLeader),
            Err(LocalError::Failed(e)) => Err(e),
        }
    }

    async fn change_membership_local(&self, change: MembershipChange) -> Result<(), LocalError> {
        let raft = &self.inner.raft;
        let map = |r: Result<_, RaftError<TypeConfig, ClientWriteError<TypeConfig>>>| match r {
            Ok(_) => Ok(()),
            Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
                Err(LocalError::Forward)
            }
            Err(RaftError::APIError(e)) => {
                Err(LocalError::Failed(ProposeError::Rejected(e.to_string())))
            }
            Err(RaftError::Fatal(_)) => Err(LocalError::Failed(ProposeError::Stopped)),
        };
        let _one_at_a_time = self.inner.membership_changes.lock().await;
        tracing::info!(node = self.id(), ?change, "changing membership");
        match change {
            MembershipChange::AddLearner { id, node } => {
                map(raft.add_learner(id, node, false).await)
            }
            MembershipChange::AddVoter { id, node } => {
                map(raft.add_learner(id, node, false).await)?;
                map(raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await)
            }
            MembershipChange::Promote { id } => {
                // As etcd: only a learner that has caught up to 90% of the leader's log.
                let st = self.status();
                let matched = st.replication.get(&id).copied().flatten().unwrap_or(0);
                if (matched as f64) < 0.9 * st.last_log_index as f64 {
                    return Err(LocalError::Failed(ProposeError::Rejected(
                        "can only promote a learner member which is in sync with leader".into(),
                    )));
                }
                map(raft
                    .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
                    .await)
            }
            MembershipChange::Remove { id } => {
                // Removing a voter without retaining it removes the node too. A second step
                // after it could not be proposed by a leader that just removed itself, and
                // turned a removal that had happened into "no leader" for the caller.
                let status = self.status();
                if status.voters.contains(&id) {
                    map(raft
                        .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
                        .await)
                } else if status.nodes.contains_key(&id) {
                    map(raft
                        .change_membership(ChangeMembers::RemoveNodes(BTreeSet::from([id])), false)
                        .await)
                } else {
                    Ok(())
                }
            }
            MembershipChange::UpdateNode { id, node } => {
                // Setting a node that is not a member would add it as a learner: a member that
                // was removed while publishing its attributes must not come back that way.
                if !self.status().nodes.contains_key(&id) {
                    return Err(LocalError::Failed(ProposeError::Rejected(
                        "etcdserver: member not found".into(),
                    )));
                }
                map(raft
                    .change_membership(ChangeMembers::SetNodes(BTreeMap::from([(id, node)])), true)
                    .await)
            }
            MembershipChange::TransferLeader { to } => {
                if !self.status().is_leader() {
                    return Err(LocalError::Forward);
                }
                raft.trigger()
                    .transfer_leader(to)
                    .await
                    .map_err(|_| LocalError::Failed(ProposeError::Stopped))?;
                // Wait for the transfer to take effect, as etcd's MoveLeader does.
                let mut rx = raft.metrics();
                let wait = async {
                    loop {
                        if rx.borrow_and_update().current_leader == Some(to) {
                            return true;
                        }
                        if rx.changed().await.is_err() {
                            return false;
                        }
                    }
                };
                match tokio::time::timeout(self.inner.config.request_timeout, wait).await {
                    Ok(true) => Ok(()),
                    _ => Err(LocalError::Failed(ProposeError::Unavailable(format!(
                        "leadership did not move to {to:x} in time"
                    )))),
                }
            }
        }
    }

    /// Registers the application's handler for `call_leader` requests.
    pub fn set_leader_handler(&self, handler: LeaderHandler) {
        if let Ok(mut h) = self.inner.leader_handler.write() {
            *h = Some(handler);
        }
    }

    /// Runs the application's leader handler on the leader (here or over the peer port).
    pub async fn call_leader(&self, data: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        let deadline = tokio::time::Instant::now() + self.inner.config.request_timeout;
        loop {
            match self.leader_node() {
                Some((id, _)) if id == self.id() => {
                    match self.call_leader_local(data.clone()).await {
                        Err(ProposeError::NoLeader) => {}
                        other => return other,
                    }
                }
                Some((_, node)) => {
                    let mut client = self
                        .inner
                        .channels
                        .client(&node.peer_url)
                        .map_err(ProposeError::Unavailable)?;
                    let mut req = self
                        .inner
                        .channels
                        .request(raftkv_proto::peer::Frame { data: data.clone() });
                    req.set_timeout(self.inner.config.request_timeout);
                    if let Ok(resp) = client.leader_call(req).await {
                        let r: Result<Vec<u8>, ProposeError> = decode(&resp.into_inner().data)
                            .map_err(|e| ProposeError::Unavailable(e.to_string()))?;
                        match r {
                            Err(ProposeError::NoLeader) => {}
                            other => return other,
                        }
                    }
                }
                None => {}
            }
            let remaining = deadline.saturating_duration_since(tokio::time::Instant::now());
            if remaining.is_zero() {
                return Err(ProposeError::NoLeader);
            }
            self.wait_for_leader(remaining).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Serves a leader call if this node leads.
    pub(crate) async fn call_leader_local(&self, data: Vec<u8>) -> Result<Vec<u8>, ProposeError> {
        if !self.is_leader() {
            return Err(ProposeError::NoLeader);
        }
        let handler = self
            .inner
            .leader_handler
            .read()
            .ok()
            .and_then(|h| h.clone())
            .ok_or_else(|| ProposeError::Unavailable("leader not ready".into()))?;
        handler(data).await.map_err(ProposeError::Rejected)
    }

    /// True if this node currently leads.
    pub fn is_leader(&self) -> bool {
        let m = self.inner.raft.metrics();
        let m = m.borrow_watched();
        m.state == ServerState::Leader && m.current_leader == Some(self.id())
    }

    /// The current Raft term.
    pub fn term(&self) -> u64 {
        self.inner.raft.metrics().borrow_watched().current_term
    }

    /// Whether candidate `id`, whose log ends at `last_log_index`, was removed: this member
    /// applied (so the cluster committed) a configuration that does not name it, and the
    /// candidate's log ends at or before that configuration. A member added after the
    /// configuration this one knows has later entries, and is not judged by a member that lags.
    pub(crate) fn was_removed(&self, id: NodeId, last_log_index: Option<u64>) -> bool {
        let m = self.inner.raft.metrics().borrow_watched().clone();
        let Some(at) = *m.membership_config.log_id() else {
            return false;
        };
        let applied = m.last_applied.is_some_and(|a| a.index >= at.index);
        let named = m
            .membership_config
            .membership()
            .nodes()
            .any(|(n, _)| *n == id);
        applied && !named && last_log_index.is_none_or(|i| i <= at.index)
    }

    /// Resolves once this member learned it was removed from the cluster.
    pub async fn removed(&self) {
        let mut rx = self.inner.removed.subscribe();
        let _ = rx.wait_for(|r| *r).await;
    }

    /// Stops Raft.
    pub async fn shutdown(&self) {
        self.inner.stopping.send_replace(true);
        if let Err(e) = self.inner.raft.shutdown().await {
            tracing::warn!(error = %e, "raft shutdown");
        }
    }
}

/// The read index a follower's acknowledgement makes safe without a quorum round (see
/// `Consensus::read_index_for`), judged on the Raft core's own state: this member leads with
/// exactly the vote `follower` sent, it and the follower are a quorum of every configuration in
/// effect, and it has committed an entry of its own term.
fn read_index_acknowledged(
    st: &openraft::RaftState<TypeConfig>,
    me: NodeId,
    follower: NodeId,
    theirs: &Vote,
) -> Option<u64> {
    use openraft::vote::RaftLeaderId;
    let vote = st.vote_ref();
    if st.server_state != openraft::ServerState::Leader
        || !vote.is_committed()
        || *vote.leader_id().node_id() != me
        || vote != theirs
        || follower == me
    {
        return None;
    }
    let quorum = st
        .membership_state
        .effective()
        .get_joint_config()
        .iter()
        .all(|config| {
            let acked = [me, follower]
                .iter()
                .filter(|id| config.contains(id))
                .count();
            acked * 2 > config.len()
        });
    if !quorum {
        return None;
    }
    let committed = st.local_committed()?;
    if committed.committed_leader_id() != &vote.leader_id().to_committed() {
        return None;
    }
    // The later of what this leader applied-as-committed and what its quorum granted.
    let granted = st.cluster_committed().map_or(0, |l| l.index);
    Some(committed.index.max(granted))
}

/// The leader Raft knows of, with its address, if the membership still names it.
fn leader_in(m: &RaftMetrics<TypeConfig>) -> Option<(NodeId, MemberNode)> {
    let leader = m.current_leader?;
    let node = m
        .membership_config
        .membership()
        .get_node(&leader)
        .cloned()?;
    Some((leader, node))
}

/// Logs leadership and membership changes once each, and counts leader changes.
async fn observe(c: Consensus) {
    let mut rx = c.inner.raft.metrics();
    let mut leader: Option<NodeId> = None;
    let mut membership: Option<Option<types::LogId>> = None;
    let mut was_member = false;
    loop {
        // Metrics change with every write: the membership is compared by its log id and only
        // formatted when it changed.
        let (now_leader, term, members, members_at) = {
            let m = rx.borrow_and_update();
            let at = *m.membership_config.log_id();
            let changed = membership.as_ref() != Some(&at);
            // Removed once a configuration without this member is applied here (committed):
            // like etcd's, such a member stops instead of serving "no leader" forever.
            let applied = match (&m.last_applied, &at) {
                (Some(applied), Some(at)) => applied.index >= at.index,
                _ => false,
            };
            let named = m
                .membership_config
                .membership()
                .nodes()
                .any(|(id, _)| *id == c.id());
            // A member joining with empty storage applies older configurations that do not
            // name it yet: only one that was a member can be removed.
            if applied && named {
                was_member = true;
            }
            // Only a configuration this member proposed itself, as leader in the current term,
            // counts: a member that replays an old log (a reused id, a stale volume) applies
            // removals that later entries undo.
            let proposed_here = at.is_some_and(|at| {
                at.leader_id.node_id == c.id() && at.leader_id.term == m.current_term
            });
            if applied && was_member && !named && proposed_here && !*c.inner.removed.borrow() {
                tracing::error!(
                    node = c.id(),
                    "this member was removed from the cluster; stopping"
                );
                c.inner.removed.send_replace(true);
            }
            (
                m.current_leader,
                m.current_term,
                changed.then(|| m.membership_config.membership().to_string()),
                at,
            )
        };
        if now_leader != leader {
            match now_leader {
                Some(l) => {
                    c.inner
                        .leader_changes
                        .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::info!(node = c.id(), term, leader = l, "leader changed");
                }
                None => tracing::warn!(node = c.id(), term, "no leader"),
            }
            leader = now_leader;
        }
        if let Some(members) = members {
            if membership.is_some() {
                tracing::info!(node = c.id(), term, membership = %members, "membership changed");
            }
            membership = Some(members_at);
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

enum LocalError {
    /// This node is not the leader.
    Forward,
    Failed(ProposeError),
}

#[derive(Clone)]
enum ForwardError {
    /// The request did not reach a leader that took it: it is safe to retry.
    NotDelivered,
    Failed(ProposeError),
}

impl ForwardError {
    /// What the node a proposal was forwarded to answered, however it travelled.
    fn from_leader(answer: Result<Proposed, ProposeError>) -> Result<Proposed, ForwardError> {
        match answer {
            Ok(p) => Ok(p),
            // The remote was no longer leader and did not take the entry.
            Err(ProposeError::NoLeader) => Err(ForwardError::NotDelivered),
            Err(e) => Err(ForwardError::Failed(e)),
        }
    }
}

/// A transport error that happened before the request could be sent.
fn is_connect_failure(status: &tonic::Status) -> bool {
    status.code() == tonic::Code::Unavailable
        && (status.message().contains("connect") || status.message().contains("onnection refused"))
}

fn status_from(m: &RaftMetrics<TypeConfig>) -> NodeStatus {
    let membership = m.membership_config.membership();
    let voters: BTreeSet<NodeId> = membership.voter_ids().collect();
    let learners: BTreeSet<NodeId> = membership.learner_ids().collect();
    let nodes: BTreeMap<NodeId, MemberNode> =
        membership.nodes().map(|(id, n)| (*id, n.clone())).collect();
    let state = match m.state {
        ServerState::Leader => "leader",
        ServerState::Follower => "follower",
        ServerState::Candidate => "candidate",
        ServerState::Learner => "learner",
        ServerState::Shutdown => "shutdown",
    }
    .to_string();
    let replication = m
        .replication
        .as_ref()
        .map(|r| {
            r.iter()
                .map(|(id, l)| (*id, l.as_ref().map(|l| l.index())))
                .collect()
        })
        .unwrap_or_default();
    NodeStatus {
        id: m.id,
        leader: m.current_leader,
        term: m.current_term,
        state,
        last_log_index: m.last_log_index.unwrap_or(0),
        committed: m
            .cluster_committed
            .as_ref()
            .or(m.local_committed.as_ref())
            .map(|l| l.index())
            .unwrap_or(0),
        applied: m.last_applied.as_ref().map(|l| l.index()).unwrap_or(0),
        snapshot_index: m.snapshot.as_ref().map(|l| l.index()).unwrap_or(0),
        purged_index: m.purged.as_ref().map(|l| l.index()).unwrap_or(0),
        voters,
        learners,
        nodes,
        replication,
        quorum_ack_age_ms: m
            .last_quorum_acked
            .as_ref()
            .map(|t| openraft::async_runtime::Instant::elapsed(&**t).as_millis() as u64),
        membership_settled: m.membership_config.log_id() == m.committed_membership_config.log_id(),
        leader_contact_age_ms: None,
    }
}
