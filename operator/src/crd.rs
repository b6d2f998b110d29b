//! The `KVCluster` custom resource (`raftkv.io/v1alpha1`): what a user asks for, and what the
//! operator reports back in its status.

// Several `printcolumn(...)` entries share keys by design; clippy reads them as duplicates.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::api::core::v1::{
    Affinity, ResourceRequirements, Toleration, TopologySpreadConstraint,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;
use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A raftkv cluster: a Raft group of `replicas` members, each a pod with its own volume.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "raftkv.io",
    version = "v1alpha1",
    kind = "KVCluster",
    plural = "kvclusters",
    shortname = "kvc",
    namespaced,
    status = "KVClusterStatus",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(name = "Replicas", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(name = "Leader", type_ = "string", json_path = ".status.leader"),
    printcolumn(
        name = "Version",
        type_ = "string",
        json_path = ".status.currentVersion"
    ),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "A raftkv cluster"
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.restore) == has(oldSelf.restore)").message("restore can only be given when the cluster is created: a running cluster's members would refuse to start"))]
pub struct KVClusterSpec {
    /// Number of voting members: odd, 1 to 9. Changed one member at a time.
    #[x_kube(validation = Rule::new("self % 2 == 1").message("replicas must be odd (1, 3, 5, 7 or 9): an even count adds no fault tolerance"))]
    #[schemars(range(min = 1, max = 9))]
    pub replicas: i32,

    /// raftkv version; changing it rolls the members one at a time, followers first.
    #[schemars(length(min = 1, max = 64))]
    #[x_kube(validation = Rule::new("self.matches('^[0-9A-Za-z._-]+$')").message("version must be an image tag (letters, digits, '.', '_', '-')"))]
    pub version: String,

    /// Container image repository (the tag is `version`).
    #[serde(default = "default_image")]
    pub image: String,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<ResourceRequirements>,

    #[serde(default)]
    pub storage: StorageSpec,

    #[serde(default)]
    pub auth: AuthSpec,

    #[serde(default)]
    pub encryption: EncryptionSpec,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsSpec>,

    #[serde(default)]
    pub monitoring: MonitoringSpec,

    #[serde(default)]
    pub pod_disruption_budget: PodDisruptionBudgetSpec,

    /// Pod affinity; by default members prefer distinct nodes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,

    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub topology_spread_constraints: Option<Vec<TopologySpreadConstraint>>,

    #[serde(default)]
    pub raft: RaftSpec,
    /// Scheduled backups to an S3 bucket, with retention.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupScheduleSpec>,
    /// Form the cluster from a backup instead of empty. Read only while the cluster forms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[x_kube(validation = Rule::new("self == oldSelf").message("restore cannot change once set"))]
    pub restore: Option<RestoreSpec>,
}

/// Where a new cluster's first members take their data from.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RestoreSpec {
    /// A KVClusterBackup in this namespace that Succeeded. The keyring must hold the keys the
    /// backup's values are sealed with: set `encryption.keyringSecretName` to the source
    /// cluster's keyring Secret.
    pub backup: String,
}

fn default_image() -> String {
    "raftkv".into()
}

/// What happens to a member's volume when the cluster is deleted or scaled down.
#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum RetentionPolicy {
    /// Keep the volume (and its data).
    #[default]
    Retain,
    /// Delete the volume with the member.
    Delete,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct StorageSpec {
    /// Volume size per member, e.g. `1Gi`.
    #[serde(default = "default_size")]
    #[x_kube(validation = Rule::new("self.matches('^[0-9]+(\\\\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$')").message("size must be a quantity such as 512Mi or 10Gi"))]
    pub size: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub storage_class_name: Option<String>,
    /// Volumes of a deleted cluster.
    #[serde(default)]
    pub when_deleted: RetentionPolicy,
    /// Volumes of members removed by scaling down.
    #[serde(default)]
    pub when_scaled: RetentionPolicy,
}

fn default_size() -> String {
    "1Gi".into()
}

