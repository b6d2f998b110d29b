//! raftkv-operator: turns `KVCluster` resources into running raftkv clusters and changes them
//! (scaling, upgrades, member replacement) without losing quorum or data.

pub mod backup;
pub mod controller;
pub mod crd;
pub mod cron;
pub mod leader;
pub mod metrics;
pub mod plan;
pub mod raft;
pub mod resources;
/// The S3 client lives in the client library (kvctl uses it too).
pub use raftkv_client::s3;
pub mod telemetry;
pub mod volume;

/// Everything a reconcile can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("raftkv API: {0}")]
    Raft(#[from] raftkv_client::Error),
    #[error("secret {name}: {reason}")]
    Secret { name: String, reason: String },
    #[error("signing the operator's token: {0}")]
    Token(String),
    #[error("backup: {0}")]
    Backup(String),
    #[error("encoding {what}: {source}")]
    Encode {
        what: &'static str,
        source: serde_json::Error,
    },
}

impl Error {
    /// A short, stable label for metrics and condition reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Error::Kube(_) => "KubernetesApiError",
            Error::Raft(_) => "RaftkvApiError",
            Error::Secret { .. } => "SecretError",
            Error::Token(_) => "TokenError",
            Error::Encode { .. } => "EncodeError",
            Error::Backup(_) => "BackupError",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
