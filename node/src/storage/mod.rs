//! Owns the node's RocksDB database: one database, one write-ahead log, and column families for
//! the Raft log, the Raft state (vote, purge point) and the etcd state machine.
//!
//! Everything here is plain bytes and revisions. Consensus types are encoded by the consensus
//! layer before they reach this module, and gRPC never does.

pub mod auth_state;
pub mod backup;
pub mod codec;
pub mod mvcc;
pub mod snapshot;
mod syncer;

use rocksdb::{
    BlockBasedOptions, Cache, ColumnFamilyDescriptor, DB, DBCompressionType, IteratorMode, Options,
    ReadOptions, WriteBatch, WriteOptions,
};
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use syncer::WalSyncer;
pub use syncer::{SyncCallback, SyncObserver};

/// The Raft log: big-endian index -> encoded entry.
pub const CF_LOG: &str = "raft_log";
/// Raft's own durable state: vote, last purged log id, committed log id.
pub const CF_RAFT: &str = "raft_state";
/// Live keys: user key -> record of its newest revision.
pub const CF_KV: &str = "kv";
/// Every revision of every key (including delete tombstones) until compacted.
pub const CF_HISTORY: &str = "kv_history";
/// Revision -> user key: the order in which keys changed, for compaction and watch replay.
pub const CF_REVISIONS: &str = "kv_revisions";
/// State-machine metadata: revision counters, last applied log id, membership, auth, leases.
pub const CF_META: &str = "sm_meta";

/// Every column family.
const ALL_CFS: [&str; 6] = [CF_LOG, CF_RAFT, CF_KV, CF_HISTORY, CF_REVISIONS, CF_META];

/// The column families that make up the state machine, i.e. what a snapshot holds.
pub const STATE_MACHINE_CFS: [&str; 4] = [CF_KV, CF_HISTORY, CF_REVISIONS, CF_META];

#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("rocksdb: {0}")]
    Rocks(#[from] rocksdb::Error),
    #[error(transparent)]
    Corrupt(#[from] codec::CorruptRecord),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Other(String),
}

impl From<StorageError> for std::io::Error {
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::Io(io) => io,
            other => std::io::Error::other(other.to_string()),
        }
    }
}

pub type Result<T, E = StorageError> = std::result::Result<T, E>;

/// Default ceiling on flush and compaction writes, in MiB per second.
pub const DEFAULT_BACKGROUND_WRITE_MIB_PER_SEC: u64 = 64;

/// How the database is opened.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Ceiling on flush and compaction writes, in bytes per second; 0 for none.
    pub background_write_bytes_per_sec: u64,
    /// What RocksDB may hold in memory: its block cache and its memtables together (the
    /// memtables are charged to the cache, and take at most half of it); 0 to size it from the
    /// memory this process may use (see `auto_memory_bytes`).
    pub memory_bytes: u64,
}

impl Default for StoreOptions {
    fn default() -> Self {
        StoreOptions {
            background_write_bytes_per_sec: DEFAULT_BACKGROUND_WRITE_MIB_PER_SEC << 20,
            memory_bytes: 0,
        }
    }
}

/// Bounds of the automatic memory budget.
const MIN_MEMORY: u64 = 32 << 20;
const MAX_MEMORY: u64 = 1 << 30;
/// Largest memtable per column family. Small ones keep skip-list inserts and lookups within
/// the CPU caches (they were the largest single cost of a write with 32 MiB ones) and a
/// member's memory small; flushes are cheap at this size.
const MAX_WRITE_BUFFER: u64 = 4 << 20;

/// The memory budget when none is configured: a thirty-second of what this process may use
/// (its cgroup's limit in a container, else the machine's memory), within 32 MiB and 1 GiB.
/// Members sharing a machine divide it by `sharing`.
pub fn auto_memory_bytes(sharing: u64) -> u64 {
    let total = cgroup_memory_limit()
        .or_else(machine_memory)
        .unwrap_or(4 << 30);
    (total / 32 / sharing.max(1)).clamp(MIN_MEMORY, MAX_MEMORY)
}

fn cgroup_memory_limit() -> Option<u64> {
    let v2 = std::fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
    let v1 = || std::fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes").ok();
    let raw = v2.or_else(v1)?;
    // "max" (v2) or a huge number (v1) mean no limit.
    raw.trim().parse::<u64>().ok().filter(|b| *b < (1 << 50))
}

