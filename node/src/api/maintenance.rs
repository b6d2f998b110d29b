//! etcd's Maintenance service: member status, alarms (space quota), defragmentation, hashes for
//! consistency checks, snapshots, and leadership transfer.

use super::{Api, status};
use crate::consensus::MembershipChange;
use futures::Stream;
use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::etcdserverpb::maintenance_server::Maintenance;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use tonic::{Request, Response, Status};

/// The etcd API version raftkv implements, reported where etcd reports its version.
pub const ETCD_API_VERSION: &str = "3.6.0";

pub struct MaintenanceService {
    api: Api,
}

impl MaintenanceService {
    pub fn new(api: Api) -> MaintenanceService {
        MaintenanceService { api }
    }

    fn alarms(&self) -> Vec<pb::AlarmMember> {
        if self.api.nospace.load(Ordering::Relaxed) {
            vec![pb::AlarmMember {
                member_id: self.api.consensus.id(),
                alarm: pb::AlarmType::Nospace as i32,
            }]
        } else {
            Vec::new()
        }
    }
}

type SnapshotStream = Pin<Box<dyn Stream<Item = Result<pb::SnapshotResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Maintenance for MaintenanceService {
    async fn alarm(
        &self,
        req: Request<pb::AlarmRequest>,
    ) -> Result<Response<pb::AlarmResponse>, Status> {
        let principal = Api::principal(&req)?;
        let r = req.into_inner();
        use pb::alarm_request::AlarmAction;
        match AlarmAction::try_from(r.action) {
            Ok(AlarmAction::Get) => {}
            Ok(AlarmAction::Activate) => {
                self.api.require_admin(&principal)?;
                if r.alarm == pb::AlarmType::Nospace as i32 {
                    self.api.nospace.store(true, Ordering::Relaxed);
                }
            }
            Ok(AlarmAction::Deactivate) => {
                self.api.require_admin(&principal)?;
                if r.alarm == pb::AlarmType::Nospace as i32 {
                    let size = self.api.consensus.store().disk_size();
                    if size <= self.api.limits.quota_bytes {
                        self.api.nospace.store(false, Ordering::Relaxed);
                    } else {
                        return Err(Status::failed_precondition(format!(
                            "etcdserver: the database ({size} bytes) is still over its quota ({} bytes); compact and defragment first",
                            self.api.limits.quota_bytes
                        )));
                    }
                }
            }
            Err(_) => return Err(status::invalid("etcdserver: unknown alarm action")),
        }
        Ok(Response::new(pb::AlarmResponse {
            header: self.api.header(0),
            alarms: self.alarms(),
        }))
    }

    async fn status(
        &self,
        req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Api::principal(&req)?;
        let s = self.api.consensus.status();
        let store = self.api.consensus.store();
        let rev = store.revisions().map(|(r, _)| r).unwrap_or(0);
        let mut errors = Vec::new();
        if self.api.nospace.load(Ordering::Relaxed) {
            errors.push("memberID:".to_string() + &format!("{:x} alarm:NOSPACE", s.id));
        }
        if s.leader.is_none() {
            errors.push("etcdserver: no leader".into());
        }
        Ok(Response::new(pb::StatusResponse {
            header: self.api.header(rev),
            version: ETCD_API_VERSION.into(),
            db_size: store.disk_size() as i64,
            leader: s.leader.unwrap_or(0),
            raft_index: s.committed,
            raft_term: s.term,
            raft_applied_index: s.applied,
            errors,
            db_size_in_use: store.live_data_size().min(store.disk_size()) as i64,
            is_learner: s.is_learner(),
            storage_version: String::new(),
            db_size_quota: self.api.limits.quota_bytes as i64,
            downgrade_info: None,
        }))
    }

    async fn defragment(
        &self,
        req: Request<pb::DefragmentRequest>,
    ) -> Result<Response<pb::DefragmentResponse>, Status> {
        let principal = Api::principal(&req)?;
        self.api.require_admin(&principal)?;
        let store = self.api.consensus.store().clone();
        let started = std::time::Instant::now();
        tokio::task::spawn_blocking(move || store.compact_all())
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| status::from_storage(&e))?;
        tracing::info!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "defragmented the database"
        );
        Ok(Response::new(pb::DefragmentResponse {
            header: self.api.header(0),
        }))
    }

    async fn hash(
        &self,
        req: Request<pb::HashRequest>,
    ) -> Result<Response<pb::HashResponse>, Status> {
        let principal = Api::principal(&req)?;
        self.api.require_admin(&principal)?;
        let store = self.api.consensus.store().clone();
        let (hash, rev) =
            tokio::task::spawn_blocking(move || store.hash_kv(0).map(|(h, _, r)| (h, r)))
                .await
                .map_err(|e| Status::internal(e.to_string()))?
                .map_err(|e| status::from_read(&e))?;
        Ok(Response::new(pb::HashResponse {
            header: self.api.header(rev),
            hash,
        }))
    }

    async fn hash_kv(
        &self,
        req: Request<pb::HashKvRequest>,
    ) -> Result<Response<pb::HashKvResponse>, Status> {
        let principal = Api::principal(&req)?;
        self.api.require_admin(&principal)?;
        let revision = req.into_inner().revision;
        let store = self.api.consensus.store().clone();
        let (hash, compacted, rev) = tokio::task::spawn_blocking(move || store.hash_kv(revision))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
            .map_err(|e| status::from_read(&e))?;
        Ok(Response::new(pb::HashKvResponse {
            header: self.api.header(rev),
            hash,
            compact_revision: compacted,
            hash_revision: if revision > 0 { revision } else { rev },
        }))
    }

    type SnapshotStream = SnapshotStream;

    async fn snapshot(
        &self,
        req: Request<pb::SnapshotRequest>,
    ) -> Result<Response<Self::SnapshotStream>, Status> {
        let principal = Api::principal(&req)?;
        self.api.require_admin(&principal)?;
        // Everything acknowledged before this request is in the backup, even on a follower.
        self.api.linearize().await?;
        // One at a time: each holds a copy of the data on disk until its stream ends.
        let Ok(one_at_a_time) = self.api.backup_slot.clone().try_acquire_owned() else {
            return Err(Status::resource_exhausted(
                "etcdserver: a backup is already being made on this member; retry when it is done",
            ));
        };
        let started = std::time::Instant::now();
        let store = self.api.consensus.store().clone();
        let (cluster_id, member_id) = (self.api.consensus.cluster_id(), self.api.consensus.id());
        let written = tokio::task::spawn_blocking(move || {
            use crate::storage::backup::{self, BackupKey};
            // Beside the database, not in it: a backup's copy must not count toward the quota.
            let dir = store
                .dir()
                .parent()
                .map(|p| p.join("backups"))
                .unwrap_or_else(|| store.dir().join("backups"));
            std::fs::create_dir_all(&dir)?;
            let path = dir.join(format!("backup-{:016x}", rand::random::<u64>()));
            let keys = || -> Result<Vec<BackupKey>, crate::storage::StorageError> {
                Ok(crate::apply::keys_in_use(&store)?
                    .into_iter()
                    .map(|(id, fp)| BackupKey {
                        id,
                        fingerprint: hex::encode(fp),
                    })
                    .collect())
            };
            let header = backup::write(&store, cluster_id, member_id, keys, &path)?;
            // Opened, then unlinked, here: the file lives as long as the stream reading it, and
            // nothing is left behind however the client leaves.
            let file = std::fs::File::open(&path);
            let _ = std::fs::remove_file(&path);
            Ok::<_, crate::storage::StorageError>((header, file?))
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))
        .and_then(|r| r.map_err(|e| status::from_storage(&e)));
        let m = &self.api.metrics;
        let (header, file) = match written {
            Ok(w) => w,
            Err(e) => {
                m.backups.with_label_values(&["error"]).inc();
                tracing::error!(error = %e.message(), "making a backup failed");
                return Err(e);
            }
        };
        m.backups.with_label_values(&["ok"]).inc();
        m.backup_seconds.observe(started.elapsed().as_secs_f64());
        m.backup_last_success.set(header.created_unix as i64);
        let file = tokio::fs::File::from_std(file);
        let total = file
            .metadata()
            .await
            .map_err(|e| Status::internal(format!("reading the backup: {e}")))?
            .len();
        m.backup_last_bytes.set(total as i64);
        tracing::info!(
            revision = header.revision,
            bytes = total,
            took_ms = started.elapsed().as_millis() as u64,
            "streaming a backup"
        );
        let response_header = self.api.header(header.revision);
        let stream = futures::stream::unfold(
            (file, 0u64, false, one_at_a_time),
            move |(mut file, sent, done, slot)| async move {
                use tokio::io::AsyncReadExt;
                if done {
                    return None;
                }
                let mut blob = vec![0u8; 1 << 20];
                let mut n = 0;
                while n < blob.len() {
                    match file.read(&mut blob[n..]).await {
                        Ok(0) => break,
                        Ok(k) => n += k,
                        Err(e) => {
                            let err = Status::internal(format!("reading the backup: {e}"));
                            return Some((Err(err), (file, sent, true, slot)));
                        }
                    }
                }
                if n == 0 {
                    return None;
                }
                blob.truncate(n);
                let sent = sent + n as u64;
                let item = pb::SnapshotResponse {
                    header: response_header,
                    remaining_bytes: total.saturating_sub(sent),
                    blob,
                    version: ETCD_API_VERSION.into(),
                };
                Some((Ok(item), (file, sent, false, slot)))
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn move_leader(
        &self,
        req: Request<pb::MoveLeaderRequest>,
    ) -> Result<Response<pb::MoveLeaderResponse>, Status> {
        let caller = Api::caller(&req)?;
        let principal = caller.principal.clone();
        self.api.require_admin(&principal)?;
        let to = req.into_inner().target_id;
        let s = self.api.consensus.status();
        if !s.voters.contains(&to) {
            return Err(Status::failed_precondition(format!(
                "etcdserver: bad leader transferee: {to:x} is not a voting member"
            )));
        }
        if s.leader != Some(to) {
            self.api
                .consensus
                .change_membership(
                    MembershipChange::TransferLeader { to },
                    Some(caller.credential.clone()),
                )
                .await
                .map_err(|e| status::from_propose(&e))?;
            tracing::info!(to, "leadership transferred");
        }
        Ok(Response::new(pb::MoveLeaderResponse {
            header: self.api.header(0),
        }))
    }

    async fn downgrade(
        &self,
        _req: Request<pb::DowngradeRequest>,
    ) -> Result<Response<pb::DowngradeResponse>, Status> {
        Err(Status::unimplemented(
            "etcdserver: raftkv does not take part in etcd cluster-version downgrades",
        ))
    }
}
