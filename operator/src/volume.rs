//! Backups on a PersistentVolumeClaim. The operator cannot mount a claim itself, so a Job of
//! the operator's own image does the writing: `raftkv-operator backup-save` streams the backup
//! from the members into the mounted claim (checked, synced, then renamed into place) and
//! reports what it wrote in its termination message; `raftkv-operator backup-delete` removes
//! one past retention. This module builds those Jobs, runs their two subcommands, and reads
//! their outcome back.

use crate::backup::Done;
use crate::crd::{KVClusterBackup, PvcDestination};
use crate::resources::secrets::CA_CERT_KEY;
use crate::resources::statefulset::{
    claim_volume, container_security, mount, pod_security, secret_volume,
};
use k8s_openapi::api::batch::v1::{Job, JobSpec};
use k8s_openapi::api::core::v1::*;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Component, Path, PathBuf};

/// Where a Job mounts the claim.
pub const MOUNT: &str = "/var/lib/raftkv-backups";
/// Where the members of a restored cluster mount the claim (read-only).
pub const RESTORE_MOUNT: &str = "/var/lib/raftkv-restore";
const TLS_MOUNT: &str = "/etc/raftkv/client-tls";
/// Kubernetes' default, and what the process kubelet of the e2e tests maps per pod too.
pub const TERMINATION_LOG: &str = "/dev/termination-log";
/// The environment variable the save Job reads its token from (a Secret, never an argument).
pub const TOKEN_ENV: &str = "RAFTKV_BACKUP_TOKEN";
pub const TOKEN_KEY: &str = "token";
/// How long one save Job may run.
pub const SAVE_DEADLINE_SECS: i64 = 3 * 3600;
/// How long a save Job's token lives: its deadline, and time for its pod to start.
pub const TOKEN_TTL: std::time::Duration =
    std::time::Duration::from_secs(SAVE_DEADLINE_SECS as u64 + 600);
const DELETE_DEADLINE_SECS: i64 = 600;
/// Kubernetes keeps at most 4096 bytes of a termination message.
const MESSAGE_LIMIT: usize = 3500;
pub const BACKUP_LABEL: &str = "raftkv.io/backup";

/// How the save Job reaches the cluster: the members' client URLs, the client TLS Secret the
/// spec names (mounted), and the name to verify the members' certificates against.
#[derive(Clone, Debug, PartialEq)]
pub struct JobConnection {
    pub endpoints: Vec<String>,
    pub tls_secret: Option<String>,
    pub domain: String,
}

/// What a Job reports in its termination message.
#[derive(Serialize, Deserialize, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Outcome {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default)]
    pub revision: i64,
    #[serde(default)]
    pub bytes: u64,
    #[serde(default)]
    pub sha256: String,
}

/// A Job name for `backup` doing `what` (attempt `n`), within the 63 characters a Job's
/// pods carry it in a label.
pub fn job_name(backup: &str, what: &str, n: i32) -> String {
    let suffix = format!("-{what}-{n}");
    let room = 63 - suffix.len();
    if backup.len() <= room {
        return format!("{backup}{suffix}");
    }
    use sha2::Digest;
    let h = hex::encode(&sha2::Sha256::digest(backup.as_bytes())[..4]);
    let cut: String = backup.chars().take(room - 9).collect();
    format!("{}-{h}{suffix}", cut.trim_end_matches(['-', '.']))
}

/// What differs between the save and the delete Job's pod.
struct JobPod {
    args: Vec<String>,
    env: Vec<EnvVar>,
    volumes: Vec<Volume>,
    mounts: Vec<VolumeMount>,
}

