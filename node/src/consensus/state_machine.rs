//! openraft's state machine on our store: applies committed entries through the `apply`
//! executor, records the last applied log id and membership in the same atomic write, and keeps
//! snapshots. A snapshot taken here is a RocksDB checkpoint (hard links: its cost does not grow
//! with the data); the transfer file a lagging follower needs is made from it only when one does.
//! A received snapshot is its transfer file, installed by replacing the state machine.

use super::types::{LogId, SnapshotMeta, StoredMembership, TypeConfig, decode, encode};
use crate::apply::Executor;
use crate::model::{ApplyOutput, ApplyResponse};
use crate::storage::mvcc::{self, Counters, Event, Staging};
use crate::storage::snapshot::{self, META_APPLIED, META_MEMBERSHIP};
use crate::storage::{CF_META, Store};
use futures::{FutureExt, Stream, StreamExt};
use openraft::entry::RaftEntry;
use openraft::storage::{
    ApplyResponder, EntryResponder, RaftSnapshotBuilder, RaftStateMachine, Snapshot,
};
use openraft::{EntryPayload, OptionalSend};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tokio::sync::watch;

/// A snapshot on disk: its transfer file, which for our own snapshots is made from their
/// checkpoint when first needed.
#[derive(Debug, Clone)]
pub struct SnapshotFile {
    pub path: PathBuf,
    pub checkpoint: Option<PathBuf>,
}

impl SnapshotFile {
    /// A snapshot that is just a file (one received from the leader).
    pub fn received(path: PathBuf) -> SnapshotFile {
        SnapshotFile {
            path,
            checkpoint: None,
        }
    }

    /// The transfer file, made from the checkpoint if it does not exist yet.
    pub async fn transfer_file(&self) -> io::Result<PathBuf> {
        if tokio::fs::try_exists(&self.path).await? {
            return Ok(self.path.clone());
        }
        let Some(ckpt) = self.checkpoint.clone() else {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!("snapshot file {} is missing", self.path.display()),
            ));
        };
        let path = self.path.clone();
        tokio::task::spawn_blocking(move || -> io::Result<PathBuf> {
            let started = std::time::Instant::now();
            let facts = snapshot::export_checkpoint(&ckpt, &path)?;
            tracing::info!(
                file = %path.display(),
                bytes = facts.bytes,
                records = facts.records,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "wrote snapshot transfer file"
            );
            Ok(path)
        })
        .await
        .map_err(io::Error::other)?
    }
}

/// Receives the changes of every applied write, in order, with the revision they produced.
pub type EventSink = Arc<dyn Fn(i64, &[Event]) + Send + Sync>;

/// Things the rest of the node observes about applying.
#[derive(Clone)]
pub struct ApplyHooks {
    pub events: EventSink,
    /// Called once per applied proposal with whether it succeeded.
    pub outcome: Arc<dyn Fn(bool) + Send + Sync>,
    /// Called after a snapshot is installed (with its size in bytes and how long it took).
    pub snapshot_installed: Arc<dyn Fn(u64, std::time::Duration) + Send + Sync>,
    /// Called once a lease grant or revocation is written (and after a snapshot install).
    pub leases: Arc<dyn Fn(crate::model::LeaseChange) + Send + Sync>,
}

impl Default for ApplyHooks {
    fn default() -> Self {
        ApplyHooks {
            events: Arc::new(|_, _| {}),
            outcome: Arc::new(|_| {}),
            snapshot_installed: Arc::new(|_, _| {}),
            leases: Arc::new(|_| {}),
        }
    }
}

pub struct StateMachine {
    store: Store,
    executor: Executor,
    counters: Counters,
    dir: PathBuf,
    applied: watch::Sender<u64>,
    hooks: ApplyHooks,
}

impl StateMachine {
    pub fn open(
        store: Store,
        executor: Executor,
        hooks: ApplyHooks,
    ) -> io::Result<(StateMachine, watch::Receiver<u64>)> {
        let dir = store.dir().join("snapshots");
        std::fs::create_dir_all(&dir)?;
        snapshot::recover_interrupted_install(&store)?;
        // Leftovers of snapshot transfers or builds cut short.
        for e in std::fs::read_dir(&dir)?.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if name.ends_with(".tmp")
                || name.starts_with("incoming-")
                || name.starts_with("build-")
                || name.starts_with("backup-")
            {
                remove_path(&e.path());
            }
        }
        // Data of a snapshot whose metadata never got written is incomplete.
        for e in std::fs::read_dir(&dir)?.flatten() {
            let path = e.path();
            let is_data = matches!(
                path.extension().and_then(|x| x.to_str()),
                Some("rkvs" | "ckpt")
            );
            if is_data && !path.with_extension("meta").exists() {
                remove_path(&path);
            }
        }
        let counters = Counters::load(&store)?;
        let applied_index = read_applied(&store)?.map(|l| l.index()).unwrap_or(0);
        let (tx, rx) = watch::channel(applied_index);
        Ok((
            StateMachine {
                store,
                executor,
                counters,
                dir,
                applied: tx,
                hooks,
            },
            rx,
        ))
    }

    /// Where a peer should write an incoming snapshot before handing it to openraft.
    pub fn incoming_path(store: &Store) -> PathBuf {
        store
            .dir()
            .join("snapshots")
            .join(format!("incoming-{:016x}", rand::random::<u64>()))
    }
}

