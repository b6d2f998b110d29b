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
/// How long one backup may stream: hours for a large keyspace over a slow link.
const BACKUP_TIMEOUT: Duration = Duration::from_secs(6 * 3600);

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

/// The most header a backup may carry before the verifier gives up on it.
const MAX_HEADER: usize = 16 << 20;

/// Checks a backup as its bytes go by — its magic, its header and the SHA-256 it ends with —
/// so that a copy streamed somewhere else (an object store) is known whole without reading it
/// back.
pub struct Verifier {
    hash: Sha256,
    /// Bytes before the header is parsed (the magic, the length and the header itself).
    head: Vec<u8>,
    info: Option<BackupInfo>,
    /// The last 32 bytes seen: the trailer, if nothing follows.
    tail: Vec<u8>,
    bytes: u64,
}

impl Default for Verifier {
    fn default() -> Self {
        Self::new()
    }
}

impl Verifier {
    pub fn new() -> Verifier {
        Verifier {
            hash: Sha256::new(),
            head: Vec::new(),
            info: None,
            tail: Vec::with_capacity(64),
            bytes: 0,
        }
    }

    /// Bytes seen so far.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// The header, once enough of the stream has gone by.
    pub fn info(&self) -> Option<&BackupInfo> {
        self.info.as_ref()
    }

    pub fn update(&mut self, chunk: &[u8]) -> Result<(), String> {
        self.bytes += chunk.len() as u64;
        if self.info.is_none() && self.head.len() < MAX_HEADER + MAGIC.len() + 4 {
            self.head.extend_from_slice(chunk);
            self.parse_header()?;
        } else if self.info.is_none() {
            return Err("its header is larger than any backup writes".into());
        }
        // Everything but the last 32 bytes is hashed; those may be the trailer.
        self.tail.extend_from_slice(chunk);
        if self.tail.len() > 32 {
            let cut = self.tail.len() - 32;
            self.hash.update(&self.tail[..cut]);
            self.tail.drain(..cut);
        }
        Ok(())
    }

    fn parse_header(&mut self) -> Result<(), String> {
        let prefix = MAGIC.len() + 4;
        if self.head.len() < prefix {
            if !MAGIC.starts_with(&self.head[..self.head.len().min(MAGIC.len())]) {
                return Err("it does not start like one".into());
            }
            return Ok(());
        }
        if &self.head[..MAGIC.len()] != MAGIC {
            return Err("it does not start like one".into());
        }
        let len = u32::from_le_bytes([self.head[10], self.head[11], self.head[12], self.head[13]])
            as usize;
        if len > MAX_HEADER {
            return Err("corrupt header length".into());
        }
        if self.head.len() < prefix + len {
            return Ok(());
        }
        let info: BackupInfo = serde_json::from_slice(&self.head[prefix..prefix + len])
            .map_err(|e| format!("its header: {e}"))?;
        self.info = Some(info);
        self.head = Vec::new();
        Ok(())
    }

    /// Ends the check: the whole stream must have gone by.
    pub fn finish(self) -> Result<BackupInfo, String> {
        let Some(mut info) = self.info else {
            return Err(format!("only {} bytes, not even a header", self.bytes));
        };
        if self.tail.len() < 32 {
            return Err(format!("only {} bytes", self.bytes));
        }
        // The file's own digest (what `sha256sum` of the object prints) covers the trailer too.
        let mut whole = self.hash.clone();
        whole.update(&self.tail);
        let digest = self.hash.finalize();
        if digest.as_slice() != self.tail.as_slice() {
            return Err("its SHA-256 does not match (truncated or corrupt)".into());
        }
        info.bytes = self.bytes;
        info.sha256 = whole
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        Ok(info)
    }
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
    let mut v = Verifier::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| bad(e.to_string()))?;
        if n == 0 {
            break;
        }
        v.update(&buf[..n]).map_err(bad)?;
    }
    v.finish().map_err(bad)
}

/// A backup as it streams from a member, chunk by chunk.
pub struct BackupStream {
    inner: tonic::Streaming<pb::SnapshotResponse>,
}

impl BackupStream {
    /// The next piece of the backup, or `None` once the member sent all of it.
    pub async fn next_chunk(&mut self) -> Result<Option<Vec<u8>>, Error> {
        match self.inner.message().await {
            Ok(Some(m)) => Ok(Some(m.blob)),
            Ok(None) => Ok(None),
            Err(status) => Err(Error::server(&status)),
        }
    }
}

impl Client {
    /// Opens a backup of the cluster at its current revision, to be read chunk by chunk (and
    /// checked with a [`Verifier`]). Root only.
    pub async fn backup_stream(&self) -> Result<BackupStream, Error> {
        let inner = self
            .lb
            .call_with_timeout(Route::Read, BACKUP_TIMEOUT, |ch, meta| async move {
                pb::maintenance_client::MaintenanceClient::new(ch)
                    .max_decoding_message_size(16 << 20)
                    .snapshot(meta.wrap(pb::SnapshotRequest {}))
                    .await
            })
            .await?;
        Ok(BackupStream { inner })
    }

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
            .call_with_timeout(Route::Read, BACKUP_TIMEOUT, |ch, meta| {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        let header =
            br#"{"cluster_id":1,"member_id":2,"revision":7,"compact_revision":0,"created_unix":3}"#;
        let mut b = MAGIC.to_vec();
        b.extend_from_slice(&(header.len() as u32).to_le_bytes());
        b.extend_from_slice(header);
        b.extend_from_slice(&[9u8; 1000]);
        let digest = Sha256::digest(&b);
        b.extend_from_slice(&digest);
        b
    }

    #[test]
    fn a_whole_backup_verifies_in_any_chunking_and_a_damaged_one_never_does() {
        let b = sample();
        for size in [1, 7, 31, 32, 33, 500, b.len()] {
            let mut v = Verifier::new();
            for c in b.chunks(size) {
                v.update(c).unwrap();
            }
            let info = v.finish().unwrap();
            assert_eq!((info.revision, info.bytes), (7, b.len() as u64));
            // What `sha256sum` prints for the file, so a restore can pin the exact object.
            let file: String = Sha256::digest(&b)
                .iter()
                .map(|x| format!("{x:02x}"))
                .collect();
            assert_eq!(info.sha256, file);
        }
        let mut truncated = Verifier::new();
        truncated.update(&b[..b.len() - 1]).unwrap();
        assert!(truncated.finish().is_err());
        let mut flipped = b.clone();
        flipped[600] ^= 1;
        let mut v = Verifier::new();
        v.update(&flipped).unwrap();
        assert!(v.finish().unwrap_err().contains("SHA-256"));
        assert!(Verifier::new().update(b"NOTABACKUP\0\0\0\0").is_err());
        assert!(Verifier::new().finish().is_err());
    }
}