fn job(
    b: &KVClusterBackup,
    name: String,
    image: &str,
    pod: JobPod,
    dest: &PvcDestination,
    deadline: i64,
) -> Job {
    let JobPod {
        args,
        env,
        mut volumes,
        mut mounts,
    } = pod;
    volumes.push(claim_volume("backups", &dest.claim_name, false));
    mounts.push(mount("backups", MOUNT, false));
    let labels = BTreeMap::from([
        (BACKUP_LABEL.to_string(), b.name_any()),
        (
            crate::backup::CLUSTER_LABEL.to_string(),
            b.spec.cluster.clone(),
        ),
        (
            "app.kubernetes.io/managed-by".to_string(),
            crate::controller::MANAGER.to_string(),
        ),
    ]);
    Job {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: b.namespace(),
            labels: Some(labels.clone()),
            owner_references: b.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: Some(JobSpec {
            // Retries are the backup's own (counted in its status, with backoff).
            backoff_limit: Some(0),
            active_deadline_seconds: Some(deadline),
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(labels),
                    ..Default::default()
                }),
                spec: Some(PodSpec {
                    restart_policy: Some("Never".into()),
                    automount_service_account_token: Some(false),
                    security_context: Some(pod_security()),
                    containers: vec![Container {
                        name: "backup".into(),
                        image: Some(image.into()),
                        image_pull_policy: Some("IfNotPresent".into()),
                        args: Some(args),
                        env: Some(env),
                        volume_mounts: Some(mounts),
                        termination_message_path: Some(TERMINATION_LOG.into()),
                        termination_message_policy: Some("File".into()),
                        security_context: Some(container_security()),
                        ..Default::default()
                    }],
                    volumes: Some(volumes),
                    ..Default::default()
                }),
            },
            ..Default::default()
        }),
        status: None,
    }
}

/// The Job that writes backup `b` as `rel` on the claim (attempt `attempt`).
pub fn save_job(
    b: &KVClusterBackup,
    dest: &PvcDestination,
    rel: &str,
    image: &str,
    conn: &JobConnection,
    token_secret: &str,
    attempt: i32,
) -> Job {
    let mut args = vec!["backup-save".to_string()];
    for e in &conn.endpoints {
        args.extend(["--endpoint".into(), e.clone()]);
    }
    args.extend(["--file".into(), format!("{MOUNT}/{rel}")]);
    let mut volumes = Vec::new();
    let mut mounts = Vec::new();
    if let Some(secret) = &conn.tls_secret {
        volumes.push(secret_volume("client-tls", secret));
        mounts.push(mount("client-tls", TLS_MOUNT, true));
        args.extend([
            "--tls-dir".into(),
            TLS_MOUNT.into(),
            "--tls-domain".into(),
            conn.domain.clone(),
        ]);
    }
    let env = vec![EnvVar {
        name: TOKEN_ENV.into(),
        value_from: Some(EnvVarSource {
            secret_key_ref: Some(SecretKeySelector {
                name: token_secret.into(),
                key: TOKEN_KEY.into(),
                optional: Some(false),
            }),
            ..Default::default()
        }),
        ..Default::default()
    }];
    job(
        b,
        job_name(&b.name_any(), "save", attempt),
        image,
        JobPod {
            args,
            env,
            volumes,
            mounts,
        },
        dest,
        SAVE_DEADLINE_SECS,
    )
}

/// The Job that deletes backup `b`'s file `rel` from the claim.
pub fn delete_job(b: &KVClusterBackup, dest: &PvcDestination, rel: &str, image: &str) -> Job {
    job(
        b,
        job_name(&b.name_any(), "delete", 1),
        image,
        JobPod {
            args: vec![
                "backup-delete".into(),
                "--file".into(),
                format!("{MOUNT}/{rel}"),
            ],
            env: Vec::new(),
            volumes: Vec::new(),
            mounts: Vec::new(),
        },
        dest,
        DELETE_DEADLINE_SECS,
    )
}

/// Whether `job` was made for backup `b`: its controller is `b` itself, by UID. A Job of the
/// same name left by an earlier backup of that name (or made by someone else) is not `b`'s
/// outcome and gets no token.
pub fn made_for(job: &Job, b: &KVClusterBackup) -> bool {
    let uid = b.uid();
    uid.is_some()
        && job
            .metadata
            .owner_references
            .iter()
            .flatten()
            .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
}

/// Whether a Job has ended: `Some(true)` complete, `Some(false)` failed, `None` running.
pub fn finished(job: &Job) -> Option<bool> {
    let st = job.status.as_ref()?;
    for c in st.conditions.iter().flatten() {
        if c.status == "True" {
            match c.type_.as_str() {
                "Complete" => return Some(true),
                "Failed" => return Some(false),
                _ => {}
            }
        }
    }
    if st.succeeded.unwrap_or(0) > 0 {
        return Some(true);
    }
    None
}