fn machine_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib << 10)
}

/// How a memory budget is split: the cache's capacity (which the memtables are charged to),
/// the memtables' share of it, and each column family's memtable size.
fn memory_split(budget: u64) -> (u64, u64, u64) {
    let budget = budget.max(MIN_MEMORY / 2);
    let memtables = budget / 2;
    // Several column families fill at once (atomic flush): each gets a slice of the share.
    let per_cf = (memtables / 4).min(MAX_WRITE_BUFFER);
    (budget, memtables, per_cf)
}

/// The node's database. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    db: DB,
    dir: PathBuf,
    syncer: WalSyncer,
    /// Readers hold it shared; installing a snapshot holds it exclusively, so that no read ever
    /// sees a half-replaced state machine.
    install_gate: RwLock<()>,
}

fn cf_options(cache: &Cache, point_lookups: bool, write_buffer: u64) -> Options {
    let mut o = Options::default();
    let mut t = BlockBasedOptions::default();
    t.set_block_cache(cache);
    if point_lookups {
        t.set_bloom_filter(10.0, false);
    }
    t.set_cache_index_and_filter_blocks(true);
    o.set_block_based_table_factory(&t);
    // Values are AES-GCM ciphertext, which does not compress: compressing it only costs CPU.
    o.set_compression_type(DBCompressionType::None);
    o.set_write_buffer_size(usize::try_from(write_buffer).unwrap_or(usize::MAX));
    o.set_max_write_buffer_number(4);
    o
}

/// The Raft log is written in index order and read back mostly from the log store's own cache:
/// an append-only vector memtable makes inserts constant-time.
fn log_cf_options(cache: &Cache, write_buffer: u64) -> Options {
    let mut o = cf_options(cache, false, write_buffer);
    o.set_memtable_factory(rocksdb::MemtableFactory::Vector);
    o.set_compression_type(DBCompressionType::None);
    o
}

impl Store {
    /// Opens (creating if needed) the database under `dir` with default options.
    pub fn open(dir: &Path) -> Result<Store> {
        Store::open_with(dir, &StoreOptions::default())
    }

    /// Opens (creating if needed) the database under `dir`.
    pub fn open_with(dir: &Path, options: &StoreOptions) -> Result<Store> {
        std::fs::create_dir_all(dir)?;
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        opts.set_max_background_jobs(2);
        opts.set_bytes_per_sync(1 << 20);
        opts.set_max_total_wal_size(256 << 20);
        opts.set_keep_log_file_num(3);
        opts.set_log_level(rocksdb::LogLevel::Warn);
        opts.set_wal_recovery_mode(rocksdb::DBRecoveryMode::PointInTime);
        // Writes go to an in-memory WAL buffer; durability points flush and fsync it
        // explicitly (group commit of log appends, votes, truncations, snapshots). State machine
        // writes between them cost no system call.
        opts.set_manual_wal_flush(true);
        // The vector memtable of the log does not take concurrent inserts.
        opts.set_allow_concurrent_memtable_write(false);
        // Column families are flushed together, so files on disk always hold one consistent
        // point of the state machine (its data and its last-applied marker) however much of the
        // unsynced write-ahead log a crash loses.
        opts.set_atomic_flush(true);
        // Flushes and compactions written at full speed queue the log's fsyncs behind them on
        // the disk, and with them every write's commit: at 256 clients, compactions running on
        // all members at once cut throughput by half for a second. Spread out, they do not.
        // Compactions run niced: under load they yield the CPU to requests (RocksDB slows
        // writes itself if they fall behind), and on an idle node they still run at full speed.
        let mut env = rocksdb::Env::new()?;
        env.lower_thread_pool_cpu_priority();
        opts.set_env(&env);
        let rate = i64::try_from(options.background_write_bytes_per_sec).unwrap_or(i64::MAX);
        if rate > 0 {
            opts.set_ratelimiter(rate, 50_000, 10);
        }
        let budget = if options.memory_bytes == 0 {
            auto_memory_bytes(1)
        } else {
            options.memory_bytes
        };
        let (cache_bytes, memtable_bytes, wb) = memory_split(budget);
        let usize_of = |b: u64| usize::try_from(b).unwrap_or(usize::MAX);
        let cache = Cache::new_lru_cache(usize_of(cache_bytes));
        // Memtables reserve their memory in the cache, so the two together stay within the
        // budget. Past their share a flush starts; writes wait for it only if they outrun it,
        // which would otherwise pile up memtables (45 MiB of them under a 16 MiB share in a test).
        let wbm = rocksdb::WriteBufferManager::new_write_buffer_manager_with_cache(
            usize_of(memtable_bytes),
            true,
            cache.clone(),
        );
        opts.set_write_buffer_manager(&wbm);
        let cfs = vec![
            ColumnFamilyDescriptor::new(CF_LOG, log_cf_options(&cache, wb)),
            ColumnFamilyDescriptor::new(CF_RAFT, cf_options(&cache, true, wb)),
            ColumnFamilyDescriptor::new(CF_KV, cf_options(&cache, true, wb)),
            ColumnFamilyDescriptor::new(CF_HISTORY, cf_options(&cache, false, wb)),
            ColumnFamilyDescriptor::new(CF_REVISIONS, cf_options(&cache, false, wb)),
            ColumnFamilyDescriptor::new(CF_META, cf_options(&cache, true, wb)),
        ];
        tracing::info!(
            memory_mib = budget >> 20,
            memtables_mib = memtable_bytes >> 20,
            "storage memory budget"
        );
        let db = DB::open_cf_descriptors(&opts, dir, cfs).map_err(|e| {
            if e.to_string().contains("lock") {
                StorageError::Other(format!(
                    "the data directory {} is in use by another raftkv process ({e})",
                    dir.display()
                ))
            } else {
                StorageError::Rocks(e)
            }
        })?;
        let (syncer, rx) = WalSyncer::new();
        let inner = Arc::new(Inner {
            db,
            dir: dir.to_path_buf(),
            syncer,
            install_gate: RwLock::new(()),
        });
        // The sync thread holds only a weak reference, so dropping the last Store closes the
        // database (and releases its lock file) even while the thread is idle.
        inner.syncer.start(Arc::downgrade(&inner), rx);
        Ok(Store { inner })
    }

