//! Backups: the `KVClusterBackup` controller, which streams one backup from a cluster through
//! the public API (`Maintenance.Snapshot`) into an S3 object, checking it on the way (or has a
//! Job write it to a PersistentVolumeClaim, see `volume`); and the
//! schedule a KVCluster's `spec.backup` asks for, which creates those objects when due and
//! deletes the ones past retention (with their S3 objects).

use crate::controller::{Context, MANAGER, apply_status, connect_cluster};
use crate::crd::{
    BackupDestination, BackupScheduleStatus, KVCluster, KVClusterBackup, KVClusterBackupSpec,
    KVClusterBackupStatus, KVClusterStatus, PvcDestination,
};
use crate::cron::Schedule;
use crate::volume;
use crate::{Error, Result};
use futures::StreamExt;
use k8s_openapi::api::batch::v1::Job;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType};
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use raftkv_client::s3::Bucket;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const CLUSTER_LABEL: &str = "raftkv.io/cluster";
pub const SCHEDULED_LABEL: &str = "raftkv.io/scheduled";
/// Attempts before a backup is marked Failed.
const MAX_ATTEMPTS: i32 = 3;
/// A member that sends no backup bytes for this long is given up on (and the attempt retried).
const STREAM_IDLE: Duration = Duration::from_secs(300);
/// A controller that was away catches up on at most one missed run within this window.
const CATCH_UP: Duration = Duration::from_secs(7 * 24 * 3600);

/// Runs the KVClusterBackup controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let api: Api<KVClusterBackup> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    // Each running backup holds a part (16-32 MiB) in memory: at most two at once.
    let jobs: Api<Job> = match &namespace {
        Some(ns) => Api::namespaced(ctx.client.clone(), ns),
        None => Api::all(ctx.client.clone()),
    };
    Controller::new(api, watcher::Config::default())
        // A backup written to a claim moves on when its Job ends.
        .owns(
            jobs,
            watcher::Config::default().labels(volume::BACKUP_LABEL),
        )
        .with_config(kube::runtime::controller::Config::default().concurrency(2))
        .graceful_shutdown_on(shutdown)
        .run(reconcile, error_policy, ctx)
        .for_each(|res| async move {
            if let Err(e) = res {
                tracing::debug!(error = %e, "backup reconcile loop");
            }
        })
        .await;
}

fn error_policy(b: Arc<KVClusterBackup>, err: &Error, _ctx: Arc<Context>) -> Action {
    tracing::warn!(backup = %b.name_any(), error = %err, "backup reconcile failed");
    Action::requeue(Duration::from_secs(30))
}