/// Why a failed Job failed, as its own condition says (a deadline, a pod that never ran).
pub fn failure_reason(job: &Job) -> String {
    job.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| {
            cs.iter()
                .find(|c| c.type_ == "Failed" && c.status == "True")
        })
        .map(|c| {
            format!(
                "Job {} failed: {} {}",
                job.name_any(),
                c.reason.clone().unwrap_or_default(),
                c.message.clone().unwrap_or_default()
            )
            .trim()
            .to_string()
        })
        .unwrap_or_else(|| format!("Job {} failed", job.name_any()))
}

/// The termination message of a Job's pod, parsed.
pub fn outcome_of(pod: &Pod) -> Option<Outcome> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find_map(|c| c.state.as_ref()?.terminated.as_ref()?.message.clone())
        .and_then(|m| serde_json::from_str(m.trim()).ok())
}

/// A Job's outcome as a backup result.
pub(crate) fn done(outcome: Outcome, location: String) -> Result<Done, String> {
    match outcome.error {
        Some(e) => Err(e),
        None if outcome.sha256.len() == 64 => Ok(Done {
            location,
            revision: outcome.revision,
            bytes: outcome.bytes,
            sha256: outcome.sha256,
        }),
        None => Err("the backup Job reported no SHA-256".into()),
    }
}

// ---- the Jobs' side -------------------------------------------------------------------------

/// `raftkv-operator backup-save`: what the save Job runs.
#[derive(clap::Args, Debug)]
pub struct SaveArgs {
    /// A member's client URL (repeatable).
    #[arg(long = "endpoint", required = true)]
    pub endpoints: Vec<String>,
    /// The file to write (on the mounted claim); replaced only by a whole, checked backup.
    #[arg(long)]
    pub file: PathBuf,
    /// A directory with `ca.crt` and, for client certificates, `tls.crt` and `tls.key`.
    #[arg(long)]
    pub tls_dir: Option<PathBuf>,
    /// The name to verify the members' certificates against.
    #[arg(long)]
    pub tls_domain: Option<String>,
    /// Where the outcome goes (the container's termination message).
    #[arg(long, default_value = TERMINATION_LOG)]
    pub result: PathBuf,
}

/// `raftkv-operator backup-delete`: what the delete Job runs.
#[derive(clap::Args, Debug)]
pub struct DeleteArgs {
    #[arg(long)]
    pub file: PathBuf,
    #[arg(long, default_value = TERMINATION_LOG)]
    pub result: PathBuf,
}

/// Only `.rkvbackup` files under the claim's mount, named without `..`: a Job's arguments
/// come from the operator, but the check costs nothing and keeps a mistake from deleting
/// anything else on a shared volume.
fn check_path(file: &Path) -> Result<(), String> {
    let ok = file.starts_with(MOUNT)
        && file.extension().is_some_and(|e| e == "rkvbackup")
        && !file.components().any(|c| matches!(c, Component::ParentDir));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is not a backup file under {MOUNT}",
            file.display()
        ))
    }
}

/// The outcome as JSON within `MESSAGE_LIMIT` bytes (Kubernetes cuts a longer message, which
/// would then not parse): a long error is shortened until the encoded whole fits.
fn message(outcome: &Outcome) -> String {
    let mut text = serde_json::to_string(outcome).unwrap_or_default();
    let mut error: Vec<char> = outcome
        .error
        .as_deref()
        .unwrap_or_default()
        .chars()
        .collect();
    while text.len() > MESSAGE_LIMIT && !error.is_empty() {
        // Characters encode to 1-6 bytes (escapes, UTF-8): shrink in proportion, then again.
        let cut = (error.len() * (MESSAGE_LIMIT - 64) / text.len()).min(error.len() - 1);
        error.truncate(cut);
        let short = Outcome {
            error: Some(error.iter().collect()),
            ..Outcome::default_error()
        };
        text = serde_json::to_string(&short).unwrap_or_default();
    }
    text
}

fn report(result: &Path, outcome: &Outcome) {
    let text = message(outcome);
    if let Err(e) = std::fs::write(result, &text) {
        tracing::warn!(path = %result.display(), error = %e, "writing the termination message");
    }
    println!("{text}");
}

impl Outcome {
    fn default_error() -> Outcome {
        Outcome {
            error: None,
            revision: 0,
            bytes: 0,
            sha256: String::new(),
        }
    }
}

