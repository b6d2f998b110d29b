//! State-machine snapshots: RocksDB checkpoints (hard links, taken at Raft's snapshot points) and
//! the transfer files made from them or from a live point-in-time view. Either way the data and
//! the last-applied marker inside agree. Files are verified by checksum and installed by
//! replacing the state-machine column families; an interrupted install is redone at the next
//! start.
//!
//! File layout: magic, then records `[cf:u8][key_len:u32][key][value_len:u32][value]`, then an
//! end marker `0xff` and the CRC-32 of everything before it.

use super::{CF_META, CF_RAFT, Result, STATE_MACHINE_CFS, StorageError, Store};
use rocksdb::{DB, IteratorMode, Options, ReadOptions, WriteBatch, WriteOptions};
use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"RKVSNAP\x01";
const END: u8 = 0xff;
const INSTALL_MARKER: &[u8] = b"snapshot_installing";
const BATCH_BYTES: usize = 4 << 20;

/// State-machine metadata keys whose values the consensus layer owns (opaque here).
pub const META_APPLIED: &[u8] = b"applied";
pub const META_MEMBERSHIP: &[u8] = b"membership";

/// What a snapshot file says about itself: the encoded last-applied log id and membership.
#[derive(Debug, Clone)]
pub struct SnapshotFacts {
    pub applied: Option<Vec<u8>>,
    pub membership: Option<Vec<u8>>,
    /// The MVCC revision and compaction revision the file holds.
    pub revision: i64,
    pub compacted: i64,
    pub bytes: u64,
    pub records: u64,
}

impl Default for SnapshotFacts {
    fn default() -> Self {
        SnapshotFacts {
            applied: None,
            membership: None,
            revision: super::mvcc::INITIAL_REVISION,
            compacted: 0,
            bytes: 0,
            records: 0,
        }
    }
}

impl SnapshotFacts {
    /// Notes what a state-machine metadata record says.
    fn note_meta(&mut self, key: &[u8], value: &[u8]) -> Result<()> {
        if key == META_APPLIED {
            self.applied = Some(value.to_vec());
        } else if key == META_MEMBERSHIP {
            self.membership = Some(value.to_vec());
        } else if key == super::mvcc::META_REVISION {
            self.revision = super::codec::decode_i64(value)?;
        } else if key == super::mvcc::META_COMPACTED {
            self.compacted = super::codec::decode_i64(value)?;
        }
        Ok(())
    }
}

/// Longest key or value a snapshot record may have: far above any request's (1.5 MiB by
/// default), and low enough that a corrupt length cannot make a reader allocate much.
const MAX_RECORD_BYTES: usize = 32 << 20;

struct CrcWriter<W: Write> {
    inner: W,
    crc: crc32fast::Hasher,
    bytes: u64,
}

impl<W: Write> Write for CrcWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.crc.update(&buf[..n]);
        self.bytes += n as u64;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Writes the state machine as of now into `path`. The write-ahead log is synced first, so the
/// state captured is durable before Raft purges the log entries it covers.
pub fn build(store: &Store, path: &Path) -> Result<SnapshotFacts> {
    // Shared with readers, exclusive with installs: never snapshot a half-installed state. Only
    // taking the RocksDB snapshot needs it (what it sees stays fixed); holding it through the
    // file write would make a waiting install block every read for as long as a backup takes.
    let snap = {
        let _gate = store.read_gate();
        store.db().snapshot()
    };
    write_file(
        store.db(),
        |name| store.cf(name),
        || {
            let mut ro = ReadOptions::default();
            ro.set_snapshot(&snap);
            ro
        },
        path,
    )
}

/// Takes a RocksDB checkpoint of the store in `dir` (which must not exist): a consistent,
/// durable copy made of hard links, so its cost does not grow with the data. Returns the
/// last-applied marker and membership it holds.
pub fn checkpoint(store: &Store, dir: &Path) -> Result<SnapshotFacts> {
    {
        let _gate = store.read_gate();
        // `create_checkpoint` flushes the memtables first (log size 0). It must: applied
        // state is written without the write-ahead log (`Store::write_applied`), so a
        // checkpoint made from SST files plus the log would miss it.
        rocksdb::checkpoint::Checkpoint::new(store.db())?.create_checkpoint(dir)?;
    }
    sync_dir(dir)?;
    let db = open_checkpoint(dir)?;
    let meta = checkpoint_cf(&db, CF_META)?;
    Ok(SnapshotFacts {
        applied: db.get_cf(meta, META_APPLIED)?,
        membership: db.get_cf(meta, META_MEMBERSHIP)?,
        ..Default::default()
    })
}