fn read_applied(store: &Store) -> io::Result<Option<LogId>> {
    let meta = store.cf(CF_META)?;
    match store
        .db()
        .get_cf(meta, META_APPLIED)
        .map_err(io::Error::other)?
    {
        Some(b) => decode(&b),
        None => Ok(None),
    }
}

fn read_membership(store: &Store) -> io::Result<StoredMembership> {
    let meta = store.cf(CF_META)?;
    match store
        .db()
        .get_cf(meta, META_MEMBERSHIP)
        .map_err(io::Error::other)?
    {
        Some(b) => decode(&b),
        None => Ok(StoredMembership::default()),
    }
}

fn snapshot_name(meta: &SnapshotMeta) -> String {
    match &meta.last_log_id {
        Some(l) => format!("snap-{:020}-{}", l.index(), l.committed_leader_id()),
        None => "snap-00000000000000000000-none".to_string(),
    }
    .replace([' ', ':', '/', '(', ')', '{', '}', ','], "_")
}

fn remove_path(path: &Path) {
    let _ = if path.is_dir() {
        std::fs::remove_dir_all(path)
    } else {
        std::fs::remove_file(path)
    };
}

/// The snapshots in `dir` (by their metadata files, written last), newest last.
fn list_snapshots(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)?
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().map(|e| e == "meta").unwrap_or(false))
        .collect();
    v.sort();
    Ok(v)
}

/// Records `meta` as the current snapshot (its data already in place) and removes older ones.
fn commit_snapshot(dir: &Path, meta: &SnapshotMeta) -> io::Result<PathBuf> {
    let base = dir.join(snapshot_name(meta));
    let meta_tmp = base.with_extension("meta.tmp");
    std::fs::write(&meta_tmp, encode(meta)?)?;
    std::fs::File::open(&meta_tmp)?.sync_all()?;
    let meta_path = base.with_extension("meta");
    std::fs::rename(&meta_tmp, &meta_path)?;
    std::fs::File::open(dir)?.sync_all()?;
    for old in list_snapshots(dir)? {
        if old != meta_path {
            remove_path(&old.with_extension("rkvs"));
            remove_path(&old.with_extension("ckpt"));
            remove_path(&old);
        }
    }
    Ok(base)
}