impl Default for StorageSpec {
    fn default() -> Self {
        StorageSpec {
            size: default_size(),
            storage_class_name: None,
            when_deleted: RetentionPolicy::Retain,
            when_scaled: RetentionPolicy::Delete,
        }
    }
}

#[derive(
    Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default, schemars::JsonSchema,
)]
pub enum JwtAlgorithm {
    #[default]
    HS256,
    RS256,
    ES256,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AuthSpec {
    /// HS256: a generated shared secret unless `secretName` names one (key `secret`).
    /// RS256/ES256: `secretName` must hold `public.pem` (verification) and `private.pem`
    /// (so the operator and Authenticate can sign tokens).
    #[serde(default)]
    pub algorithm: JwtAlgorithm,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_name: Option<String>,
    /// Required `iss` claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    /// Required `aud` claim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct EncryptionSpec {
    /// Encrypt values at rest with AES-256-GCM.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Secret with the keyring (key `keyring.json`); generated when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keyring_secret_name: Option<String>,
}

fn yes() -> bool {
    true
}

impl Default for EncryptionSpec {
    fn default() -> Self {
        EncryptionSpec {
            enabled: true,
            keyring_secret_name: None,
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TlsSpec {
    /// Secret (type kubernetes.io/tls, plus `ca.crt`) for the client port.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_name: Option<String>,
    /// Secret (`tls.crt`, `tls.key`, `ca.crt`) for the peer port, which always runs mutual
    /// TLS: one certificate for every member, valid for `*.<name>-peer.<namespace>.svc` as TLS
    /// server and client (a cert-manager Certificate's Secret fits). When absent, the operator
    /// generates a CA and a certificate for each member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub peer_secret_name: Option<String>,
    /// Require client certificates signed by the client Secret's `ca.crt`, and let a verified
    /// certificate's common name be the user when a request carries no token (etcd's
    /// `--client-cert-auth`; how kube-apiserver authenticates to its store). Needs
    /// `clientSecretName`, whose certificate the operator then presents as a client too (it
    /// must allow client authentication).
    #[serde(default)]
    pub client_cert_auth: bool,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MonitoringSpec {
    /// Create a Prometheus Operator ServiceMonitor (when its API is installed).
    #[serde(default)]
    pub service_monitor: bool,
    /// Labels for the ServiceMonitor (to match a Prometheus's selector).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    #[serde(default = "default_interval")]
    pub interval: String,
}

fn default_interval() -> String {
    "30s".into()
}

impl Default for MonitoringSpec {
    fn default() -> Self {
        MonitoringSpec {
            service_monitor: false,
            labels: BTreeMap::new(),
            interval: default_interval(),
        }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PodDisruptionBudgetSpec {
    /// A PodDisruptionBudget that lets at most `replicas - quorum` members be disrupted.
    #[serde(default = "yes")]
    pub enabled: bool,
}

impl Default for PodDisruptionBudgetSpec {
    fn default() -> Self {
        PodDisruptionBudgetSpec { enabled: true }
    }
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self.electionTimeoutMs >= 5 * self.heartbeatIntervalMs").message("electionTimeoutMs must be at least 5 heartbeatIntervalMs, or members would campaign between heartbeats (and refuse to start)"))]
pub struct RaftSpec {
    #[serde(default = "default_election")]
    #[x_kube(validation = Rule::new("self >= 100 && self <= 60000").message("electionTimeoutMs must be between 100 and 60000"))]
    pub election_timeout_ms: i64,
    #[serde(default = "default_heartbeat")]
    #[x_kube(validation = Rule::new("self >= 10 && self <= 10000").message("heartbeatIntervalMs must be between 10 and 10000"))]
    pub heartbeat_interval_ms: i64,
    /// Log entries between snapshots.
    #[serde(default = "default_snapshot")]
    #[x_kube(validation = Rule::new("self >= 100").message("snapshotThreshold must be at least 100"))]
    pub snapshot_threshold: i64,
}

fn default_election() -> i64 {
    1000
}
fn default_heartbeat() -> i64 {
    100
}
fn default_snapshot() -> i64 {
    100_000
}

impl Default for RaftSpec {
    fn default() -> Self {
        RaftSpec {
            election_timeout_ms: default_election(),
            heartbeat_interval_ms: default_heartbeat(),
            snapshot_threshold: default_snapshot(),
        }
    }
}

/// Backups taken on a schedule: each one is a `KVClusterBackup` the operator creates, keeping
/// the newest `keep` that succeeded (older ones, and their objects, are deleted).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupScheduleSpec {
    /// When, in cron syntax (five fields, UTC), e.g. `0 */6 * * *`, or `@hourly`, `@daily`.
    #[x_kube(validation = Rule::new("self.size() > 0").message("schedule must be set"))]
    pub schedule: String,
    /// How many successful scheduled backups to keep.
    #[serde(default = "default_keep")]
    #[x_kube(validation = Rule::new("self >= 1 && self <= 1000").message("keep must be between 1 and 1000"))]
    pub keep: i32,
    /// Take no new scheduled backups (the ones kept stay).
    #[serde(default)]
    pub suspend: bool,
    pub destination: BackupDestination,
}

fn default_keep() -> i32 {
    7
}

/// Where a backup goes: an S3 bucket, or a PersistentVolumeClaim.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("has(self.s3) != has(self.pvc)").message("destination must name exactly one of s3 or pvc"))]
pub struct BackupDestination {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub s3: Option<S3Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pvc: Option<PvcDestination>,
}

/// A PersistentVolumeClaim in the cluster's namespace. Each backup is written by a Job that
/// mounts the claim (so it must be mountable by one more pod: ReadWriteMany, or
/// ReadWriteOnce on the node the Job lands on); a restore mounts it read-only in the new
/// cluster's first members.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct PvcDestination {
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$')").message("claimName must be a PersistentVolumeClaim name"))]
    pub claim_name: String,
    /// Files are named `<prefix><namespace>/<cluster>/<backup>.rkvbackup` on the volume.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..') && self.matches('^[A-Za-z0-9_./-]*$')").message("prefix must be a relative path prefix: letters, digits and _./-, no leading '/' and no '..'"))]
    pub prefix: String,
}

/// An S3 bucket (AWS, or any server speaking the S3 API).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, KubeSchema)]
#[serde(rename_all = "camelCase")]
pub struct S3Destination {
    /// The S3 endpoint, e.g. `https://s3.eu-west-1.amazonaws.com` or `http://minio.backups:9000`.
    #[x_kube(validation = Rule::new("self.startsWith('http://') || self.startsWith('https://')").message("endpoint must be an http:// or https:// URL"))]
    pub endpoint: String,
    /// A bucket name as S3 allows it: 3–63 lowercase letters, digits, '.' and '-'.
    #[x_kube(validation = Rule::new("self.matches('^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$')").message("bucket must be an S3 bucket name: 3-63 lowercase letters, digits, '.' or '-'"))]
    pub bucket: String,
    /// Objects are named `<prefix><namespace>/<cluster>/<backup>.rkvbackup`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    #[x_kube(validation = Rule::new("!self.startsWith('/') && !self.contains('..') && self.matches('^[A-Za-z0-9!_.*()/-]*$')").message("prefix must be a relative key prefix: letters, digits and !_.*()/-, no leading '/' and no '..'"))]
    pub prefix: String,
    #[serde(default = "default_region")]
    pub region: String,
    /// Address the bucket as `<endpoint>/<bucket>` (most S3-compatible servers) rather than
    /// `<bucket>.<endpoint host>` (AWS's preferred form).
    #[serde(default = "yes")]
    pub path_style: bool,
    /// Secret with the keys `accessKeyId` and `secretAccessKey`.
    pub credentials_secret_name: String,
    /// Secret with `ca.crt` to trust for an endpoint with a private CA.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_secret_name: Option<String>,
}

fn default_region() -> String {
    "us-east-1".into()
}

/// What the schedule has done.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct BackupScheduleStatus {
    /// When the last scheduled backup was due (and created).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_schedule_time: Option<String>,
    /// The newest scheduled backup that succeeded, and when it completed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_successful_backup: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_success_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_schedule_time: Option<String>,
}

/// One backup of a KVCluster, taken once: the whole keyspace at one revision (with users,
/// roles and leases), streamed from a member through the public API into an S3 object and
/// checked against its SHA-256 on the way.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "raftkv.io",
    version = "v1alpha1",
    kind = "KVClusterBackup",
    plural = "kvclusterbackups",
    shortname = "kvcb",
    namespaced,
    status = "KVClusterBackupStatus",
    printcolumn(name = "Cluster", type_ = "string", json_path = ".spec.cluster"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Revision", type_ = "integer", json_path = ".status.revision"),
    printcolumn(name = "Size", type_ = "integer", json_path = ".status.sizeBytes"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    ),
    doc = "A backup of a raftkv cluster"
)]
#[serde(rename_all = "camelCase")]
#[x_kube(validation = Rule::new("self == oldSelf").message("a backup's spec cannot change; create another backup"))]
pub struct KVClusterBackupSpec {
    /// The KVCluster (in the same namespace) to back up.
    pub cluster: String,
    pub destination: BackupDestination,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KVClusterBackupStatus {
    /// Pending, Running, Succeeded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// Where the backup is: `s3://<bucket>/<key>`, or `pvc://<claim>/<path>`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location: Option<String>,
    /// The store revision the backup holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revision: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size_bytes: Option<i64>,
    /// SHA-256 of the whole object, as verified while it was uploaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<String>,
    /// Failed attempts so far (a backup is retried a few times with backoff).
    #[serde(default)]
    pub attempts: i32,
    /// When a failed backup is tried again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next_attempt_time: Option<String>,
}

/// One member as the operator last saw it.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// Raft member id (pod ordinal + 1). Signed because Kubernetes schemas know no uint64.
    pub id: i64,
    pub pod: String,
    /// `leader`, `follower` or `learner`.
    pub role: String,
    pub healthy: bool,
    pub applied_index: i64,
    /// The volume this member's data lives on; a new volume means the data was lost.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_uid: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Default, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct KVClusterStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Creating, Running, Scaling, Upgrading, Degraded or Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default)]
    pub conditions: Vec<Condition>,
    /// Members (pods) that exist.
    #[serde(default)]
    pub replicas: i32,
    #[serde(default)]
    pub ready_replicas: i32,
    #[serde(default)]
    pub members: Vec<MemberStatus>,
    /// Pod name of the leader.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub leader: Option<String>,
    /// The version every member runs (unset while a rollout is in progress).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_version: Option<String>,
    /// Label selector of the member pods (for the scale subresource).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Set once the cluster has formed: new members then join an existing cluster.
    #[serde(default)]
    pub bootstrapped: bool,
    /// What the backup schedule has done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup: Option<BackupScheduleStatus>,
}

/// The CRD as YAML (what `raftkv-operator crd` prints and `crds/` holds). Helm keeps it on
/// uninstall: deleting a CRD deletes every KVCluster, and with them the data.
pub fn crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let mut crd = KVCluster::crd();
    crd.metadata.annotations = Some(keep_on_uninstall());
    serde_yaml::to_string(&crd)
}

/// The KVClusterBackup CRD as YAML (`raftkv-operator crd --backup`, and `crds/`).
pub fn backup_crd_yaml() -> Result<String, serde_yaml::Error> {
    use kube::CustomResourceExt;
    let mut crd = KVClusterBackup::crd();
    crd.metadata.annotations = Some(keep_on_uninstall());
    serde_yaml::to_string(&crd)
}

fn keep_on_uninstall() -> BTreeMap<String, String> {
    BTreeMap::from([("helm.sh/resource-policy".to_string(), "keep".to_string())])
}