    pub(crate) fn db(&self) -> &DB {
        &self.inner.db
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub(crate) fn cf(&self, name: &str) -> Result<&rocksdb::ColumnFamily> {
        self.inner
            .db
            .cf_handle(name)
            .ok_or_else(|| StorageError::Other(format!("column family {name} missing")))
    }

    /// Makes everything written so far durable with one fsync of the write-ahead log.
    pub fn sync_wal(&self) -> Result<()> {
        self.inner.db.flush_wal(true)?;
        Ok(())
    }

    /// Writes every memtable to files, all column families at one point (atomic flush). At a
    /// clean shutdown this persists the applied state that skipped the write-ahead log, so
    /// the next start has nothing to re-apply.
    pub fn flush_all(&self) -> Result<()> {
        let cfs = ALL_CFS
            .iter()
            .map(|name| self.cf(name))
            .collect::<Result<Vec<_>>>()?;
        let mut fo = rocksdb::FlushOptions::default();
        fo.set_wait(true);
        self.inner.db.flush_cfs_opt(&cfs, &fo)?;
        Ok(())
    }

    /// Runs `cb` once everything written before this call is durable. Calls arriving while an
    /// fsync is in progress share the next one (group commit).
    pub fn after_sync(&self, cb: SyncCallback) {
        self.inner.syncer.submit(cb, || {
            self.inner.db.flush_wal(true).map_err(|e| e.to_string())
        });
    }

    /// Registers the observer of fsync durations and batch sizes.
    pub fn set_sync_observer(&self, obs: SyncObserver) {
        self.inner.syncer.set_observer(obs);
    }

    /// The shared read gate; see `Inner::install_gate`.
    pub(crate) fn read_gate(&self) -> std::sync::RwLockReadGuard<'_, ()> {
        self.inner
            .install_gate
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    pub(crate) fn write_gate(&self) -> std::sync::RwLockWriteGuard<'_, ()> {
        self.inner
            .install_gate
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    // ---- Raft log ----

    /// Appends encoded entries. They are readable on return and durable once `after_sync` fires.
    pub fn append_log<'a>(&self, entries: impl IntoIterator<Item = (u64, &'a [u8])>) -> Result<()> {
        let cf = self.cf(CF_LOG)?;
        let mut batch = WriteBatch::default();
        for (index, data) in entries {
            batch.put_cf(cf, index.to_be_bytes(), data);
        }
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.inner.db.write_opt(batch, &wo)?;
        Ok(())
    }

    /// Reads encoded entries with index in `[start, end)`.
    pub fn read_log(&self, start: u64, end: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        let cf = self.cf(CF_LOG)?;
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(end.to_be_bytes());
        let it = self.inner.db.iterator_cf_opt(
            cf,
            ro,
            IteratorMode::From(&start.to_be_bytes(), rocksdb::Direction::Forward),
        );
        let mut out = Vec::new();
        for item in it {
            let (k, v) = item?;
            out.push((decode_index(&k)?, v.to_vec()));
        }
        Ok(out)
    }

    /// The last entry of the log, if any.
    pub fn last_log(&self) -> Result<Option<(u64, Vec<u8>)>> {
        let cf = self.cf(CF_LOG)?;
        let mut it = self.inner.db.iterator_cf(cf, IteratorMode::End);
        match it.next() {
            Some(item) => {
                let (k, v) = item?;
                Ok(Some((decode_index(&k)?, v.to_vec())))
            }
            None => Ok(None),
        }
    }

    /// Removes entries with index >= `from` (a conflicting suffix). Durable before returning,
    /// because openraft may immediately append a replacement.
    pub fn truncate_log_from(&self, from: u64) -> Result<()> {
        let cf = self.cf(CF_LOG)?;
        let mut batch = WriteBatch::default();
        batch.delete_range_cf(cf, from.to_be_bytes(), u64::MAX.to_be_bytes());
        batch.delete_cf(cf, u64::MAX.to_be_bytes());
        self.inner.db.write(batch)?;
        self.sync_wal()
    }

    /// Removes entries with index <= `upto`, recording `purged_marker` (the encoded last purged
    /// log id) in the same atomic write.
    pub fn purge_log_upto(&self, upto: u64, purged_key: &[u8], purged_marker: &[u8]) -> Result<()> {
        let cf = self.cf(CF_LOG)?;
        let raft = self.cf(CF_RAFT)?;
        let mut batch = WriteBatch::default();
        batch.put_cf(raft, purged_key, purged_marker);
        batch.delete_range_cf(
            cf,
            0u64.to_be_bytes(),
            (upto.saturating_add(1)).to_be_bytes(),
        );
        let mut wo = WriteOptions::default();
        wo.set_sync(false);
        self.inner.db.write_opt(batch, &wo)?;
        Ok(())
    }

    // ---- State machine ----

    /// Writes applied state-machine changes (which must include the last-applied marker)
    /// without the write-ahead log. Column families are flushed atomically, so after a crash
    /// the files hold the state machine, its last-applied marker and the Raft log of one
    /// point; the log entries after it are in the write-ahead log (or, on a leader that
    /// applied before its own fsync, on the quorum that committed them), and Raft re-applies
    /// them. The log is only purged up to a snapshot and taking a snapshot flushes, so those
    /// entries are never gone. Logging these writes too tripled the bytes written and fsynced
    /// per request.
    pub fn write_applied(&self, batch: WriteBatch) -> Result<()> {
        let mut wo = WriteOptions::default();
        wo.disable_wal(true);
        self.inner.db.write_opt(batch, &wo)?;
        Ok(())
    }

    // ---- Raft state ----

    pub fn put_raft_state(&self, key: &[u8], value: &[u8], sync: bool) -> Result<()> {
        let cf = self.cf(CF_RAFT)?;
        self.inner.db.put_cf(cf, key, value)?;
        if sync {
            self.sync_wal()?;
        }
        Ok(())
    }

    pub fn get_raft_state(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let cf = self.cf(CF_RAFT)?;
        Ok(self.inner.db.get_cf(cf, key)?)
    }

    /// Compacts every column family fully (etcd's defragment): reclaims space from deleted and
    /// compacted data.
    pub fn compact_all(&self) -> Result<()> {
        for name in ALL_CFS {
            let cf = self.cf(name)?;
            self.inner
                .db
                .compact_range_cf(cf, None::<&[u8]>, None::<&[u8]>);
        }
        Ok(())
    }

    // ---- sizes, for Status and metrics ----

    /// Bytes the database occupies on disk (SST files, write-ahead log, manifests).
    pub fn disk_size(&self) -> u64 {
        dir_size(&self.inner.dir)
    }

    /// Bytes of live data in the SST files: what `disk_size` holds that compaction would keep
    /// (etcd's "in use"). Data still in memtables is not on disk yet and is not counted.
    pub fn live_data_size(&self) -> u64 {
        self.int_property_sum("rocksdb.estimate-live-data-size")
    }

    /// A RocksDB integer property summed over all column families (e.g. pending compaction bytes).
    pub fn int_property_sum(&self, prop: &str) -> u64 {
        let mut total = 0;
        for name in ALL_CFS {
            if let Ok(cf) = self.cf(name)
                && let Ok(Some(v)) = self.inner.db.property_int_value_cf(cf, prop)
            {
                total += v;
            }
        }
        total
    }

    /// A RocksDB integer property of one column family.
    pub fn int_property(&self, cf: &str, prop: &str) -> u64 {
        self.cf(cf)
            .ok()
            .and_then(|cf| self.inner.db.property_int_value_cf(cf, prop).ok().flatten())
            .unwrap_or(0)
    }
}