fn is_done(status: Option<&KVClusterBackupStatus>) -> bool {
    matches!(
        status.and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

async fn reconcile(b: Arc<KVClusterBackup>, ctx: Arc<Context>) -> Result<Action> {
    if is_done(b.status.as_ref()) || b.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let ns = b.namespace().unwrap_or_else(|| "default".into());
    // The watch cache may not yet hold this controller's own last status write (it is
    // re-queued by the event of its `Running` patch): decide on the object as it is now.
    let backups: Api<KVClusterBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let Some(b) = backups.get_opt(&b.name_any()).await? else {
        return Ok(Action::await_change());
    };
    if is_done(b.status.as_ref()) || b.meta().deletion_timestamp.is_some() {
        return Ok(Action::await_change());
    }
    let mut status = b.status.clone().unwrap_or_default();
    let on_volume = b.spec.destination.pvc.is_some();
    if status.phase.as_deref() == Some("Running") && !on_volume {
        // Reconciles of one object never overlap, so a backup found Running was cut off: the
        // operator restarted mid-upload. That counts as an attempt, or a crash loop would
        // retry it forever.
        status.attempts += 1;
        status.message = Some(format!(
            "attempt {} was interrupted (the operator stopped)",
            status.attempts
        ));
        if status.attempts >= MAX_ATTEMPTS {
            status.phase = Some("Failed".into());
            status.completion_time = Some(Timestamp::now().to_string());
            apply_status(&ctx.client, &b, &status).await?;
            return Ok(Action::await_change());
        }
        status.phase = Some("Pending".into());
        apply_status(&ctx.client, &b, &status).await?;
    }
    if let Some(wait) = status
        .next_attempt_time
        .as_deref()
        .and_then(|t| t.parse::<Timestamp>().ok())
        .and_then(|t| t.duration_since(Timestamp::now()).try_into().ok())
        .filter(|d: &Duration| !d.is_zero())
    {
        return Ok(Action::requeue(wait));
    }
    let clusters: Api<KVCluster> = Api::namespaced(ctx.client.clone(), &ns);
    let waiting = match clusters.get_opt(&b.spec.cluster).await? {
        None => Some(format!("KVCluster {:?} does not exist", b.spec.cluster)),
        Some(kvc) if !kvc.status.as_ref().is_some_and(|s| s.bootstrapped) => {
            Some(format!("KVCluster {:?} has not formed yet", b.spec.cluster))
        }
        Some(kvc) => {
            return attempt(&b, &kvc, &ctx, status).await;
        }
    };
    status.phase = Some("Pending".into());
    status.message = waiting;
    apply_status(&ctx.client, &b, &status).await?;
    Ok(Action::requeue(Duration::from_secs(15)))
}

/// One attempt at taking the backup; a failed attempt is retried with backoff, up to
/// `MAX_ATTEMPTS`, then the backup is Failed.
async fn attempt(
    b: &KVClusterBackup,
    kvc: &KVCluster,
    ctx: &Context,
    mut status: KVClusterBackupStatus,
) -> Result<Action> {
    let ns = b.namespace().unwrap_or_else(|| "default".into());
    let key = object_key(&b.spec.destination, &ns, &b.spec.cluster, &b.name_any());
    let (result, secs) = if let Some(pvc) = &b.spec.destination.pvc {
        // Written by a Job: this reconcile starts it or reads how it ended.
        match on_volume(b, kvc, ctx, &mut status, pvc, &key).await? {
            None => return Ok(Action::requeue(Duration::from_secs(10))),
            Some(result) => {
                let started = status
                    .start_time
                    .as_deref()
                    .and_then(|t| t.parse::<Timestamp>().ok())
                    .unwrap_or_else(Timestamp::now);
                let secs = Timestamp::now()
                    .duration_since(started)
                    .as_secs_f64()
                    .max(0.0);
                (result, secs)
            }
        }
    } else {
        status.phase = Some("Running".into());
        status.message = Some(format!(
            "streaming to {}",
            location(&b.spec.destination, &key)
        ));
        status.start_time = Some(Timestamp::now().to_string());
        status.next_attempt_time = None;
        apply_status(&ctx.client, b, &status).await?;
        let started = Instant::now();
        let result = take(b, kvc, ctx, &ns, &key).await;
        (result, started.elapsed().as_secs_f64())
    };
    // The Job that made this attempt goes once its outcome is in the status (not before: a
    // lost status write must not lose the outcome with it).
    let finished_job = b
        .spec
        .destination
        .pvc
        .as_ref()
        .map(|_| volume::job_name(&b.name_any(), "save", status.attempts + 1));
    let labels = [ns.as_str(), b.spec.cluster.as_str()];
    match result {
        Ok(done) => {
            ctx.metrics.backups.with_label_values(&["succeeded"]).inc();
            ctx.metrics.backup_duration.observe(secs);
            ctx.metrics
                .backup_last_success
                .with_label_values(&labels)
                .set(Timestamp::now().as_second() as f64);
            ctx.metrics
                .backup_last_size
                .with_label_values(&labels)
                .set(done.bytes as f64);
            status.phase = Some("Succeeded".into());
            status.message = Some(format!(
                "{} bytes at revision {} in {secs:.1}s",
                done.bytes, done.revision
            ));
            status.location = Some(done.location.clone());
            status.revision = Some(done.revision);
            status.size_bytes = Some(done.bytes as i64);
            status.sha256 = Some(done.sha256);
            status.completion_time = Some(Timestamp::now().to_string());
            apply_status(&ctx.client, b, &status).await?;
            remove_job(ctx, b, &ns, finished_job.as_deref()).await;
            publish(
                ctx,
                b,
                EventType::Normal,
                "BackupSucceeded",
                format!(
                    "{} bytes at revision {} to {}",
                    done.bytes, done.revision, done.location
                ),
            )
            .await;
            Ok(Action::await_change())
        }
        Err(why) => {
            ctx.metrics.backups.with_label_values(&["failed"]).inc();
            status.attempts += 1;
            let last = status.attempts >= MAX_ATTEMPTS;
            status.phase = Some(if last { "Failed" } else { "Pending" }.into());
            status.message = Some(format!("attempt {}: {why}", status.attempts));
            let backoff = Duration::from_secs(15 << status.attempts.clamp(0, 6));
            if last {
                status.completion_time = Some(Timestamp::now().to_string());
                status.next_attempt_time = None;
            } else {
                // Kept in the status, so the re-queue our own patch triggers waits too.
                status.next_attempt_time = Timestamp::now()
                    .checked_add(backoff)
                    .ok()
                    .map(|t| t.to_string());
            }
            apply_status(&ctx.client, b, &status).await?;
            remove_job(ctx, b, &ns, finished_job.as_deref()).await;
            publish(ctx, b, EventType::Warning, "BackupFailed", why.clone()).await;
            tracing::warn!(backup = %b.name_any(), attempt = status.attempts, error = %why, "backup failed");
            Ok(if last {
                Action::await_change()
            } else {
                Action::requeue(backoff)
            })
        }
    }
}

#[derive(Debug)]
pub(crate) struct Done {
    pub location: String,
    pub revision: i64,
    pub bytes: u64,
    pub sha256: String,
}

/// One step of a backup written to a claim by a Job: starts the attempt's Job (with a token
/// Secret of its own) when there is none, and once the Job has ended returns its result.
/// `None` while it runs.
async fn on_volume(
    b: &KVClusterBackup,
    kvc: &KVCluster,
    ctx: &Context,
    status: &mut KVClusterBackupStatus,
    dest: &PvcDestination,
    rel: &str,
) -> Result<Option<Result<Done, String>>> {
    let ns = b.namespace().unwrap_or_else(|| "default".into());
    let attempt = status.attempts + 1;
    let name = volume::job_name(&b.name_any(), "save", attempt);
    let token_secret = format!("{name}-token");
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), &ns);
    let secrets: Api<Secret> = Api::namespaced(ctx.client.clone(), &ns);
    let location = location(&b.spec.destination, rel);
    let found = jobs.get_opt(&name).await?;
    if let Some(j) = &found
        && !volume::made_for(j, b)
    {
        return Ok(Some(Err(format!(
            "a Job named {name} exists that this backup did not make (left by an earlier backup of the same name?); retrying once it is gone"
        ))));
    }
    let Some(job) = found else {
        let claims: Api<PersistentVolumeClaim> = Api::namespaced(ctx.client.clone(), &ns);
        if claims.get_opt(&dest.claim_name).await?.is_none() {
            return Ok(Some(Err(format!(
                "the PersistentVolumeClaim {:?} does not exist in namespace {ns}",
                dest.claim_name
            ))));
        }
        let conn = match crate::controller::job_connection(kvc, ctx, volume::TOKEN_TTL).await {
            Ok(Some(c)) => c,
            Ok(None) => return Ok(Some(Err("the cluster has no running members".into()))),
            Err(e) => return Ok(Some(Err(format!("connecting to the cluster: {e}")))),
        };
        let job = volume::save_job(
            b,
            dest,
            rel,
            &ctx.job_image,
            &conn.job,
            &token_secret,
            attempt,
        );
        let job = match jobs.create(&PostParams::default(), &job).await {
            Ok(j) => j,
            Err(kube::Error::Api(e)) if e.code == 409 => {
                let j = jobs.get(&name).await?;
                if !volume::made_for(&j, b) {
                    return Ok(Some(Err(format!(
                        "a Job named {name} exists that this backup did not make"
                    ))));
                }
                j
            }
            Err(e) => return Err(e.into()),
        };
        ensure_token(&secrets, &job, &token_secret, conn.token).await?;
        status.phase = Some("Running".into());
        status.message = Some(format!("Job {name} is writing {location}"));
        status.start_time = Some(Timestamp::now().to_string());
        status.next_attempt_time = None;
        apply_status(&ctx.client, b, status).await?;
        return Ok(None);
    };
    let Some(ok) = volume::finished(&job) else {
        // An operator stopped between creating the Job and its token leaves a Job waiting
        // for it: give it one.
        if secrets.get_opt(&token_secret).await?.is_none()
            && let Ok(Some(access)) =
                crate::controller::job_connection(kvc, ctx, volume::TOKEN_TTL).await
        {
            ensure_token(&secrets, &job, &token_secret, access.token).await?;
        }
        return Ok(None);
    };
    let pods: Api<Pod> = Api::namespaced(ctx.client.clone(), &ns);
    let outcome = pods
        .list(&ListParams::default().labels(&format!("job-name={name}")))
        .await?
        .items
        .iter()
        .find_map(volume::outcome_of);
    // A failed Job's own message says more than the Job's condition, when it wrote one.
    Ok(Some(match outcome {
        Some(o) if ok || o.error.is_some() => volume::done(o, location),
        None if ok => Err(format!("Job {name} ended without reporting its backup")),
        _ => Err(volume::failure_reason(&job)),
    }))
}