fn read_tls(dir: &Path, domain: Option<String>) -> Result<raftkv_client::TlsOptions, String> {
    let read = |name: &str| std::fs::read(dir.join(name)).ok();
    // As the operator itself: without a ca.crt the system roots verify the members.
    Ok(raftkv_client::TlsOptions {
        ca_pem: read(CA_CERT_KEY),
        identity_pem: read("tls.crt").zip(read("tls.key")),
        domain,
    })
}

/// Streams a backup into `args.file`; the outcome goes to the termination message, and the
/// exit status says whether it worked.
pub async fn save(args: SaveArgs) -> bool {
    let result = async {
        check_path(&args.file)?;
        let token = std::env::var(TOKEN_ENV)
            .map_err(|_| format!("{TOKEN_ENV} is not set"))?
            .trim()
            .to_string();
        let tls = match &args.tls_dir {
            Some(dir) => Some(read_tls(dir, args.tls_domain.clone())?),
            None => None,
        };
        if let Some(parent) = args.file.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("creating {}: {e}", parent.display()))?;
        }
        let cluster = crate::raft::Cluster::connect(args.endpoints.clone(), token, tls)
            .await
            .map_err(|e| format!("connecting to the cluster: {e}"))?;
        let info = cluster
            .client()
            .save_backup(&args.file)
            .await
            .map_err(|e| format!("saving the backup: {e}"))?;
        Ok::<_, String>(Outcome {
            error: None,
            revision: info.revision,
            bytes: info.bytes,
            sha256: info.sha256,
        })
    }
    .await;
    let outcome = result.unwrap_or_else(|e| Outcome {
        error: Some(e),
        ..Outcome::default_error()
    });
    report(&args.result, &outcome);
    outcome.error.is_none()
}