/// Makes the file `data` the current snapshot (moving it into place) and removes older ones.
fn keep_as_current(dir: &Path, meta: &SnapshotMeta, data: &Path) -> io::Result<PathBuf> {
    let base = dir.join(snapshot_name(meta));
    let path = base.with_extension("rkvs");
    if data != path {
        // Files received into our own directory move into place; others are copied so their
        // owner keeps them.
        if data.parent() == Some(dir) {
            std::fs::rename(data, &path)?;
        } else {
            let tmp = base.with_extension("rkvs.tmp");
            std::fs::copy(data, &tmp)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, &path)?;
        }
    }
    // The same snapshot may have been ours: its checkpoint is no longer the truth of this file.
    remove_path(&base.with_extension("ckpt"));
    commit_snapshot(dir, meta)?;
    Ok(path)
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotData = SnapshotFile;
    type SnapshotBuilder = SnapshotBuilder;

    async fn applied_state(&mut self) -> Result<(Option<LogId>, StoredMembership), io::Error> {
        Ok((read_applied(&self.store)?, read_membership(&self.store)?))
    }

    async fn apply<Strm>(&mut self, mut entries: Strm) -> Result<(), io::Error>
    where
        Strm: Stream<Item = Result<EntryResponder<TypeConfig>, io::Error>> + Unpin + OptionalSend,
    {
        // Entries that are ready together are staged into one write: one RocksDB write and one
        // set of counters per batch rather than per entry. Responses go out once it is written.
        let mut batch = Batch::new(self.counters);
        loop {
            let next = if batch.is_empty() {
                entries.next().await
            } else {
                match entries.next().now_or_never() {
                    Some(n) => n,
                    None => {
                        self.flush(&mut batch)?;
                        continue;
                    }
                }
            };
            let Some(item) = next else { break };
            let (entry, responder) = item?;
            let log_id = entry.log_id();
            let response = match &entry.payload {
                EntryPayload::Normal(proposal) => {
                    let alone = Executor::needs_own_batch(&proposal.command);
                    if alone {
                        self.flush(&mut batch)?;
                    }
                    let staged = self.executor.stage(
                        &self.store,
                        self.counters,
                        &mut batch.staging,
                        proposal,
                    )?;
                    (self.hooks.outcome)(staged.response.result.is_ok());
                    let lease_change = match (&proposal.command, &staged.response.result) {
                        (_, Ok(ApplyOutput::LeaseGranted { id, ttl })) => {
                            Some(crate::model::LeaseChange::Granted { id: *id, ttl: *ttl })
                        }
                        (crate::model::Command::LeaseRevoke { id }, Ok(_)) => {
                            Some(crate::model::LeaseChange::Revoked { id: *id })
                        }
                        _ => None,
                    };
                    self.counters = staged.counters;
                    batch.auth_changed |= staged.auth_changed;
                    if !staged.events.is_empty() {
                        batch.events.push((staged.response.revision, staged.events));
                    }
                    batch.push(log_id, responder, staged.response);
                    if alone {
                        self.flush(&mut batch)?;
                    }
                    // Lease commands are always alone in their batch: written by now.
                    if let Some(change) = lease_change {
                        (self.hooks.leases)(change);
                    }
                    continue;
                }
                EntryPayload::Membership(m) => {
                    batch.membership = Some(StoredMembership::new(Some(log_id), m.clone()));
                    self.none_response()
                }
                EntryPayload::Blank => self.none_response(),
            };
            batch.push(log_id, responder, response);
            if batch.len() >= MAX_BATCH_ENTRIES
                || batch.staging.batch.size_in_bytes() >= MAX_BATCH_BYTES
            {
                self.flush(&mut batch)?;
            }
        }
        self.flush(&mut batch)?;
        Ok(())
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        SnapshotBuilder {
            store: self.store.clone(),
            dir: self.dir.clone(),
        }
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta,
        snapshot: SnapshotFile,
    ) -> Result<(), io::Error> {
        let started = std::time::Instant::now();
        let store = self.store.clone();
        let dir = self.dir.clone();
        let meta_c = meta.clone();
        let file = snapshot.transfer_file().await?;
        let facts = tokio::task::spawn_blocking(move || -> io::Result<_> {
            let path = keep_as_current(&dir, &meta_c, &file)?;
            Ok(snapshot::install(&store, &path)?)
        })
        .await
        .map_err(io::Error::other)??;
        self.counters = Counters::load(&self.store)?;
        self.executor.reload(&self.store)?;
        let index = meta.last_log_id.map(|l| l.index()).unwrap_or(0);
        self.applied.send_replace(index);
        tracing::info!(
            last_log_id = ?meta.last_log_id,
            bytes = facts.bytes,
            records = facts.records,
            revision = self.counters.revision,
            "installed snapshot"
        );
        (self.hooks.snapshot_installed)(facts.bytes, started.elapsed());
        // Watchers re-read what changed from the store: there are no per-entry events here.
        (self.hooks.events)(self.counters.revision, &[]);
        (self.hooks.leases)(crate::model::LeaseChange::Reset);
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<
        Option<
            Snapshot<
                openraft::alias::CommittedLeaderIdOf<TypeConfig>,
                u64,
                super::types::MemberNode,
                SnapshotFile,
            >,
        >,
        io::Error,
    > {
        let Some(meta_path) = list_snapshots(&self.dir)?.pop() else {
            return Ok(None);
        };
        let meta_bytes = match std::fs::read(&meta_path) {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        let path = meta_path.with_extension("rkvs");
        let ckpt = meta_path.with_extension("ckpt");
        let checkpoint = ckpt.is_dir().then_some(ckpt);
        if checkpoint.is_none() && !path.exists() {
            return Ok(None);
        }
        Ok(Some(Snapshot {
            meta: decode(&meta_bytes)?,
            snapshot: SnapshotFile { path, checkpoint },
        }))
    }
}

/// Entries staged for one write.
struct Batch {
    staging: Staging,
    /// Counters as last written.
    written: Counters,
    last: Option<LogId>,
    membership: Option<StoredMembership>,
    responders: Vec<(Option<ApplyResponder<TypeConfig>>, ApplyResponse)>,
    events: Vec<(i64, Vec<Event>)>,
    auth_changed: bool,
}

const MAX_BATCH_ENTRIES: usize = 1024;
const MAX_BATCH_BYTES: usize = 8 << 20;

impl Batch {
    fn new(written: Counters) -> Batch {
        Batch {
            staging: Staging::default(),
            written,
            last: None,
            membership: None,
            responders: Vec::new(),
            events: Vec::new(),
            auth_changed: false,
        }
    }

    fn is_empty(&self) -> bool {
        self.last.is_none()
    }

    fn len(&self) -> usize {
        self.responders.len()
    }

    fn push(
        &mut self,
        log_id: LogId,
        responder: Option<ApplyResponder<TypeConfig>>,
        response: ApplyResponse,
    ) {
        self.last = Some(log_id);
        self.responders.push((responder, response));
    }
}

impl StateMachine {
    /// Writes the staged entries with the counters and last-applied marker, then tells waiting
    /// readers, watchers and proposers.
    fn flush(&mut self, b: &mut Batch) -> io::Result<()> {
        let Some(last) = b.last else {
            return Ok(());
        };
        let meta = self.store.cf(CF_META)?;
        let mut wb = std::mem::take(&mut b.staging.batch);
        mvcc::stage_counters(&self.store, &mut wb, b.written, self.counters)?;
        self.executor.stage_usage(&self.store, &mut wb)?;
        if let Some(m) = b.membership.take() {
            wb.put_cf(meta, META_MEMBERSHIP, encode(&m)?);
        }
        wb.put_cf(meta, META_APPLIED, encode(&Some(last))?);
        // Not logged: after a crash Raft re-applies what the files lack from its own log.
        self.store.write_applied(wb)?;
        b.written = self.counters;
        b.staging.overlay.clear();
        if std::mem::take(&mut b.auth_changed) {
            self.executor.auth().reload(&self.store)?;
        }
        for (rev, events) in b.events.drain(..) {
            (self.hooks.events)(rev, &events);
        }
        self.applied.send_replace(last.index());
        for (responder, response) in b.responders.drain(..) {
            if let Some(r) = responder {
                r.send(response);
            }
        }
        b.last = None;
        Ok(())
    }

    fn none_response(&self) -> ApplyResponse {
        ApplyResponse {
            revision: self.counters.revision,
            result: Ok(ApplyOutput::None),
        }
    }
}

pub struct SnapshotBuilder {
    store: Store,
    dir: PathBuf,
}

impl RaftSnapshotBuilder<TypeConfig> for SnapshotBuilder {
    type SnapshotData = SnapshotFile;

    async fn build_snapshot(
        &mut self,
    ) -> Result<
        Snapshot<
            openraft::alias::CommittedLeaderIdOf<TypeConfig>,
            u64,
            super::types::MemberNode,
            SnapshotFile,
        >,
        io::Error,
    > {
        let store = self.store.clone();
        let dir = self.dir.clone();
        tokio::task::spawn_blocking(move || -> io::Result<_> {
            let started = std::time::Instant::now();
            let tmp = dir.join(format!("build-{:016x}", rand::random::<u64>()));
            let facts = match snapshot::checkpoint(&store, &tmp) {
                Ok(f) => f,
                Err(e) => {
                    remove_path(&tmp);
                    return Err(e.into());
                }
            };
            let last_log_id: Option<LogId> = match &facts.applied {
                Some(b) => decode(b)?,
                None => None,
            };
            let last_membership: StoredMembership = match &facts.membership {
                Some(b) => decode(b)?,
                None => StoredMembership::default(),
            };
            let meta = SnapshotMeta {
                last_log_id,
                last_membership,
            };
            let base = dir.join(snapshot_name(&meta));
            let ckpt = base.with_extension("ckpt");
            // A snapshot at the same log id (rebuilt after a restart) is replaced whole.
            remove_path(&ckpt);
            remove_path(&base.with_extension("rkvs"));
            std::fs::rename(&tmp, &ckpt)?;
            commit_snapshot(&dir, &meta)?;
            tracing::info!(
                last_log_id = ?meta.last_log_id,
                elapsed_ms = started.elapsed().as_millis() as u64,
                "took snapshot checkpoint"
            );
            Ok(Snapshot {
                meta,
                snapshot: SnapshotFile {
                    path: base.with_extension("rkvs"),
                    checkpoint: Some(ckpt),
                },
            })
        })
        .await
        .map_err(io::Error::other)?
    }
}