/// Streams the backup into the object, part by part, and completes the upload only once the
/// stream verified whole; otherwise the upload is aborted and nothing is left under the key.
async fn take(
    b: &KVClusterBackup,
    kvc: &KVCluster,
    ctx: &Context,
    ns: &str,
    key: &str,
) -> Result<Done, String> {
    let bucket = open_bucket(&ctx.client, ns, &b.spec.destination).await?;
    let cluster = connect_cluster(kvc, ctx)
        .await
        .map_err(|e| format!("connecting to the cluster: {e}"))?
        .ok_or("the cluster has no running members")?;
    let mut stream = cluster
        .client()
        .backup_stream()
        .await
        .map_err(|e| format!("starting the backup: {e}"))?;
    let info = bucket.upload_backup(key, &mut stream, STREAM_IDLE).await?;
    Ok(Done {
        location: bucket.location(key),
        revision: info.revision,
        bytes: info.bytes,
        sha256: info.sha256,
    })
}

/// `<prefix><namespace>/<cluster>/<backup>.rkvbackup`: the object's key in the bucket, or
/// the file's path on the claim.
pub fn object_key(dest: &BackupDestination, ns: &str, cluster: &str, backup: &str) -> String {
    let prefix = match (&dest.s3, &dest.pvc) {
        (Some(s3), _) => s3.prefix.as_str(),
        (None, Some(pvc)) => pvc.prefix.as_str(),
        (None, None) => "",
    };
    format!("{prefix}{ns}/{cluster}/{backup}.rkvbackup")
}

