//! Saving a cluster's backup to a file: the stream of `Maintenance.Snapshot` (which any member
//! serves after catching up with the leader), written next to its destination, checked against
//! the SHA-256 it ends with, synced, then renamed into place, so that a file under the
//! destination name is always a whole backup.

use crate::Client;
use crate::balancer::Route;
use crate::error::Error;
use crate::pb;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::time::Duration;
use tokio::io::AsyncWriteExt;

const MAGIC: &[u8] = b"RKVBACKUP\x01";

/// What a saved backup holds, from its header.
#[derive(Debug, Clone, Deserialize)]
pub struct BackupInfo {
    pub cluster_id: u64,
    pub member_id: u64,
    pub revision: i64,
    pub compact_revision: i64,
    #[serde(default)]
    pub keys: Vec<BackupKeyInfo>,
    pub created_unix: u64,
    /// Size of the file.
    #[serde(skip)]
    pub bytes: u64,
    /// Hex SHA-256 of the file's contents.
    #[serde(skip)]
    pub sha256: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct BackupKeyInfo {
    pub id: u32,
    pub fingerprint: String,
}

/// Checks a backup file end to end (its magic, header and the SHA-256 it ends with).
pub fn inspect(path: &Path) -> Result<BackupInfo, Error> {
    use std::io::Read;
    let bad = |why: String| {
        Error::Config(format!(
            "{}: not a whole raftkv backup: {why}",
            path.display()
        ))
    };
    let mut f = std::fs::File::open(path).map_err(|e| bad(e.to_string()))?;
    let bytes = f.metadata().map_err(|e| bad(e.to_string()))?.len();
    if bytes < (MAGIC.len() + 4 + 32) as u64 {
        return Err(bad(format!("only {bytes} bytes")));
    }
    let mut hash = Sha256::new();
    let mut head = vec![0u8; MAGIC.len() + 4];
    f.read_exact(&mut head).map_err(|e| bad(e.to_string()))?;
    if &head[..MAGIC.len()] != MAGIC {
        return Err(bad("it does not start like one".into()));
    }
    hash.update(&head);
    let len = u32::from_le_bytes([head[10], head[11], head[12], head[13]]) as u64;
    if len > bytes - head.len() as u64 - 32 {
        return Err(bad("corrupt header length".into()));
    }
    let mut json = vec![0u8; len as usize];
    f.read_exact(&mut json).map_err(|e| bad(e.to_string()))?;
    hash.update(&json);
    let mut info: BackupInfo =
        serde_json::from_slice(&json).map_err(|e| bad(format!("its header: {e}")))?;
    let mut rest = (&mut f).take(bytes - head.len() as u64 - len - 32);
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = rest.read(&mut buf).map_err(|e| bad(e.to_string()))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let mut trailer = [0u8; 32];
    f.read_exact(&mut trailer).map_err(|e| bad(e.to_string()))?;
    let digest = hash.finalize();
    if digest.as_slice() != trailer {
        return Err(bad(
            "its SHA-256 does not match (truncated or corrupt)".into()
        ));
    }
    info.bytes = bytes;
    info.sha256 = digest.iter().map(|b| format!("{b:02x}")).collect();
    Ok(info)
}

impl Client {
    /// Saves a backup of the cluster at its current revision into `path` (replacing it only
    /// once the new file is whole). Root only.
    pub async fn save_backup(&self, path: &Path) -> Result<BackupInfo, Error> {
        let part: PathBuf = {
            let mut p = path.as_os_str().to_owned();
            p.push(".part");
            p.into()
        };
        let saved = self
            .lb
            .call_with_timeout(Route::Read, Duration::from_secs(6 * 3600), |ch, meta| {
                let part = part.clone();
                async move {
                    let io = |e: std::io::Error| {
                        tonic::Status::internal(format!("writing {}: {e}", part.display()))
                    };
                    let mut stream = pb::maintenance_client::MaintenanceClient::new(ch)
                        .max_decoding_message_size(16 << 20)
                        .snapshot(meta.wrap(pb::SnapshotRequest {}))
                        .await?
                        .into_inner();
                    // Backups hold password hashes and key names: readable by the owner only.
                    let mut open = tokio::fs::OpenOptions::new();
                    open.write(true).create(true).truncate(true);
                    #[cfg(unix)]
                    open.mode(0o600);
                    let mut f = open.open(&part).await.map_err(io)?;
                    let mut bytes = 0u64;
                    while let Some(m) = stream.message().await? {
                        f.write_all(&m.blob).await.map_err(io)?;
                        bytes += m.blob.len() as u64;
                    }
                    f.sync_all().await.map_err(io)?;
                    Ok(tonic::Response::new(bytes))
                }
            })
            .await;
        let checked = saved.and_then(|_| inspect(&part));
        match checked {
            Ok(info) => {
                std::fs::rename(&part, path).map_err(|e| {
                    Error::Config(format!("moving the backup to {}: {e}", path.display()))
                })?;
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty())
                    && let Ok(d) = std::fs::File::open(dir)
                {
                    let _ = d.sync_all();
                }
                Ok(info)
            }
            Err(e) => {
                let _ = std::fs::remove_file(&part);
                Err(e)
            }
        }
    }
}
