//! Backup files: the whole state machine at one revision (every key's history, leases, users
//! and roles, the encryption keys' fingerprints), with a header that says what it holds and a
//! SHA-256 over the whole file. Values stay sealed: a backup is as protected as the data
//! directory it came from, and restoring it needs the keys it names.
//!
//! Layout: `RKVBACKUP\x01`, the header's length (u32, little-endian) and the header (JSON), a
//! snapshot file (see `snapshot`, with its own CRC-32), zeros up to a multiple of 512 bytes,
//! then the SHA-256 of everything before. The alignment and trailer are what `etcdctl snapshot
//! save` checks for (etcd's bbolt snapshots end the same way).

use super::{Result, StorageError, Store, snapshot};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

pub const MAGIC: &[u8; 10] = b"RKVBACKUP\x01";
const FORMAT: u32 = 1;
const DIGEST_BYTES: u64 = 32;
/// The body (everything before the digest) is padded to a multiple of this.
const ALIGN: u64 = 512;

/// Zeros that pad a body of `len` bytes to `ALIGN`.
fn padding(len: u64) -> u64 {
    (ALIGN - len % ALIGN) % ALIGN
}
/// Longest header a reader accepts (key lists are short).
const MAX_HEADER_BYTES: usize = 1 << 20;

/// An encryption key a backup's values are sealed with.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupKey {
    pub id: u32,
    /// Hex of the key's fingerprint as the cluster recorded it.
    pub fingerprint: String,
}

/// What a backup file says about itself.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct BackupHeader {
    pub format: u32,
    /// The cluster and member it was taken from.
    pub cluster_id: u64,
    pub member_id: u64,
    /// The revision it holds, and the compaction revision at that point.
    pub revision: i64,
    pub compact_revision: i64,
    /// Keys its values are sealed with (empty: the cluster stores no sealed values).
    pub keys: Vec<BackupKey>,
    /// Seconds since the Unix epoch when it was taken.
    pub created_unix: u64,
    /// Length of the snapshot part.
    pub snapshot_bytes: u64,
}

/// A backup file checked end to end.
#[derive(Debug, Clone)]
pub struct VerifiedBackup {
    pub header: BackupHeader,
    /// Hex SHA-256 of the file: what a restored cluster remembers it was made from.
    pub digest: String,
    pub bytes: u64,
    /// Where the snapshot part starts in the file.
    snapshot_offset: u64,
}

fn bad(why: impl std::fmt::Display) -> StorageError {
    StorageError::Other(format!("not a usable raftkv backup: {why}"))
}