fn location(dest: &BackupDestination, key: &str) -> String {
    match (&dest.s3, &dest.pvc) {
        (Some(s3), _) => format!("s3://{}/{key}", s3.bucket),
        (None, Some(pvc)) => format!("pvc://{}/{key}", pvc.claim_name),
        (None, None) => key.to_string(),
    }
}

/// The bucket a destination names, with credentials (and CA) from its Secrets.
pub async fn open_bucket(
    client: &kube::Client,
    ns: &str,
    dest: &BackupDestination,
) -> Result<Bucket, String> {
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s3 = dest
        .s3
        .as_ref()
        .ok_or("the destination is not an S3 bucket")?;
    let creds = secrets
        .get(&s3.credentials_secret_name)
        .await
        .map_err(|e| {
            format!(
                "the credentials Secret {:?}: {e}",
                s3.credentials_secret_name
            )
        })?;
    let field = |s: &Secret, k: &str| {
        s.data
            .as_ref()
            .and_then(|d| d.get(k))
            .map(|v| String::from_utf8_lossy(&v.0).trim().to_string())
    };
    let access = field(&creds, "accessKeyId").ok_or_else(|| {
        format!(
            "the Secret {:?} has no accessKeyId",
            s3.credentials_secret_name
        )
    })?;
    let secret = field(&creds, "secretAccessKey").ok_or_else(|| {
        format!(
            "the Secret {:?} has no secretAccessKey",
            s3.credentials_secret_name
        )
    })?;
    let ca = match &s3.ca_secret_name {
        None => None,
        Some(name) => {
            let s = secrets
                .get(name)
                .await
                .map_err(|e| format!("the CA Secret {name:?}: {e}"))?;
            Some(
                s.data
                    .as_ref()
                    .and_then(|d| d.get("ca.crt"))
                    .map(|v| v.0.clone())
                    .ok_or_else(|| format!("the Secret {name:?} has no ca.crt"))?,
            )
        }
    };
    Bucket::new(
        &s3.endpoint,
        &s3.bucket,
        &s3.region,
        s3.path_style,
        &access,
        &secret,
        ca.as_deref(),
    )
    .map_err(|e| e.to_string())
}