/// Deletes a backup file (gone already counts as deleted).
pub fn delete(args: DeleteArgs) -> bool {
    let result = check_path(&args.file).and_then(|_| match std::fs::remove_file(&args.file) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(format!("deleting {}: {e}", args.file.display())),
    });
    let outcome = Outcome {
        error: result.err(),
        ..Outcome::default_error()
    };
    report(&args.result, &outcome);
    outcome.error.is_none()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backup(name: &str) -> KVClusterBackup {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "raftkv.io/v1alpha1",
            "kind": "KVClusterBackup",
            "metadata": {"name": name, "namespace": "apps", "uid": "u-1"},
            "spec": {"cluster": "kv", "destination": {"pvc": {"claimName": "backups"}}},
        }))
        .unwrap()
    }

    fn dest() -> PvcDestination {
        PvcDestination {
            claim_name: "backups".into(),
            prefix: String::new(),
        }
    }

    #[test]
    fn job_names_fit_a_label_and_stay_distinct() {
        assert_eq!(
            job_name("kv-20261206-2300", "save", 1),
            "kv-20261206-2300-save-1"
        );
        let long = "a".repeat(80);
        let other = format!("{}b", "a".repeat(79));
        let (x, y) = (job_name(&long, "save", 3), job_name(&other, "save", 3));
        assert!(x.len() <= 63 && y.len() <= 63, "{x} {y}");
        assert_ne!(x, y);
        assert!(x.ends_with("-save-3"));
    }

    #[test]
    fn the_save_job_runs_once_restricted_with_its_token_from_a_secret() {
        let conn = JobConnection {
            endpoints: vec![
                "https://10.0.0.1:2379".into(),
                "https://10.0.0.2:2379".into(),
            ],
            tls_secret: Some("kv-client-tls".into()),
            domain: "kv-0.kv-peer.apps.svc".into(),
        };
        let j = save_job(
            &backup("kv-1"),
            &dest(),
            "apps/kv/kv-1.rkvbackup",
            "raftkv-operator:0.1.0",
            &conn,
            "kv-1-save-2-token",
            2,
        );
        assert_eq!(j.metadata.name.as_deref(), Some("kv-1-save-2"));
        assert_eq!(
            j.metadata.owner_references.as_ref().unwrap()[0].kind,
            "KVClusterBackup"
        );
        let spec = j.spec.unwrap();
        assert_eq!(spec.backoff_limit, Some(0));
        let pod = spec.template.spec.unwrap();
        assert_eq!(pod.restart_policy.as_deref(), Some("Never"));
        assert_eq!(pod.automount_service_account_token, Some(false));
        let c = &pod.containers[0];
        let args = c.args.clone().unwrap().join(" ");
        assert!(
            args.starts_with(
                "backup-save --endpoint https://10.0.0.1:2379 --endpoint https://10.0.0.2:2379"
            ),
            "{args}"
        );
        assert!(
            args.contains(&format!("--file {MOUNT}/apps/kv/kv-1.rkvbackup")),
            "{args}"
        );
        assert!(
            args.contains("--tls-domain kv-0.kv-peer.apps.svc"),
            "{args}"
        );
        // The token never appears in the arguments, only as a Secret reference.
        let env = &c.env.as_ref().unwrap()[0];
        assert_eq!(env.name, TOKEN_ENV);
        assert!(env.value.is_none());
        let claim = pod
            .volumes
            .unwrap()
            .into_iter()
            .find_map(|v| v.persistent_volume_claim)
            .unwrap();
        assert_eq!(claim.claim_name, "backups");
        assert_eq!(c.termination_message_path.as_deref(), Some(TERMINATION_LOG));
    }

    #[test]
    fn only_backup_files_under_the_mount_are_touched() {
        assert!(check_path(Path::new("/var/lib/raftkv-backups/apps/kv/kv-1.rkvbackup")).is_ok());
        for bad in [
            "/var/lib/raftkv-backups/../etc/passwd.rkvbackup",
            "/etc/kv-1.rkvbackup",
            "/var/lib/raftkv-backups/apps/kv/data.db",
        ] {
            assert!(check_path(Path::new(bad)).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_long_error_still_fits_the_termination_message_as_json() {
        let outcome = Outcome {
            error: Some("\u{1F4A5}\"\n".repeat(3000)),
            ..Outcome::default_error()
        };
        let text = message(&outcome);
        assert!(text.len() <= MESSAGE_LIMIT, "{}", text.len());
        let back: Outcome = serde_json::from_str(&text).unwrap();
        assert!(back.error.unwrap().starts_with('\u{1F4A5}'));
    }

    /// Whether `job` was made for `b` (its controller is this very backup, by UID).
    #[test]
    fn a_job_belongs_only_to_the_backup_that_made_it() {
        let b = backup("kv-1");
        let mine = save_job(
            &b,
            &dest(),
            "apps/kv/kv-1.rkvbackup",
            "i",
            &JobConnection {
                endpoints: vec!["http://10.0.0.1:2379".into()],
                tls_secret: None,
                domain: "d".into(),
            },
            "t",
            1,
        );
        assert!(made_for(&mine, &b));
        let mut other = mine.clone();
        other.metadata.owner_references = None;
        assert!(!made_for(&other, &b));
        let mut again = b.clone();
        again.metadata.uid = Some("u-2".into());
        assert!(
            !made_for(&mine, &again),
            "a re-created backup of the same name"
        );
    }

    #[test]
    fn a_job_outcome_becomes_the_backup_result() {
        let ok = Outcome {
            error: None,
            revision: 42,
            bytes: 4096,
            sha256: "a".repeat(64),
        };
        let d = done(ok, "pvc://backups/x".into()).unwrap();
        assert_eq!((d.revision, d.bytes), (42, 4096));
        let failed = Outcome {
            error: Some("saving the backup: permission denied".into()),
            ..Outcome::default_error()
        };
        assert_eq!(
            done(failed, String::new()).unwrap_err(),
            "saving the backup: permission denied"
        );
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "status": {"containerStatuses": [{"name": "backup", "image": "i", "imageID": "",
                "ready": false, "restartCount": 0,
                "state": {"terminated": {"exitCode": 0,
                    "message": "{\"revision\":7,\"bytes\":512,\"sha256\":\"ab\"}"}}}]}
        }))
        .unwrap();
        assert_eq!(outcome_of(&pod).unwrap().revision, 7);
        let job: Job = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kv-1-save-1"},
            "status": {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                "reason": "DeadlineExceeded", "message": "Job was active longer than specified deadline"}]}
        }))
        .unwrap();
        assert_eq!(finished(&job), Some(false));
        assert!(failure_reason(&job).contains("DeadlineExceeded"));
    }
}