struct HashingWriter<W: Write> {
    inner: W,
    hash: Sha256,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes a backup of `store` as of now to `path` (atomically: a partial file is never left
/// under that name). `keys` lists the encryption keys the cluster has used; it is asked after
/// the data is captured, so a key first used in between is listed too.
pub fn write(
    store: &Store,
    cluster_id: u64,
    member_id: u64,
    keys: impl FnOnce() -> Result<Vec<BackupKey>>,
    path: &Path,
) -> Result<BackupHeader> {
    let snap = path.with_extension(format!("{:016x}.snap", rand::random::<u64>()));
    let result = write_from_snapshot(store, cluster_id, member_id, keys, path, &snap);
    let _ = std::fs::remove_file(&snap);
    result
}

fn write_from_snapshot(
    store: &Store,
    cluster_id: u64,
    member_id: u64,
    keys: impl FnOnce() -> Result<Vec<BackupKey>>,
    path: &Path,
    snap: &Path,
) -> Result<BackupHeader> {
    let facts = snapshot::build(store, snap)?;
    let keys = keys()?;
    let header = BackupHeader {
        format: FORMAT,
        cluster_id,
        member_id,
        revision: facts.revision,
        compact_revision: facts.compacted,
        keys,
        created_unix: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        snapshot_bytes: std::fs::metadata(snap)?.len(),
    };
    let json = serde_json::to_vec(&header).map_err(|e| StorageError::Other(e.to_string()))?;
    let tmp = path.with_extension(format!("{:016x}.tmp", rand::random::<u64>()));
    let written = (|| -> Result<()> {
        let mut w = HashingWriter {
            inner: BufWriter::with_capacity(1 << 20, File::create(&tmp)?),
            hash: Sha256::new(),
        };
        w.write_all(MAGIC)?;
        w.write_all(&(json.len() as u32).to_le_bytes())?;
        w.write_all(&json)?;
        std::io::copy(&mut File::open(snap)?, &mut w)?;
        let body = (MAGIC.len() + 4 + json.len()) as u64 + header.snapshot_bytes;
        w.write_all(&vec![0u8; padding(body) as usize])?;
        let digest = w.hash.finalize();
        let mut inner = w.inner;
        inner.write_all(&digest)?;
        let file = inner
            .into_inner()
            .map_err(|e| StorageError::Io(e.into_error()))?;
        file.sync_all()?;
        Ok(())
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(header)
}

/// Reads a backup through: magic, header, the SHA-256 over the whole file and the snapshot's
/// own checksum. A truncated or altered file is refused.
pub fn verify(path: &Path) -> Result<VerifiedBackup> {
    let file = File::open(path)?;
    let bytes = file.metadata()?.len();
    let min = MAGIC.len() as u64 + 4 + DIGEST_BYTES;
    if bytes < min {
        return Err(bad(format!("{} is only {bytes} bytes", path.display())));
    }
    let mut r = BufReader::with_capacity(1 << 20, file).take(bytes - DIGEST_BYTES);
    let mut hash = Sha256::new();
    let mut magic = [0u8; 10];
    r.read_exact(&mut magic)?;
    if &magic != MAGIC {
        return Err(bad(format!(
            "{} does not start like one (a bbolt file from etcd cannot be restored into raftkv)",
            path.display()
        )));
    }
    hash.update(magic);
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    hash.update(len);
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_HEADER_BYTES || (len as u64) > bytes - min {
        return Err(bad("its header length is corrupt"));
    }
    let mut json = vec![0u8; len];
    r.read_exact(&mut json)?;
    hash.update(&json);
    let header: BackupHeader =
        serde_json::from_slice(&json).map_err(|e| bad(format!("its header: {e}")))?;
    if header.revision < 1
        || header.compact_revision < 0
        || header.compact_revision > header.revision
        || header.revision > i64::MAX / 2
    {
        return Err(bad(format!(
            "its header names impossible revisions ({} compacted at {})",
            header.revision, header.compact_revision
        )));
    }
    if header.format != FORMAT {
        return Err(bad(format!(
            "format {} (this raftkv reads format {FORMAT})",
            header.format
        )));
    }
    let snapshot_offset = (MAGIC.len() + 4 + len) as u64;
    let described = snapshot_offset
        .checked_add(header.snapshot_bytes)
        .and_then(|body| body.checked_add(padding(body) + DIGEST_BYTES));
    if described != Some(bytes) {
        return Err(bad(format!(
            "it is {bytes} bytes, but its header describes {} (truncated, or extended)",
            described.map_or_else(|| "more".to_string(), |d| d.to_string())
        )));
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    let mut file = r.into_inner();
    let mut expected = [0u8; DIGEST_BYTES as usize];
    file.read_exact(&mut expected)?;
    let digest = hash.finalize();
    if digest.as_slice() != expected {
        return Err(bad(
            "its SHA-256 does not match its contents (corrupt or altered)",
        ));
    }
    Ok(VerifiedBackup {
        header,
        digest: hex::encode(digest),
        bytes,
        snapshot_offset,
    })
}

/// Seeds the never-used `store` with a verified backup: the state machine becomes the
/// backup's, without its Raft position or membership (the new cluster's own).
pub fn seed(store: &Store, backup: &VerifiedBackup, path: &Path) -> Result<()> {
    let snap: PathBuf = store
        .dir()
        .join(format!("restore-{:016x}.snap", rand::random::<u64>()));
    let copied = (|| -> Result<()> {
        let mut src = File::open(path)?;
        std::io::Seek::seek(&mut src, std::io::SeekFrom::Start(backup.snapshot_offset))?;
        let mut dst = File::create(&snap)?;
        let n = std::io::copy(&mut src.take(backup.header.snapshot_bytes), &mut dst)?;
        if n != backup.header.snapshot_bytes {
            return Err(bad("it changed while being restored"));
        }
        dst.sync_all()?;
        let facts = snapshot::seed_new_cluster(store, &snap)?;
        if facts.revision != backup.header.revision {
            return Err(bad(format!(
                "its header says revision {}, its data {}",
                backup.header.revision, facts.revision
            )));
        }
        Ok(())
    })();
    let _ = std::fs::remove_file(&snap);
    copied
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(dir: &Path) -> (Store, PathBuf) {
        let store = Store::open(&dir.join("src")).unwrap();
        let path = dir.join("b.rkvbackup");
        let keys = vec![BackupKey {
            id: 1,
            fingerprint: "00".repeat(16),
        }];
        let h = write(&store, 7, 1, || Ok(keys), &path).unwrap();
        assert_eq!(h.cluster_id, 7);
        (store, path)
    }

    #[test]
    fn a_backup_verifies_and_seeds_a_new_store() {
        let dir = tempfile::tempdir().unwrap();
        let (_src, path) = sample(dir.path());
        let v = verify(&path).unwrap();
        assert_eq!(v.header.keys.len(), 1);
        assert_eq!(v.digest.len(), 64);
        assert_eq!(v.bytes % ALIGN, DIGEST_BYTES, "etcdctl's alignment check");
        let dst = Store::open(&dir.path().join("dst")).unwrap();
        seed(&dst, &v, &path).unwrap();
        assert_eq!(dst.revisions().unwrap().0, v.header.revision);
        // Only the backup itself is left behind.
        let stray: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok())
            .filter(|e| e.path().extension().is_some_and(|x| x != "rkvbackup"))
            .filter(|e| e.path().is_file())
            .collect();
        assert!(stray.is_empty(), "{stray:?}");
    }

    #[test]
    fn truncated_or_altered_backups_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (_src, path) = sample(dir.path());
        let good = std::fs::read(&path).unwrap();
        let cut = dir.path().join("cut");
        std::fs::write(&cut, &good[..good.len() - 10]).unwrap();
        let e = verify(&cut).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        let mut flipped = good.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 1;
        let alt = dir.path().join("alt");
        std::fs::write(&alt, &flipped).unwrap();
        let e = verify(&alt).unwrap_err().to_string();
        assert!(e.contains("SHA-256") || e.contains("header"), "{e}");
        let other = dir.path().join("other");
        std::fs::write(
            &other,
            b"\x00\x01bbolt-ish garbage that is long enough to read",
        )
        .unwrap();
        let e = verify(&other).unwrap_err().to_string();
        assert!(e.contains("does not start like one"), "{e}");
    }
}