async fn publish(ctx: &Context, b: &KVClusterBackup, type_: EventType, reason: &str, note: String) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: "Backup".into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &b.object_ref(&())).await {
        tracing::debug!(error = %e, "publishing an event");
    }
}

/// The schedule's part of a KVCluster reconcile: creates the backup that is due, deletes the
/// ones past retention, records it all in `status.backup`, and says how long until the next
/// run is due.
pub async fn schedule(
    kvc: &KVCluster,
    ctx: &Context,
    status: &mut KVClusterStatus,
) -> Result<Option<Duration>> {
    let Some(spec) = &kvc.spec.backup else {
        status.backup = None;
        status
            .conditions
            .retain(|c| c.type_ != "BackupScheduled" && c.type_ != LAST_BACKUP);
        return Ok(None);
    };
    let ns = kvc.namespace().unwrap_or_else(|| "default".into());
    let name = kvc.name_any();
    let sched: Schedule = match spec.schedule.parse() {
        Ok(s) => s,
        Err(why) => {
            crate::controller::set_condition(
                status,
                "BackupScheduled",
                false,
                "InvalidSchedule",
                &why,
                kvc.meta().generation,
            );
            return Ok(None);
        }
    };
    let now = Timestamp::now();
    let mut st = status.backup.clone().unwrap_or_default();
    let created = kvc
        .meta()
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(now);
    let floor = now.checked_sub(CATCH_UP).unwrap_or(now);
    let anchor = st
        .last_schedule_time
        .as_deref()
        .and_then(|t| t.parse::<Timestamp>().ok())
        .unwrap_or(created)
        .max(floor);
    let api: Api<KVClusterBackup> = Api::namespaced(ctx.client.clone(), &ns);
    let lp =
        ListParams::default().labels(&format!("{CLUSTER_LABEL}={name},{SCHEDULED_LABEL}=true"));
    let mut scheduled = api.list(&lp).await?.items;
    // Names carry the due time: newest first.
    scheduled.sort_by_key(|b| std::cmp::Reverse(b.name_any()));
    // As a CronJob with `concurrencyPolicy: Forbid`, but the run missed meanwhile is caught up
    // once the one in flight ends (last_schedule_time stays put until then).
    let in_flight = scheduled
        .iter()
        .find(|b| !is_done(b.status.as_ref()))
        .map(|b| b.name_any());
    let formed = status.bootstrapped;
    if formed
        && !spec.suspend
        && let Some(due) = sched.last_at_or_before(anchor, now)
        && in_flight.is_none()
    {
        let backup_name = format!("{name}-{}", due.strftime("%Y%m%d-%H%M"));
        let backup = KVClusterBackup {
            metadata: ObjectMeta {
                name: Some(backup_name.clone()),
                namespace: Some(ns.clone()),
                labels: Some(BTreeMap::from([
                    (CLUSTER_LABEL.to_string(), name.clone()),
                    (SCHEDULED_LABEL.to_string(), "true".to_string()),
                    (
                        "app.kubernetes.io/managed-by".to_string(),
                        MANAGER.to_string(),
                    ),
                ])),
                ..Default::default()
            },
            spec: KVClusterBackupSpec {
                cluster: name.clone(),
                destination: spec.destination.clone(),
            },
            status: None,
        };
        api.patch(
            &backup_name,
            &PatchParams::apply(MANAGER),
            &Patch::Apply(&backup),
        )
        .await?;
        st.last_schedule_time = Some(due.to_string());
        ctx.metrics
            .steps
            .with_label_values(&["ScheduleBackup"])
            .inc();
        tracing::info!(cluster = %name, backup = %backup_name, "scheduled a backup");
    }
    let next = if spec.suspend {
        None
    } else {
        let from = st
            .last_schedule_time
            .as_deref()
            .and_then(|t| t.parse::<Timestamp>().ok())
            .map_or(now, |t| t.max(now));
        sched.next_after(from)
    };
    st.next_schedule_time = next.map(|t| t.to_string());
    if let Some(n) = next
        && let Some(after) = sched.next_after(n)
    {
        let interval = after.duration_since(n).as_secs_f64();
        ctx.metrics
            .backup_interval
            .with_label_values(&[ns.as_str(), name.as_str()])
            .set(interval);
    }
    prune(&api, ctx, &ns, &name, spec.keep, &scheduled, &mut st).await?;
    if let Some(outcome) = outcome(&scheduled) {
        crate::controller::set_condition(
            status,
            LAST_BACKUP,
            outcome.succeeded,
            outcome.reason,
            &outcome.message,
            kvc.meta().generation,
        );
    }
    if let Some(t) = st
        .last_success_time
        .as_deref()
        .and_then(|t| t.parse::<Timestamp>().ok())
    {
        // After a restart this brings the gauge back; an on-demand backup since then may
        // already have moved it later, and it never goes back.
        let gauge = ctx
            .metrics
            .backup_last_success
            .with_label_values(&[ns.as_str(), name.as_str()]);
        gauge.set(gauge.get().max(t.as_second() as f64));
    }
    crate::controller::set_condition(
        status,
        "BackupScheduled",
        !spec.suspend,
        if spec.suspend {
            "Suspended"
        } else {
            "Scheduled"
        },
        &match &st.next_schedule_time {
            Some(t) if formed && let Some(b) = &in_flight => {
                format!("next backup at {t}, once {b} has ended")
            }
            Some(t) if formed => format!("next backup at {t}"),
            Some(t) => format!("next backup at {t}, once the cluster has formed"),
            None => "no backup is scheduled".into(),
        },
        kvc.meta().generation,
    );
    status.backup = Some(st);
    Ok(next.map(|n| Duration::from_secs_f64(n.duration_since(now).as_secs_f64().max(1.0))))
}

