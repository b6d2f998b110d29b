//! Who this data directory belongs to, and whether this member must create the cluster.
//!
//! A data directory records its cluster and member id the first time it is used; starting it
//! for another cluster or member is refused. Exactly one member of a new cluster (the one with
//! the lowest id in `--initial-cluster`) initializes it, once: a restarted member never does.

use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

const IDENTITY_FILE: &str = "raftkv-identity.json";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Identity {
    pub cluster_id: u64,
    pub cluster_token: String,
    pub member_id: u64,
    /// Set once this member has initialized the cluster (only the initializing member).
    #[serde(default)]
    pub initialized: bool,
    /// Set once the initial root user has been created (only the initializing member).
    #[serde(default)]
    pub root_seeded: bool,
    /// For a member restored from a backup: the backup's SHA-256. It is part of the cluster
    /// id, so a member that was not restored from the same backup is refused by the others
    /// (it would apply the new cluster's log to an empty state).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restored_from: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error(
        "data directory {dir} belongs to cluster {found_cluster:x} (token {found_token:?}) as member {found_member}, \
         but this node was started for cluster {want_cluster:x} (token {want_token:?}) as member {want_member}; \
         start it with its own --data-dir (or an empty one to join as a new member)"
    )]
    Mismatch {
        dir: String,
        found_cluster: u64,
        found_token: String,
        found_member: u64,
        want_cluster: u64,
        want_token: String,
        want_member: u64,
    },
    #[error(
        "data directory {0} holds a database but no raftkv identity; refusing to use data raftkv did not create"
    )]
    Foreign(String),
    #[error("data directory {0} is not empty; a backup is restored only into a new, empty one")]
    NotEmpty(String),
    #[error("data directory {dir}: {source}")]
    Io { dir: String, source: std::io::Error },
    #[error("data directory {dir}: identity file is unreadable: {reason}")]
    Corrupt { dir: String, reason: String },
}

/// The cluster id for a cluster token: every member derives the same one.
pub fn cluster_id(token: &str) -> u64 {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(format!("raftkv-cluster:{token}").as_bytes());
    let mut b = [0u8; 8];
    b.copy_from_slice(&d[..8]);
    u64::from_be_bytes(b) >> 1
}

/// The cluster id of a cluster token whose members were restored from the backup `digest`.
pub fn restored_cluster_id(token: &str, digest: &str) -> u64 {
    cluster_id(&format!("{token}\nrestored-from:{digest}"))
}

/// The cluster id an identity's members share.
fn expected_cluster_id(token: &str, restored_from: Option<&str>) -> u64 {
    match restored_from {
        Some(d) => restored_cluster_id(token, d),
        None => cluster_id(token),
    }
}

pub struct DataDir {
    pub path: PathBuf,
    pub identity: Identity,
    /// True if this start created the identity (a fresh data directory).
    pub fresh: bool,
}

impl DataDir {
    /// Opens `path` for `member_id` of the cluster named `token`, refusing another cluster's or
    /// member's data.
    pub fn claim(path: &Path, token: &str, member_id: u64) -> Result<DataDir, IdentityError> {
        let dir = path.display().to_string();
        let io = |source| IdentityError::Io {
            dir: dir.clone(),
            source,
        };
        std::fs::create_dir_all(path).map_err(io)?;
        let file = path.join(IDENTITY_FILE);
        let mut want_cluster = cluster_id(token);
        match std::fs::read_to_string(&file) {
            Ok(text) => {
                let found: Identity =
                    serde_json::from_str(&text).map_err(|e| IdentityError::Corrupt {
                        dir: dir.clone(),
                        reason: e.to_string(),
                    })?;
                want_cluster = expected_cluster_id(token, found.restored_from.as_deref());
                if found.cluster_id != want_cluster || found.member_id != member_id {
                    return Err(IdentityError::Mismatch {
                        dir,
                        found_cluster: found.cluster_id,
                        found_token: found.cluster_token,
                        found_member: found.member_id,
                        want_cluster,
                        want_token: token.to_string(),
                        want_member: member_id,
                    });
                }
                Ok(DataDir {
                    path: path.to_path_buf(),
                    identity: found,
                    fresh: false,
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if path.join("db").join("CURRENT").exists() {
                    return Err(IdentityError::Foreign(dir));
                }
                let identity = Identity {
                    cluster_id: want_cluster,
                    cluster_token: token.to_string(),
                    member_id,
                    initialized: false,
                    root_seeded: false,
                    restored_from: None,
                };
                let d = DataDir {
                    path: path.to_path_buf(),
                    identity,
                    fresh: true,
                };
                d.save()?;
                Ok(d)
            }
            Err(e) => Err(io(e)),
        }
    }

    /// The identity recorded in `path`, if it holds one that parses; read without claiming.
    pub fn recorded(path: &Path) -> Option<Identity> {
        let text = std::fs::read_to_string(path.join(IDENTITY_FILE)).ok()?;
        serde_json::from_str(&text).ok()
    }

    /// Marks `path`, which holds a database seeded from the backup with SHA-256 `digest`, as
    /// the data directory of member `member_id` of a new cluster. The backup brings its users,
    /// so no initial root user is created. Written last by a restore: a directory without it
    /// is never taken for a member's.
    pub fn mark_restored(
        path: &Path,
        token: &str,
        member_id: u64,
        digest: &str,
    ) -> Result<DataDir, IdentityError> {
        let d = DataDir {
            path: path.to_path_buf(),
            identity: Identity {
                cluster_id: restored_cluster_id(token, digest),
                cluster_token: token.to_string(),
                member_id,
                initialized: false,
                root_seeded: true,
                restored_from: Some(digest.to_string()),
            },
            fresh: true,
        };
        d.save()?;
        Ok(d)
    }

    pub fn db_path(&self) -> PathBuf {
        self.path.join("db")
    }

    pub fn save(&self) -> Result<(), IdentityError> {
        let dir = self.path.display().to_string();
        let text =
            serde_json::to_string_pretty(&self.identity).map_err(|e| IdentityError::Corrupt {
                dir: dir.clone(),
                reason: e.to_string(),
            })?;
        let tmp = self.path.join(format!("{IDENTITY_FILE}.tmp"));
        let write = || -> std::io::Result<()> {
            std::fs::write(&tmp, text.as_bytes())?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, self.path.join(IDENTITY_FILE))?;
            std::fs::File::open(&self.path)?.sync_all()
        };
        write().map_err(|source| IdentityError::Io { dir, source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn data_dir_is_claimed_once_and_guarded() {
        let tmp = tempfile::tempdir().unwrap();
        let p = tmp.path().join("d");
        let d = DataDir::claim(&p, "alpha", 1).unwrap();
        assert!(d.fresh);
        let again = DataDir::claim(&p, "alpha", 1).unwrap();
        assert!(!again.fresh);
        let other_cluster = DataDir::claim(&p, "beta", 1).err().unwrap().to_string();
        assert!(
            other_cluster.contains("belongs to cluster"),
            "{other_cluster}"
        );
        assert!(DataDir::claim(&p, "alpha", 2).is_err());
        assert_ne!(cluster_id("alpha"), cluster_id("beta"));
    }
}