/// Writes the snapshot file for a checkpoint made by [`checkpoint`].
pub fn export_checkpoint(dir: &Path, path: &Path) -> Result<SnapshotFacts> {
    let db = open_checkpoint(dir)?;
    write_file(
        &db,
        |name| checkpoint_cf(&db, name),
        ReadOptions::default,
        path,
    )
}

fn open_checkpoint(dir: &Path) -> Result<DB> {
    // Read-only, and only the state machine: the Raft log in the checkpoint is not part of it.
    Ok(DB::open_cf_for_read_only(
        &Options::default(),
        dir,
        STATE_MACHINE_CFS,
        false,
    )?)
}

fn checkpoint_cf<'a>(db: &'a DB, name: &str) -> Result<&'a rocksdb::ColumnFamily> {
    db.cf_handle(name)
        .ok_or_else(|| StorageError::Other(format!("checkpoint lacks column family {name}")))
}

/// Writes every state-machine record `db` shows through `ro` to a snapshot file at `path`
/// (atomically: a partial file never has the final name).
fn write_file<'a>(
    db: &'a DB,
    cf: impl Fn(&str) -> Result<&'a rocksdb::ColumnFamily>,
    ro: impl Fn() -> ReadOptions,
    path: &Path,
) -> Result<SnapshotFacts> {
    // Unique, so that two writers of the same snapshot do not interleave.
    let tmp = path.with_extension(format!("{:016x}.tmp", rand::random::<u64>()));
    let result = write_records(db, cf, ro, &tmp);
    let facts = match result {
        Ok(f) => f,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    std::fs::rename(&tmp, path)?;
    sync_dir(path)?;
    Ok(facts)
}

fn write_records<'a>(
    db: &'a DB,
    cf: impl Fn(&str) -> Result<&'a rocksdb::ColumnFamily>,
    ro: impl Fn() -> ReadOptions,
    tmp: &Path,
) -> Result<SnapshotFacts> {
    let file = File::create(tmp)?;
    let mut w = CrcWriter {
        inner: BufWriter::with_capacity(1 << 20, file),
        crc: crc32fast::Hasher::new(),
        bytes: 0,
    };
    w.write_all(MAGIC)?;
    let mut facts = SnapshotFacts::default();
    for (i, name) in STATE_MACHINE_CFS.iter().enumerate() {
        let handle = cf(name)?;
        for item in db.iterator_cf_opt(handle, ro(), IteratorMode::Start) {
            let (k, v) = item?;
            if *name == CF_META {
                facts.note_meta(&k, &v)?;
            }
            w.write_all(&[i as u8])?;
            w.write_all(&(k.len() as u32).to_le_bytes())?;
            w.write_all(&k)?;
            w.write_all(&(v.len() as u32).to_le_bytes())?;
            w.write_all(&v)?;
            facts.records += 1;
        }
    }
    w.write_all(&[END])?;
    let crc = w.crc.clone().finalize();
    let mut inner = w.inner;
    inner.write_all(&crc.to_le_bytes())?;
    inner.flush()?;
    let file = inner
        .into_inner()
        .map_err(|e| StorageError::Io(e.into_error()))?;
    file.sync_all()?;
    facts.bytes = w.bytes + 4;
    Ok(facts)
}