/// Deletes a finished save Job of `b`'s (never one it did not make); its pod and its token
/// Secret (owned by it) go with it.
async fn remove_job(ctx: &Context, b: &KVClusterBackup, ns: &str, name: Option<&str>) {
    let Some(name) = name else { return };
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    match jobs.get_opt(name).await {
        Ok(Some(j)) if volume::made_for(&j, b) => {}
        _ => return,
    }
    if let Err(e) = jobs.delete(name, &DeleteParams::background()).await
        && !matches!(&e, kube::Error::Api(s) if s.code == 404)
    {
        tracing::warn!(job = %name, error = %e, "deleting a finished backup Job");
    }
}

/// The Secret with a save Job's root token, owned by the Job so it goes when the Job does.
async fn ensure_token(secrets: &Api<Secret>, job: &Job, name: &str, token: String) -> Result<()> {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some(name.to_string()),
            namespace: job.namespace(),
            owner_references: job.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        string_data: Some(BTreeMap::from([(volume::TOKEN_KEY.to_string(), token)])),
        ..Default::default()
    };
    match secrets.create(&PostParams::default(), &secret).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Deletes a backup's object or file (if it made one), then the backup; `false` while a
/// file's deletion is still under way.
async fn delete_backup(
    api: &Api<KVClusterBackup>,
    ctx: &Context,
    ns: &str,
    old: &KVClusterBackup,
    has_object: bool,
) -> Result<bool, String> {
    if has_object {
        let key = object_key(
            &old.spec.destination,
            ns,
            &old.spec.cluster,
            &old.name_any(),
        );
        if let Some(pvc) = &old.spec.destination.pvc {
            if !delete_file(ctx, ns, old, pvc, &key).await? {
                return Ok(false);
            }
        } else {
            let bucket = open_bucket(&ctx.client, ns, &old.spec.destination).await?;
            bucket
                .delete_object(&key)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    match api.delete(&old.name_any(), &DeleteParams::default()).await {
        Ok(_) => Ok(true),
        Err(kube::Error::Api(s)) if s.code == 404 => Ok(true),
        Err(e) => Err(e.to_string()),
    }
}

/// Deletes a backup's file from its claim with a Job: `true` once it is gone, `false` while
/// the Job runs. A failed Job is started again on a later pass.
async fn delete_file(
    ctx: &Context,
    ns: &str,
    old: &KVClusterBackup,
    dest: &PvcDestination,
    rel: &str,
) -> Result<bool, String> {
    let jobs: Api<Job> = Api::namespaced(ctx.client.clone(), ns);
    let job = volume::delete_job(old, dest, rel, &ctx.job_image);
    let name = job.metadata.name.clone().unwrap_or_default();
    match jobs.get_opt(&name).await.map_err(|e| e.to_string())? {
        None => {
            jobs.create(&PostParams::default(), &job)
                .await
                .map_err(|e| format!("creating Job {name}: {e}"))?;
            Ok(false)
        }
        Some(j) => match volume::finished(&j) {
            None => Ok(false),
            Some(true) => Ok(true),
            Some(false) => {
                let why = volume::failure_reason(&j);
                let dp = DeleteParams::background();
                jobs.delete(&name, &dp).await.map_err(|e| e.to_string())?;
                Err(why)
            }
        },
    }
}

/// The condition on a KVCluster that says whether its newest scheduled backup worked, so a
/// failing destination shows on the cluster itself (`kubectl get kvcluster -o yaml`, alerts on
/// conditions) and not only on a backup object nobody looks at.
const LAST_BACKUP: &str = "LastBackupSucceeded";

/// How the newest scheduled backup that has run at least once ended, or is retrying.
#[derive(Debug, PartialEq)]
struct Outcome {
    succeeded: bool,
    reason: &'static str,
    message: String,
}

fn outcome(newest_first: &[KVClusterBackup]) -> Option<Outcome> {
    newest_first.iter().find_map(|b| {
        let st = b.status.as_ref()?;
        let message = format!(
            "{}: {}",
            b.name_any(),
            st.message.clone().unwrap_or_default()
        );
        match st.phase.as_deref() {
            Some("Succeeded") => Some(Outcome {
                succeeded: true,
                reason: "Succeeded",
                message,
            }),
            Some("Failed") => Some(Outcome {
                succeeded: false,
                reason: "Failed",
                message,
            }),
            Some("Pending") if st.attempts > 0 => Some(Outcome {
                succeeded: false,
                reason: "Retrying",
                message,
            }),
            _ => None,
        }
    })
}

/// Keeps the newest `keep` successful scheduled backups (and as many failed ones), deleting
/// older ones with their objects; records the newest success.
async fn prune(
    api: &Api<KVClusterBackup>,
    ctx: &Context,
    ns: &str,
    cluster: &str,
    keep: i32,
    all: &[KVClusterBackup],
    st: &mut BackupScheduleStatus,
) -> Result<()> {
    let phase = |b: &KVClusterBackup| {
        b.status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default()
    };
    // A backup a cluster in this namespace is (or will be) restored from stays, whatever its age.
    let clusters: Api<KVCluster> = Api::namespaced(ctx.client.clone(), ns);
    let restoring: Vec<String> = clusters
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .filter_map(|c| c.spec.restore.map(|r| r.backup))
        .collect();
    let succeeded: Vec<&KVClusterBackup> = all.iter().filter(|b| phase(b) == "Succeeded").collect();
    let failed: Vec<&KVClusterBackup> = all.iter().filter(|b| phase(b) == "Failed").collect();
    if let Some(newest) = succeeded.first() {
        st.last_successful_backup = Some(newest.name_any());
        st.last_success_time = newest
            .status
            .as_ref()
            .and_then(|s| s.completion_time.clone());
    }
    let keep = keep.max(1) as usize;
    for old in succeeded.iter().skip(keep).chain(failed.iter().skip(keep)) {
        let old: &KVClusterBackup = old;
        if restoring.contains(&old.name_any()) {
            continue;
        }
        // One backup that cannot be deleted (its credentials Secret gone, the bucket down)
        // must not stop retention for the others, nor the status being written.
        match delete_backup(api, ctx, ns, old, phase(old) == "Succeeded").await {
            Err(why) => {
                tracing::warn!(cluster, backup = %old.name_any(), error = %why, "deleting a backup past retention");
            }
            Ok(false) => {
                tracing::debug!(cluster, backup = %old.name_any(), "deleting a backup past retention: its file is being deleted");
            }
            Ok(true) => {
                tracing::info!(cluster, backup = %old.name_any(), "deleted a backup past retention");
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(name: &str, status: serde_json::Value) -> KVClusterBackup {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "raftkv.io/v1alpha1",
            "kind": "KVClusterBackup",
            "metadata": {"name": name, "namespace": "apps"},
            "spec": {"cluster": "kv", "destination": {"s3": {
                "endpoint": "https://s3.example", "bucket": "b", "credentialsSecretName": "c"}}},
            "status": status,
        }))
        .unwrap()
    }

    #[test]
    fn the_newest_backup_that_ran_decides_the_condition() {
        let just_created = backup("kv-3", serde_json::json!({"phase": "Pending"}));
        let retrying = backup(
            "kv-2",
            serde_json::json!({"phase": "Pending", "attempts": 1, "message": "attempt 1: 403"}),
        );
        let ok = backup("kv-1", serde_json::json!({"phase": "Succeeded"}));
        let got = outcome(&[just_created.clone(), retrying, ok.clone()]).unwrap();
        assert_eq!(
            (got.succeeded, got.reason, got.message.as_str()),
            (false, "Retrying", "kv-2: attempt 1: 403")
        );
        assert!(outcome(&[just_created.clone(), ok]).unwrap().succeeded);
        let failed = backup("kv-0", serde_json::json!({"phase": "Failed"}));
        assert_eq!(outcome(&[failed]).unwrap().reason, "Failed");
        assert_eq!(outcome(&[just_created]), None);
    }
}