fn decode_index(k: &[u8]) -> Result<u64> {
    let a: [u8; 8] = k
        .try_into()
        .map_err(|_| codec::CorruptRecord("log index length"))?;
    Ok(u64::from_be_bytes(a))
}

fn dir_size(dir: &Path) -> u64 {
    let mut total = 0;
    if let Ok(rd) = std::fs::read_dir(dir) {
        for e in rd.flatten() {
            match e.metadata() {
                Ok(m) if m.is_dir() => total += dir_size(&e.path()),
                Ok(m) => total += m.len(),
                Err(_) => {}
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    /// Writes `mib` MiB to the log and times the flush that puts it in files.
    fn timed_flush(options: &StoreOptions, mib: usize) -> Duration {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(dir.path(), options).unwrap();
        let value = vec![7u8; 1024];
        let entries: Vec<(u64, &[u8])> = (0..mib as u64 * 1024)
            .map(|i| (i, value.as_slice()))
            .collect();
        store.append_log(entries).unwrap();
        let started = Instant::now();
        store.flush_all().unwrap();
        started.elapsed()
    }

    #[test]
    fn background_writes_are_held_to_the_configured_rate() {
        let limited = timed_flush(
            &StoreOptions {
                background_write_bytes_per_sec: 1 << 20,
                memory_bytes: 64 << 20,
            },
            3,
        );
        let unlimited = timed_flush(
            &StoreOptions {
                background_write_bytes_per_sec: 0,
                memory_bytes: 64 << 20,
            },
            3,
        );
        // 3 MiB at 1 MiB/s cannot be written in much under three seconds.
        assert!(limited >= Duration::from_millis(1500), "{limited:?}");
        assert!(unlimited < limited / 2, "{unlimited:?} vs {limited:?}");
    }

    #[test]
    fn memtables_stay_within_their_share_of_the_memory_budget() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_with(
            dir.path(),
            &StoreOptions {
                background_write_bytes_per_sec: 0,
                memory_bytes: 32 << 20,
            },
        )
        .unwrap();
        let value = vec![7u8; 1024];
        let mut most = 0;
        // 96 MiB spread over the state machine's column families, as applies write them.
        let cfs = [CF_KV, CF_HISTORY, CF_REVISIONS, CF_META];
        for batch in 0..96u64 {
            let mut wb = rocksdb::WriteBatch::default();
            for i in batch * 1024..(batch + 1) * 1024 {
                let cf = store.cf(cfs[(i % 4) as usize]).unwrap();
                wb.put_cf(cf, i.to_be_bytes(), &value);
            }
            store.db().write(wb).unwrap();
            most = most.max(store.int_property_sum("rocksdb.size-all-mem-tables"));
        }
        // Half the budget is the memtables' share; a flush in progress may add a little.
        assert!(most <= 18 << 20, "memtables reached {} MiB", most >> 20);
        assert!(most >= 2 << 20, "memtables never filled: {most}");
    }

    #[test]
    fn the_automatic_budget_follows_the_memory_and_stays_in_bounds() {
        let one = auto_memory_bytes(1);
        assert!((MIN_MEMORY..=MAX_MEMORY).contains(&one));
        assert!(auto_memory_bytes(3) <= one);
        let (cache, memtables, per_cf) = memory_split(256 << 20);
        assert_eq!((cache, memtables), (256 << 20, 128 << 20));
        assert_eq!(per_cf, MAX_WRITE_BUFFER);
        assert_eq!(memory_split(32 << 20).2, 4 << 20);
    }
}