fn sync_dir(path: &Path) -> Result<()> {
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// One record of a snapshot file.
struct Entry {
    cf: u8,
    key: Vec<u8>,
    value: Vec<u8>,
}

struct SnapshotReader<R: Read> {
    inner: R,
    crc: crc32fast::Hasher,
}

impl<R: Read> SnapshotReader<R> {
    fn open(inner: R) -> Result<Self> {
        let mut r = SnapshotReader {
            inner,
            crc: crc32fast::Hasher::new(),
        };
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(StorageError::Other("not a raftkv snapshot file".into()));
        }
        Ok(r)
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> Result<()> {
        self.inner.read_exact(buf).map_err(|e| {
            StorageError::Other(format!("snapshot file truncated or unreadable: {e}"))
        })?;
        self.crc.update(buf);
        Ok(())
    }

    fn read_len(&mut self) -> Result<usize> {
        let mut b = [0u8; 4];
        self.read_exact(&mut b)?;
        let n = u32::from_le_bytes(b) as usize;
        if n > MAX_RECORD_BYTES {
            return Err(StorageError::Other(format!(
                "snapshot file is corrupt: a record claims {n} bytes"
            )));
        }
        Ok(n)
    }

    /// The next record, or None at the end marker (after checking the checksum).
    fn next(&mut self) -> Result<Option<Entry>> {
        let mut tag = [0u8; 1];
        self.read_exact(&mut tag)?;
        if tag[0] == END {
            let expected = self.crc.clone().finalize();
            let mut b = [0u8; 4];
            self.inner
                .read_exact(&mut b)
                .map_err(|e| StorageError::Other(format!("snapshot checksum missing: {e}")))?;
            if u32::from_le_bytes(b) != expected {
                return Err(StorageError::Other("snapshot checksum mismatch".into()));
            }
            return Ok(None);
        }
        if tag[0] as usize >= STATE_MACHINE_CFS.len() {
            return Err(StorageError::Other(
                "snapshot names an unknown column family".into(),
            ));
        }
        let klen = self.read_len()?;
        let mut key = vec![0u8; klen];
        self.read_exact(&mut key)?;
        let vlen = self.read_len()?;
        let mut value = vec![0u8; vlen];
        self.read_exact(&mut value)?;
        Ok(Some(Entry {
            cf: tag[0],
            key,
            value,
        }))
    }
}

/// Reads a snapshot file through once: checks it is whole and returns its facts.
pub fn verify(path: &Path) -> Result<SnapshotFacts> {
    let file = File::open(path)?;
    let bytes = file.metadata()?.len();
    let mut r = SnapshotReader::open(BufReader::with_capacity(1 << 20, file))?;
    let meta_cf = STATE_MACHINE_CFS
        .iter()
        .position(|c| *c == CF_META)
        .unwrap_or(usize::MAX) as u8;
    let mut facts = SnapshotFacts {
        bytes,
        ..Default::default()
    };
    while let Some(e) = r.next()? {
        facts.records += 1;
        if e.cf == meta_cf {
            facts.note_meta(&e.key, &e.value)?;
        }
    }
    Ok(facts)
}

/// Replaces the state machine with the snapshot in `path` (which must stay in place until this
/// returns: an interrupted install is redone from it by `recover_interrupted_install`).
pub fn install(store: &Store, path: &Path) -> Result<SnapshotFacts> {
    let facts = verify(path)?;
    let _gate = store.write_gate();
    let raft = store.cf(CF_RAFT)?;
    store
        .db()
        .put_cf(raft, INSTALL_MARKER, path.to_string_lossy().as_bytes())?;
    store.sync_wal()?;
    load(store, path)?;
    store.db().delete_cf(raft, INSTALL_MARKER)?;
    store.sync_wal()?;
    Ok(facts)
}

/// Fills the state machine of a store that was never used with the snapshot in `path`, as the
/// starting state of a new cluster: everything but the Raft position and membership, which the
/// new cluster makes its own.
pub fn seed_new_cluster(store: &Store, path: &Path) -> Result<SnapshotFacts> {
    let facts = verify(path)?;
    let _gate = store.write_gate();
    load(store, path)?;
    let meta = store.cf(CF_META)?;
    store.db().delete_cf(meta, META_APPLIED)?;
    store.db().delete_cf(meta, META_MEMBERSHIP)?;
    store.sync_wal()?;
    Ok(facts)
}

fn load(store: &Store, path: &Path) -> Result<()> {
    let mut batch = WriteBatch::default();
    for name in STATE_MACHINE_CFS {
        let cf = store.cf(name)?;
        let last = store.db().iterator_cf(cf, IteratorMode::End).next();
        if let Some(item) = last {
            let (k, _) = item?;
            let mut end = k.to_vec();
            end.push(0);
            batch.delete_range_cf(cf, [].as_slice(), end.as_slice());
        }
    }
    let file = File::open(path)?;
    let mut r = SnapshotReader::open(BufReader::with_capacity(1 << 20, file))?;
    let mut wo = WriteOptions::default();
    wo.set_sync(false);
    while let Some(e) = r.next()? {
        let cf = store.cf(STATE_MACHINE_CFS[e.cf as usize])?;
        batch.put_cf(cf, &e.key, &e.value);
        if batch.size_in_bytes() >= BATCH_BYTES {
            store.db().write_opt(std::mem::take(&mut batch), &wo)?;
        }
    }
    store.db().write_opt(batch, &wo)?;
    store.sync_wal()?;
    Ok(())
}

/// Finishes a snapshot install that a crash interrupted. Returns the snapshot path if it did.
pub fn recover_interrupted_install(store: &Store) -> Result<Option<PathBuf>> {
    let Some(path) = store.get_raft_state(INSTALL_MARKER)? else {
        return Ok(None);
    };
    let path = PathBuf::from(String::from_utf8_lossy(&path).into_owned());
    tracing::warn!(snapshot = %path.display(), "redoing a snapshot install interrupted by a crash");
    install(store, &path)?;
    Ok(Some(path))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::CF_KV;

    #[test]
    fn snapshot_roundtrip_replaces_state_and_detects_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a")).unwrap();
        let kv = a.cf(CF_KV).unwrap();
        a.db().put_cf(kv, b"k1", b"v1").unwrap();
        a.db()
            .put_cf(a.cf(CF_META).unwrap(), META_APPLIED, b"applied-7")
            .unwrap();
        let path = dir.path().join("snap");
        let facts = build(&a, &path).unwrap();
        assert_eq!(facts.applied.as_deref(), Some(&b"applied-7"[..]));
        assert_eq!(facts.records, 2);

        let b = Store::open(&dir.path().join("b")).unwrap();
        let bkv = b.cf(CF_KV).unwrap();
        b.db().put_cf(bkv, b"stale", b"x").unwrap();
        install(&b, &path).unwrap();
        assert_eq!(
            b.db().get_cf(bkv, b"k1").unwrap().as_deref(),
            Some(&b"v1"[..])
        );
        assert!(b.db().get_cf(bkv, b"stale").unwrap().is_none());

        let mut bytes = std::fs::read(&path).unwrap();
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0x55;
        let bad = dir.path().join("bad");
        std::fs::write(&bad, &bytes).unwrap();
        assert!(verify(&bad).is_err());
        assert!(install(&b, &bad).is_err());
        // A refused install leaves the state machine as it was.
        assert_eq!(
            b.db().get_cf(bkv, b"k1").unwrap().as_deref(),
            Some(&b"v1"[..])
        );
    }

    #[test]
    fn a_checkpoint_keeps_its_point_in_time_and_exports_an_installable_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = Store::open(&dir.path().join("a")).unwrap();
        let kv = a.cf(CF_KV).unwrap();
        let meta = a.cf(CF_META).unwrap();
        a.db().put_cf(kv, b"k1", b"v1").unwrap();
        a.db().put_cf(meta, META_APPLIED, b"applied-3").unwrap();
        let ckpt = dir.path().join("ckpt");
        let facts = checkpoint(&a, &ckpt).unwrap();
        assert_eq!(facts.applied.as_deref(), Some(&b"applied-3"[..]));
        // Later writes are not part of it.
        a.db().put_cf(kv, b"k2", b"v2").unwrap();
        a.db().put_cf(meta, META_APPLIED, b"applied-4").unwrap();

        let file = dir.path().join("snap");
        let exported = export_checkpoint(&ckpt, &file).unwrap();
        assert_eq!(exported.applied.as_deref(), Some(&b"applied-3"[..]));
        assert_eq!(exported.records, 2);
        let b = Store::open(&dir.path().join("b")).unwrap();
        install(&b, &file).unwrap();
        let bkv = b.cf(CF_KV).unwrap();
        assert_eq!(
            b.db().get_cf(bkv, b"k1").unwrap().as_deref(),
            Some(&b"v1"[..])
        );
        assert!(b.db().get_cf(bkv, b"k2").unwrap().is_none());
    }
}
