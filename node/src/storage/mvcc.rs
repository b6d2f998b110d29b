//! etcd's multi-version data model on RocksDB: reads at the newest or a past revision, and the
//! application of write transactions, compaction and leases, all deterministic so every replica
//! computes the same result from the same log.
//!
//! Layout: `kv` holds each live key's newest record, `kv_history` every revision of every key
//! (delete tombstones included) until compacted, `kv_revisions` which key changed at which
//! revision. A write transaction is staged in one RocksDB write batch together with the new
//! revision counters, so it is applied entirely or not at all.

use super::codec::{self, Record, history_key, revision_key, split_history_key};
use super::{CF_HISTORY, CF_KV, CF_META, CF_REVISIONS, Result, StorageError, Store};
use crate::model::*;
use rocksdb::{Direction, IteratorMode, ReadOptions, WriteBatch};
use std::collections::{BTreeMap, BTreeSet};

pub(crate) const META_REVISION: &[u8] = b"rev";
pub(crate) const META_COMPACTED: &[u8] = b"compacted";
const LEASE_PREFIX: &[u8] = b"lease/";
const LEASE_KEY_PREFIX: &[u8] = b"leasekey/";

/// A page of history: events with their revisions, and where to continue if there is more.
pub type EventPage = (Vec<(i64, Event)>, Option<i64>);

/// Revision entries one page of watch history may scan, kept or not.
const PAGE_SCAN_LIMIT: usize = 10_000;

/// The revision of an empty store, as in etcd: the first write gets revision 2.
pub const INITIAL_REVISION: i64 = 1;

/// A read failed because of what was asked (compacted or future revision) or of the disk.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Refused(#[from] ApplyError),
    #[error(transparent)]
    Storage(#[from] StorageError),
}

impl From<rocksdb::Error> for ReadError {
    fn from(e: rocksdb::Error) -> Self {
        ReadError::Storage(e.into())
    }
}

impl From<codec::CorruptRecord> for ReadError {
    fn from(e: codec::CorruptRecord) -> Self {
        ReadError::Storage(e.into())
    }
}

/// Decides whether the requester may touch a key range. Built per request from the replicated
/// roles, so every replica decides alike.
pub trait Authorizer {
    fn permits(&self, perm: PermType, key: &[u8], range_end: &[u8]) -> bool;
}

/// Allows everything: for internal operations and clusters with role checks turned off.
pub struct AllowAll;

impl Authorizer for AllowAll {
    fn permits(&self, _: PermType, _: &[u8], _: &[u8]) -> bool {
        true
    }
}

/// Turns a stored value back into plaintext, for VALUE compares inside transactions.
pub trait ValueOpener {
    fn open(&self, key: &[u8], stored: &[u8]) -> std::result::Result<Vec<u8>, String>;
    /// The plaintext of a VALUE compare's operand, in the form the API layer put it in the
    /// request (sealed like values when it travels through the log).
    fn open_operand(&self, key: &[u8], operand: &[u8]) -> std::result::Result<Vec<u8>, String>;
}

/// Values are stored as given.
pub struct Plaintext;

impl ValueOpener for Plaintext {
    fn open(&self, _key: &[u8], stored: &[u8]) -> std::result::Result<Vec<u8>, String> {
        Ok(stored.to_vec())
    }
    fn open_operand(&self, _key: &[u8], operand: &[u8]) -> std::result::Result<Vec<u8>, String> {
        Ok(operand.to_vec())
    }
}

/// How many bytes of key-values a request may still materialize. Every range of a request
/// draws from one budget, so neither one huge range nor thousands of small ones can make a
/// member allocate without bound; with a shared `InflightBytes`, all reads of a member together
/// stay within its limit too (a budget gives back what it drew when dropped).
#[derive(Debug)]
pub struct Budget {
    limit: u64,
    used: u64,
    shared: Option<std::sync::Arc<InflightBytes>>,
}

/// Bytes all reads of a member hold at once, against a limit.
#[derive(Debug)]
pub struct InflightBytes {
    limit: u64,
    held: std::sync::atomic::AtomicU64,
}

impl InflightBytes {
    pub fn new(limit: u64) -> InflightBytes {
        InflightBytes {
            limit,
            held: std::sync::atomic::AtomicU64::new(0),
        }
    }

    pub fn held(&self) -> u64 {
        self.held.load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl Drop for Budget {
    fn drop(&mut self) {
        if let Some(s) = &self.shared {
            s.held.fetch_sub(
                self.used.min(s.held()),
                std::sync::atomic::Ordering::Relaxed,
            );
        }
    }
}

/// What a fetched key-value costs besides its bytes (the record's fields and bookkeeping).
const KV_OVERHEAD: u64 = 64;

impl Budget {
    pub fn new(limit: u64) -> Budget {
        Budget {
            limit,
            used: 0,
            shared: None,
        }
    }

    /// A budget of `limit` that also draws from `shared`.
    pub fn shared(limit: u64, shared: std::sync::Arc<InflightBytes>) -> Budget {
        Budget {
            limit,
            used: 0,
            shared: Some(shared),
        }
    }

    pub fn unlimited() -> Budget {
        Budget::new(u64::MAX)
    }

    /// Draws `bytes`; refuses once the total would pass the limit.
    pub fn take(&mut self, bytes: u64) -> std::result::Result<(), ApplyError> {
        if self.used.saturating_add(bytes) > self.limit {
            return Err(ApplyError::ResponseTooLarge(self.limit));
        }
        if let Some(s) = &self.shared {
            let before = s
                .held
                .fetch_add(bytes, std::sync::atomic::Ordering::Relaxed);
            if before.saturating_add(bytes) > s.limit {
                s.held
                    .fetch_sub(bytes, std::sync::atomic::Ordering::Relaxed);
                return Err(ApplyError::Busy);
            }
        }
        self.used = self.used.saturating_add(bytes);
        Ok(())
    }

    fn take_kv(&mut self, key: &[u8], value_len: usize) -> std::result::Result<(), ApplyError> {
        self.take(KV_OVERHEAD + key.len() as u64 + value_len as u64)
    }
}

/// Operations in a transaction over every nesting level, compares included.
pub fn txn_total_ops(t: &TxnRequest) -> usize {
    t.compare.len()
        + t.success
            .iter()
            .chain(t.failure.iter())
            .map(|op| match op {
                RequestOp::Txn(inner) => 1 + txn_total_ops(inner),
                _ => 1,
            })
            .sum::<usize>()
}

/// A change produced by a write, in the order it happened; what watchers receive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub deleted: bool,
    /// For a delete: the key with the delete's revision as mod_revision and no value.
    pub kv: KeyValue,
    pub prev_kv: Option<KeyValue>,
    /// False when the write did not read the previous version (`prev_kv` is then None even if
    /// there was one; a watcher that wants it reads it from history).
    pub prev_known: bool,
}

/// Where reads come from: a consistent snapshot, or the state inside a write transaction.
trait Source {
    fn latest(&self, key: &[u8]) -> Result<Option<Record>>;
    /// Live keys in `[start, end)` in key order; `f` returns false to stop.
    fn scan_latest(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        f: &mut dyn FnMut(&[u8], Record) -> Result<bool>,
    ) -> Result<()>;
    fn store(&self) -> &Store;
    fn read_opts(&self) -> ReadOptions;
}

/// A consistent, point-in-time view of the state machine for serving reads.
pub struct ReadView<'a> {
    store: &'a Store,
    snapshot: rocksdb::Snapshot<'a>,
    _gate: std::sync::RwLockReadGuard<'a, ()>,
    pub revision: i64,
    pub compacted: i64,
}

impl Store {
    /// Opens a consistent view of the current state.
    pub fn read_view(&self) -> Result<ReadView<'_>> {
        let gate = self.read_gate();
        let snapshot = self.db().snapshot();
        let meta = self.cf(CF_META)?;
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&snapshot);
        let revision = match self.db().get_cf_opt(meta, META_REVISION, &ro)? {
            Some(v) => codec::decode_i64(&v)?,
            None => INITIAL_REVISION,
        };
        let compacted = match self.db().get_cf_opt(meta, META_COMPACTED, &ro)? {
            Some(v) => codec::decode_i64(&v)?,
            None => 0,
        };
        Ok(ReadView {
            store: self,
            snapshot,
            _gate: gate,
            revision,
            compacted,
        })
    }

    /// A CRC-32 over every stored revision at or below `revision` (0: the current one), for
    /// comparing replicas. Returns (hash, compacted revision, current revision).
    pub fn hash_kv(&self, revision: i64) -> std::result::Result<(u32, i64, i64), ReadError> {
        let view = self.read_view()?;
        let upto = if revision <= 0 {
            view.revision
        } else {
            revision
        };
        if upto > view.revision {
            return Err(ApplyError::FutureRevision.into());
        }
        if upto < view.compacted {
            return Err(ApplyError::Compacted.into());
        }
        let hist = self.cf(CF_HISTORY)?;
        let mut h = crc32fast::Hasher::new();
        for item in self
            .db()
            .iterator_cf_opt(hist, view.read_opts(), IteratorMode::Start)
        {
            let (k, v) = item?;
            let (_, rev) = split_history_key(&k)?;
            if rev <= upto {
                h.update(&k);
                h.update(&v);
            }
        }
        Ok((h.finalize(), view.compacted, view.revision))
    }

    /// The current store revision and compacted revision.
    pub fn revisions(&self) -> Result<(i64, i64)> {
        let meta = self.cf(CF_META)?;
        let rev = match self.db().get_cf(meta, META_REVISION)? {
            Some(v) => codec::decode_i64(&v)?,
            None => INITIAL_REVISION,
        };
        let compacted = match self.db().get_cf(meta, META_COMPACTED)? {
            Some(v) => codec::decode_i64(&v)?,
            None => 0,
        };
        Ok((rev, compacted))
    }
}

impl Source for ReadView<'_> {
    fn latest(&self, key: &[u8]) -> Result<Option<Record>> {
        let cf = self.store.cf(CF_KV)?;
        match self
            .store
            .db()
            .get_pinned_cf_opt(cf, key, &self.read_opts())?
        {
            Some(raw) => Ok(Some(Record::decode(&raw)?)),
            None => Ok(None),
        }
    }

    fn scan_latest(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        f: &mut dyn FnMut(&[u8], Record) -> Result<bool>,
    ) -> Result<()> {
        scan_kv_cf(self.store, self.read_opts(), start, end, f)
    }

    fn store(&self) -> &Store {
        self.store
    }

    fn read_opts(&self) -> ReadOptions {
        let mut ro = ReadOptions::default();
        ro.set_snapshot(&self.snapshot);
        ro
    }
}

fn scan_kv_cf(
    store: &Store,
    mut ro: ReadOptions,
    start: &[u8],
    end: Option<&[u8]>,
    f: &mut dyn FnMut(&[u8], Record) -> Result<bool>,
) -> Result<()> {
    let cf = store.cf(CF_KV)?;
    if let Some(end) = end {
        if end <= start {
            return Ok(());
        }
        ro.set_iterate_upper_bound(end.to_vec());
    }
    let it = store
        .db()
        .iterator_cf_opt(cf, ro, IteratorMode::From(start, Direction::Forward));
    for item in it {
        let (k, v) = item?;
        if !f(&k, Record::decode(&v)?)? {
            break;
        }
    }
    Ok(())
}

impl ReadView<'_> {
    /// Serves a range request, with etcd's semantics for revisions, limits, filters and sorting.
    /// `opener` decrypts values only when sorting by value (results keep the stored form).
    pub fn range(
        &self,
        req: &RangeRequest,
        opener: &dyn ValueOpener,
        budget: &mut Budget,
    ) -> std::result::Result<RangeResult, ReadError> {
        range(self, self.revision, self.compacted, req, opener, budget)
    }

    /// Serves a transaction that writes nothing (see `txn_is_read_only`).
    pub fn read_txn(
        &self,
        txn: &TxnRequest,
        opener: &dyn ValueOpener,
        budget: &mut Budget,
    ) -> std::result::Result<TxnResult, ReadError> {
        if txn_total_ops(txn) > apply_limits::MAX_TXN_TOTAL_OPS {
            return Err(ApplyError::TooManyOps.into());
        }
        let mut path = Vec::new();
        txn_path(self, opener, txn, &mut path)?;
        let succeeded = path.first().copied().unwrap_or(false);
        let mut it = path[1..].iter();
        let at = ReadAt {
            src: self,
            opener,
            current: self.revision,
            compacted: self.compacted,
        };
        read_only_txn(&at, txn, &mut it, succeeded, budget)
    }

    /// The newest record of one key, if it is live.
    pub fn get(&self, key: &[u8]) -> Result<Option<KeyValue>> {
        Ok(self.latest(key)?.map(|r| r.into_kv(key.to_vec())))
    }

    /// Events with revision in `[from, to]`, in order, a page at a time for watchers catching
    /// up: at most about `max_bytes` of key-values (whole revisions are never split), and the
    /// revision to continue from when there is more. Only events `wanted` says yes to are kept
    /// (and looked up in history), so a watcher of a few keys reading a long history holds
    /// only its own events.
    pub fn events_page(
        &self,
        from: i64,
        to: i64,
        max_bytes: usize,
        wanted: &dyn Fn(&[u8]) -> bool,
    ) -> Result<EventPage> {
        let revs = self.store.cf(CF_REVISIONS)?;
        let hist = self.store.cf(CF_HISTORY)?;
        let mut ro = self.read_opts();
        ro.set_iterate_upper_bound(revision_key(to.saturating_add(1), 0).to_vec());
        let start = revision_key(from, 0);
        let it = self.store.db().iterator_cf_opt(
            revs,
            ro,
            IteratorMode::From(&start, Direction::Forward),
        );
        let mut out = Vec::new();
        let mut bytes = 0usize;
        // Keys scanned without keeping them also count, so a page ends in bounded time.
        let mut last_main = None;
        for (scanned, item) in it.enumerate() {
            let (k, user_key) = item?;
            let (main, _) = codec::split_revision_key(&k)?;
            if last_main != Some(main) {
                if bytes >= max_bytes || scanned >= PAGE_SCAN_LIMIT {
                    return Ok((out, Some(main)));
                }
                last_main = Some(main);
            }
            if !wanted(&user_key) {
                continue;
            }
            let hk = history_key(&user_key, main);
            let Some(raw) = self.store.db().get_cf_opt(hist, &hk, &self.read_opts())? else {
                continue;
            };
            let rec = Record::decode(&raw)?;
            let prev = self.history_before(&user_key, main)?;
            bytes += user_key.len()
                + rec.value.len()
                + prev.as_ref().map(|p| p.value.len()).unwrap_or(0)
                + 64;
            out.push((main, event_from(user_key.to_vec(), rec, prev, true)));
        }
        Ok((out, None))
    }

    /// The live record of `key` just before revision `rev`, if any.
    pub fn history_before(&self, key: &[u8], rev: i64) -> Result<Option<KeyValue>> {
        let Some(rec) = history_at(self, key, rev - 1)? else {
            return Ok(None);
        };
        Ok(Some(rec.into_kv(key.to_vec())))
    }

    /// Leases with their TTLs, as granted.
    pub fn leases(&self) -> Result<Vec<(i64, i64)>> {
        list_leases(self.store, self.read_opts())
    }

    /// Keys attached to a lease.
    pub fn lease_keys(&self, id: i64) -> Result<Vec<Vec<u8>>> {
        lease_keys(self.store, self.read_opts(), id)
    }

    /// Reads one state-machine metadata value in this view.
    pub fn meta(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let cf = self.store.cf(CF_META)?;
        Ok(self.store.db().get_cf_opt(cf, key, &self.read_opts())?)
    }

    /// Metadata entries whose key starts with `prefix`.
    pub fn meta_prefix(&self, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        meta_prefix(self.store, self.read_opts(), prefix)
    }

    /// Every stored record (live and historical) with its key, for re-encryption.
    pub fn scan_history(&self, f: &mut dyn FnMut(Vec<u8>, Record) -> Result<bool>) -> Result<()> {
        let hist = self.store.cf(CF_HISTORY)?;
        let it = self
            .store
            .db()
            .iterator_cf_opt(hist, self.read_opts(), IteratorMode::Start);
        for item in it {
            let (k, v) = item?;
            let (key, _) = split_history_key(&k)?;
            let rec = Record::decode(&v)?;
            if rec.tombstone {
                continue;
            }
            if !f(key, rec)? {
                break;
            }
        }
        Ok(())
    }
}

fn event_from(key: Vec<u8>, rec: Record, prev: Option<KeyValue>, prev_known: bool) -> Event {
    let deleted = rec.tombstone;
    let mut kv = rec.into_kv(key);
    if deleted {
        kv.create_revision = 0;
        kv.version = 0;
        kv.lease = 0;
        kv.value.clear();
    }
    Event {
        deleted,
        kv,
        prev_kv: prev,
        prev_known,
    }
}

pub(crate) fn meta_prefix(
    store: &Store,
    mut ro: ReadOptions,
    prefix: &[u8],
) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
    let cf = store.cf(CF_META)?;
    ro.set_iterate_upper_bound(prefix_end(prefix));
    let it = store
        .db()
        .iterator_cf_opt(cf, ro, IteratorMode::From(prefix, Direction::Forward));
    let mut out = Vec::new();
    for item in it {
        let (k, v) = item?;
        out.push((k.to_vec(), v.to_vec()));
    }
    Ok(out)
}

/// The record of `key` live at revision `rev` (None if absent or deleted then).
fn history_at<S: Source + ?Sized>(src: &S, key: &[u8], rev: i64) -> Result<Option<Record>> {
    if rev <= 0 {
        return Ok(None);
    }
    let store = src.store();
    let hist = store.cf(CF_HISTORY)?;
    let mut lower = Vec::new();
    codec::encode_key(key, &mut lower);
    let target = history_key(key, rev);
    let mut ro = src.read_opts();
    ro.set_iterate_lower_bound(lower);
    let mut it = store.db().raw_iterator_cf_opt(hist, ro);
    it.seek_for_prev(&target);
    if !it.valid() {
        it.status()?;
        return Ok(None);
    }
    let (Some(k), Some(v)) = (it.key(), it.value()) else {
        return Ok(None);
    };
    let (found, _) = split_history_key(k)?;
    if found != key {
        return Ok(None);
    }
    let rec = Record::decode(v)?;
    Ok(if rec.tombstone { None } else { Some(rec) })
}

/// Visits the keys live at revision `rev` in `[start, end)` using the history column family.
fn scan_history_at(
    src: &dyn Source,
    rev: i64,
    start: &[u8],
    end: Option<&[u8]>,
    f: &mut dyn FnMut(&[u8], Record) -> Result<bool>,
) -> Result<()> {
    let store = src.store();
    let hist = store.cf(CF_HISTORY)?;
    let mut lower = Vec::new();
    codec::encode_key(start, &mut lower);
    let mut ro = src.read_opts();
    if let Some(end) = end {
        if end <= start {
            return Ok(());
        }
        let mut upper = Vec::new();
        codec::encode_key(end, &mut upper);
        ro.set_iterate_upper_bound(upper);
    }
    let it = store
        .db()
        .iterator_cf_opt(hist, ro, IteratorMode::From(&lower, Direction::Forward));
    // Revisions of one key are adjacent and ascending: remember the newest one at or below
    // `rev` and emit it when the key changes.
    let mut current: Option<(Vec<u8>, Option<Record>)> = None;
    for item in it {
        let (k, v) = item?;
        let (key, krev) = split_history_key(&k)?;
        if current.as_ref().map(|(ck, _)| ck != &key).unwrap_or(true) {
            if let Some((ck, Some(rec))) = current.take()
                && !rec.tombstone
                && !f(&ck, rec)?
            {
                return Ok(());
            }
            current = Some((key, None));
        }
        if krev <= rev
            && let Some((_, best)) = current.as_mut()
        {
            *best = Some(Record::decode(&v)?);
        }
    }
    if let Some((ck, Some(rec))) = current
        && !rec.tombstone
    {
        f(&ck, rec)?;
    }
    Ok(())
}

fn range(
    src: &dyn Source,
    current: i64,
    compacted: i64,
    req: &RangeRequest,
    opener: &dyn ValueOpener,
    budget: &mut Budget,
) -> std::result::Result<RangeResult, ReadError> {
    let rev = if req.revision <= 0 {
        current
    } else {
        req.revision
    };
    if rev > current {
        return Err(ApplyError::FutureRevision.into());
    }
    if rev < compacted {
        return Err(ApplyError::Compacted.into());
    }
    let (start, end) = key_interval(&req.key, &req.range_end);
    let unbounded_fetch = req.sort_order != SortOrder::None
        || req.sort_target != SortTarget::Key
        || req.min_mod_revision != 0
        || req.max_mod_revision != 0
        || req.min_create_revision != 0
        || req.max_create_revision != 0;
    let fetch_limit = if unbounded_fetch || req.limit <= 0 {
        usize::MAX
    } else {
        req.limit as usize + 1
    };

    let mut kvs: Vec<KeyValue> = Vec::new();
    let mut count: i64 = 0;
    let mut over: Option<ApplyError> = None;
    let mut visit = |key: &[u8], rec: Record| -> Result<bool> {
        count += 1;
        if !req.count_only && kvs.len() < fetch_limit {
            let value_len = if req.keys_only { 0 } else { rec.value.len() };
            if let Err(e) = budget.take_kv(key, value_len) {
                over = Some(e);
                return Ok(false);
            }
            kvs.push(rec.into_kv(key.to_vec()));
        }
        Ok(true)
    };
    if rev == current {
        src.scan_latest(&start, end.as_deref(), &mut visit)?;
    } else {
        scan_history_at(src, rev, &start, end.as_deref(), &mut visit)?;
    }
    if let Some(e) = over {
        return Err(e.into());
    }

    let keep = |kv: &KeyValue| {
        (req.max_mod_revision == 0 || kv.mod_revision <= req.max_mod_revision)
            && (req.min_mod_revision == 0 || kv.mod_revision >= req.min_mod_revision)
            && (req.max_create_revision == 0 || kv.create_revision <= req.max_create_revision)
            && (req.min_create_revision == 0 || kv.create_revision >= req.min_create_revision)
    };
    kvs.retain(keep);

    let mut order = req.sort_order;
    if req.sort_target != SortTarget::Key && order == SortOrder::None {
        order = SortOrder::Ascend;
    }
    if order != SortOrder::None {
        // Stable sorts keep key order among equal targets, as etcd does.
        match req.sort_target {
            SortTarget::Key => kvs.sort_by(|a, b| a.key.cmp(&b.key)),
            SortTarget::Version => kvs.sort_by_key(|kv| kv.version),
            SortTarget::Create => kvs.sort_by_key(|kv| kv.create_revision),
            SortTarget::Mod => kvs.sort_by_key(|kv| kv.mod_revision),
            SortTarget::Value => {
                // Stored values are ciphertext: order by what they decrypt to.
                let mut keyed = Vec::with_capacity(kvs.len());
                for kv in kvs.drain(..) {
                    // A value this member cannot decrypt sorts by its stored bytes; returning
                    // it is then refused with DataLoss when the response is decrypted.
                    let plain = opener
                        .open(&kv.key, &kv.value)
                        .unwrap_or_else(|_| kv.value.clone());
                    keyed.push((plain, kv));
                }
                keyed.sort_by(|a, b| a.0.cmp(&b.0));
                kvs.extend(keyed.into_iter().map(|(_, kv)| kv));
            }
        }
        if order == SortOrder::Descend {
            kvs.reverse();
        }
    }
    let mut more = false;
    if req.limit > 0 && kvs.len() > req.limit as usize {
        kvs.truncate(req.limit as usize);
        more = true;
    }
    if req.keys_only {
        for kv in &mut kvs {
            kv.value.clear();
        }
    }
    Ok(RangeResult {
        kvs,
        more,
        count,
        revision: current,
    })
}

/// The state machine's counters, cached in memory by its single writer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Counters {
    pub revision: i64,
    pub compacted: i64,
}

impl Counters {
    pub fn load(store: &Store) -> Result<Counters> {
        let (revision, compacted) = store.revisions()?;
        Ok(Counters {
            revision,
            compacted,
        })
    }
}

/// Stages one write transaction (a Put, a DeleteRange or a Txn) into a write batch.
/// What a put needs to know about a key's current version, without its value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KeyMeta {
    pub create_revision: i64,
    pub version: i64,
    pub lease: i64,
}

/// Live keys' metadata in memory, so the common put (no `prev_kv`) reads nothing from disk.
/// Bounded: when full it starts over.
pub struct MetaCache {
    map: std::collections::HashMap<Vec<u8>, KeyMeta>,
    capacity: usize,
}

impl MetaCache {
    pub fn new(capacity: usize) -> MetaCache {
        MetaCache {
            map: std::collections::HashMap::new(),
            capacity,
        }
    }

    pub fn get(&self, key: &[u8]) -> Option<KeyMeta> {
        self.map.get(key).copied()
    }

    /// Records what a committed entry did to keys.
    pub fn update(&mut self, changes: Vec<(Vec<u8>, Option<KeyMeta>)>) {
        for (k, m) in changes {
            match m {
                Some(m) => {
                    if self.map.len() >= self.capacity && !self.map.contains_key(&k) {
                        self.map.clear();
                    }
                    self.map.insert(k, m);
                }
                None => {
                    self.map.remove(&k);
                }
            }
        }
    }

    pub fn clear(&mut self) {
        self.map.clear();
    }
}

/// Keys changed by entries staged earlier in the same batch, newest state per key.
pub type Overlay = BTreeMap<Vec<u8>, Option<Record>>;

/// Writes of several entries accumulated into one RocksDB write: what a state-machine batch
/// stages, and what later entries of the batch read through.
#[derive(Default)]
pub struct Staging {
    pub batch: WriteBatch,
    pub overlay: Overlay,
}

/// Stages one write transaction (a Put, a DeleteRange or a Txn) into a shared batch. A refusal
/// is always decided before anything is staged, so a refused entry leaves the batch untouched.
pub struct WriteTxn<'a> {
    store: &'a Store,
    meta: Option<&'a MetaCache>,
    /// Key metadata this transaction changes, for the cache once it commits.
    pub meta_changes: Vec<(Vec<u8>, Option<KeyMeta>)>,
    pub batch: &'a mut WriteBatch,
    /// Earlier entries of the batch.
    shared: &'a Overlay,
    /// Keys changed so far in this transaction: later operations read through it.
    overlay: Overlay,
    base: Counters,
    sub: u32,
    pub events: Vec<Event>,
    opener: &'a dyn ValueOpener,
}

impl Source for WriteTxn<'_> {
    fn latest(&self, key: &[u8]) -> Result<Option<Record>> {
        if let Some(o) = self.overlay.get(key).or_else(|| self.shared.get(key)) {
            return Ok(o.clone());
        }
        let cf = self.store.cf(CF_KV)?;
        match self.store.db().get_pinned_cf(cf, key)? {
            Some(raw) => Ok(Some(Record::decode(&raw)?)),
            None => Ok(None),
        }
    }

    fn scan_latest(
        &self,
        start: &[u8],
        end: Option<&[u8]>,
        f: &mut dyn FnMut(&[u8], Record) -> Result<bool>,
    ) -> Result<()> {
        if self.overlay.is_empty() && self.shared.is_empty() {
            return scan_kv_cf(self.store, ReadOptions::default(), start, end, f);
        }
        // Merge the database with the batch's and this transaction's own changes.
        let mut merged: BTreeMap<Vec<u8>, Record> = BTreeMap::new();
        scan_kv_cf(
            self.store,
            ReadOptions::default(),
            start,
            end,
            &mut |k, r| {
                merged.insert(k.to_vec(), r);
                Ok(true)
            },
        )?;
        for (k, v) in self.shared.iter().chain(self.overlay.iter()) {
            let inside = k.as_slice() >= start && end.map(|e| k.as_slice() < e).unwrap_or(true);
            if !inside {
                continue;
            }
            match v {
                Some(r) => {
                    merged.insert(k.clone(), r.clone());
                }
                None => {
                    merged.remove(k);
                }
            }
        }
        for (k, r) in merged {
            if !f(&k, r)? {
                break;
            }
        }
        Ok(())
    }

    fn store(&self) -> &Store {
        self.store
    }

    fn read_opts(&self) -> ReadOptions {
        ReadOptions::default()
    }
}

impl<'a> WriteTxn<'a> {
    pub fn new(
        store: &'a Store,
        base: Counters,
        opener: &'a dyn ValueOpener,
        staging: &'a mut Staging,
    ) -> WriteTxn<'a> {
        WriteTxn {
            store,
            meta: None,
            meta_changes: Vec::new(),
            batch: &mut staging.batch,
            shared: &staging.overlay,
            overlay: BTreeMap::new(),
            base,
            sub: 0,
            events: Vec::new(),
            opener,
        }
    }

    /// Lets puts take key metadata from `cache` instead of reading the key.
    pub fn with_meta_cache(mut self, cache: &'a MetaCache) -> WriteTxn<'a> {
        self.meta = Some(cache);
        self
    }

    /// The revision this transaction's writes get.
    fn write_revision(&self) -> i64 {
        self.base.revision + 1
    }

    /// Counters after this transaction commits.
    pub fn counters(&self) -> Counters {
        Counters {
            revision: if self.sub > 0 {
                self.write_revision()
            } else {
                self.base.revision
            },
            compacted: self.base.compacted,
        }
    }

    fn put_record(&mut self, key: &[u8], rec: Record, prev: Option<Record>) -> Result<()> {
        let prev_lease = prev.as_ref().map(|p| p.lease).unwrap_or(0);
        self.put_record_with_prev_lease(key, rec, prev, prev_lease, true)
    }

    /// Stages `rec` as the new version of `key`. `prev` is the version it replaces when known
    /// (watch events then carry it); `prev_lease` is its lease either way.
    fn put_record_with_prev_lease(
        &mut self,
        key: &[u8],
        rec: Record,
        prev: Option<Record>,
        prev_lease: i64,
        prev_known: bool,
    ) -> Result<()> {
        let rev = self.write_revision();
        let kv = self.store.cf(CF_KV)?;
        let hist = self.store.cf(CF_HISTORY)?;
        let revs = self.store.cf(CF_REVISIONS)?;
        let encoded = rec.encode();
        if rec.tombstone {
            self.batch.delete_cf(kv, key);
        } else {
            self.batch.put_cf(kv, key, &encoded);
        }
        self.batch.put_cf(hist, history_key(key, rev), &encoded);
        self.batch.put_cf(revs, revision_key(rev, self.sub), key);
        self.sub += 1;
        // Lease attachments follow the key.
        let old_lease = prev_lease;
        let new_lease = if rec.tombstone { 0 } else { rec.lease };
        if old_lease != new_lease {
            let meta = self.store.cf(CF_META)?;
            if old_lease != 0 {
                self.batch.delete_cf(meta, lease_key_entry(old_lease, key));
            }
            if new_lease != 0 {
                self.batch
                    .put_cf(meta, lease_key_entry(new_lease, key), b"");
            }
        }
        self.meta_changes.push((
            key.to_vec(),
            (!rec.tombstone).then_some(KeyMeta {
                create_revision: rec.create_revision,
                version: rec.version,
                lease: rec.lease,
            }),
        ));
        self.events.push(event_from(
            key.to_vec(),
            rec.clone(),
            prev.map(|p| p.into_kv(key.to_vec())),
            prev_known,
        ));
        self.overlay
            .insert(key.to_vec(), if rec.tombstone { None } else { Some(rec) });
        Ok(())
    }

    fn lease_exists(&self, id: i64) -> Result<bool> {
        let meta = self.store.cf(CF_META)?;
        Ok(self
            .store
            .db()
            .get_pinned_cf(meta, lease_entry(id))?
            .is_some())
    }

    /// Checks what etcd checks before applying a transaction: keys an `ignore_*` put needs exist,
    /// leases exist, read revisions are servable. Nothing is staged when this fails.
    fn check_op(
        &self,
        op: &RequestOp,
        path: &mut std::slice::Iter<'_, bool>,
    ) -> std::result::Result<(), ReadError> {
        match op {
            RequestOp::Put(p) => {
                if (p.ignore_value || p.ignore_lease) && self.latest(&p.key)?.is_none() {
                    return Err(ApplyError::KeyNotFound.into());
                }
                if p.lease != 0 && !self.lease_exists(p.lease)? {
                    return Err(ApplyError::LeaseNotFound.into());
                }
            }
            RequestOp::Range(r) => {
                if r.revision > self.base.revision {
                    return Err(ApplyError::FutureRevision.into());
                }
                if r.revision > 0 && r.revision < self.base.compacted {
                    return Err(ApplyError::Compacted.into());
                }
            }
            RequestOp::Delete(_) => {}
            RequestOp::Txn(t) => {
                let succeeded = path.next().copied().unwrap_or(false);
                let ops = if succeeded { &t.success } else { &t.failure };
                for op in ops {
                    self.check_op(op, path)?;
                }
            }
        }
        Ok(())
    }

    /// Bounds what the ranges on the chosen path will return before anything is staged: each
    /// range is measured against the state before this transaction, and every value the
    /// transaction puts is counted once more, since a later range may read it back.
    fn check_footprint(
        &self,
        ops: &[RequestOp],
        path: &mut std::slice::Iter<'_, bool>,
        budget: &mut Budget,
    ) -> std::result::Result<(), ReadError> {
        for op in ops {
            match op {
                RequestOp::Range(r) => {
                    if r.count_only {
                        continue;
                    }
                    let current = self.base.revision;
                    let (start, end) = key_interval(&r.key, &r.range_end);
                    let mut over = None;
                    let mut visit = |key: &[u8], rec: Record| -> Result<bool> {
                        let value_len = if r.keys_only { 0 } else { rec.value.len() };
                        if let Err(e) = budget.take_kv(key, value_len) {
                            over = Some(e);
                            return Ok(false);
                        }
                        Ok(true)
                    };
                    let rev = if r.revision <= 0 { current } else { r.revision };
                    if rev == current {
                        self.scan_latest(&start, end.as_deref(), &mut visit)?;
                    } else {
                        scan_history_at(self, rev, &start, end.as_deref(), &mut visit)?;
                    }
                    if let Some(e) = over {
                        return Err(e.into());
                    }
                }
                RequestOp::Put(p) => budget.take_kv(&p.key, p.value.len())?,
                RequestOp::Delete(d) if d.prev_kv => {
                    let (start, end) = key_interval(&d.key, &d.range_end);
                    let mut over = None;
                    self.scan_latest(&start, end.as_deref(), &mut |key, rec| {
                        if let Err(e) = budget.take_kv(key, rec.value.len()) {
                            over = Some(e);
                            return Ok(false);
                        }
                        Ok(true)
                    })?;
                    if let Some(e) = over {
                        return Err(e.into());
                    }
                }
                RequestOp::Delete(_) => {}
                RequestOp::Txn(t) => {
                    let succeeded = path.next().copied().unwrap_or(false);
                    let ops = if succeeded { &t.success } else { &t.failure };
                    self.check_footprint(ops, path, budget)?;
                }
            }
        }
        Ok(())
    }

    fn apply_put(&mut self, p: &PutRequest) -> Result<PutResult> {
        let rev = self.write_revision();
        // The common put needs only the key's metadata: take it from the cache when possible.
        if !p.prev_kv
            && !p.ignore_value
            && !p.ignore_lease
            && !self.overlay.contains_key(&p.key)
            && !self.shared.contains_key(&p.key)
            && let Some(m) = self.meta.and_then(|c| c.get(&p.key))
        {
            let rec = Record {
                tombstone: false,
                create_revision: m.create_revision,
                mod_revision: rev,
                version: m.version + 1,
                lease: p.lease,
                value: p.value.clone(),
            };
            let prev_lease = m.lease;
            self.put_record_with_prev_lease(&p.key, rec, None, prev_lease, false)?;
            return Ok(PutResult { prev_kv: None });
        }
        let prev = self.latest(&p.key)?;
        let value = if p.ignore_value {
            prev.as_ref().map(|r| r.value.clone()).unwrap_or_default()
        } else {
            p.value.clone()
        };
        let lease = if p.ignore_lease {
            prev.as_ref().map(|r| r.lease).unwrap_or(0)
        } else {
            p.lease
        };
        let rec = Record {
            tombstone: false,
            create_revision: prev.as_ref().map(|r| r.create_revision).unwrap_or(rev),
            mod_revision: rev,
            version: prev.as_ref().map(|r| r.version).unwrap_or(0) + 1,
            lease,
            value,
        };
        let prev_kv = if p.prev_kv {
            prev.clone().map(|r| r.into_kv(p.key.clone()))
        } else {
            None
        };
        self.put_record(&p.key, rec, prev)?;
        Ok(PutResult { prev_kv })
    }

    fn apply_delete(&mut self, d: &DeleteRequest) -> Result<DeleteResult> {
        let (start, end) = key_interval(&d.key, &d.range_end);
        let mut victims: Vec<(Vec<u8>, Record)> = Vec::new();
        self.scan_latest(&start, end.as_deref(), &mut |k, r| {
            victims.push((k.to_vec(), r));
            Ok(true)
        })?;
        let rev = self.write_revision();
        let mut prev_kvs = Vec::new();
        let deleted = victims.len() as i64;
        for (k, r) in victims {
            let tomb = Record {
                tombstone: true,
                create_revision: 0,
                mod_revision: rev,
                version: 0,
                lease: 0,
                value: Vec::new(),
            };
            if d.prev_kv {
                prev_kvs.push(r.clone().into_kv(k.clone()));
            }
            self.put_record(&k, tomb, Some(r))?;
        }
        Ok(DeleteResult { deleted, prev_kvs })
    }

    fn apply_ops(
        &mut self,
        ops: &[RequestOp],
        path: &mut std::slice::Iter<'_, bool>,
    ) -> std::result::Result<Vec<ResponseOp>, ReadError> {
        let mut out = Vec::with_capacity(ops.len());
        for op in ops {
            out.push(match op {
                RequestOp::Range(r) => {
                    let base = self.base;
                    // Reads see this transaction's earlier writes, at its revision.
                    let current = self.counters().revision;
                    // What ranges here may return was bounded before anything was staged
                    // (`check_footprint`), so this cannot fail half-way through the batch.
                    let mut res = range(
                        self,
                        current,
                        base.compacted,
                        r,
                        self.opener,
                        &mut Budget::unlimited(),
                    )?;
                    res.revision = current;
                    ResponseOp::Range(res)
                }
                RequestOp::Put(p) => ResponseOp::Put(self.apply_put(p)?),
                RequestOp::Delete(d) => ResponseOp::Delete(self.apply_delete(d)?),
                RequestOp::Txn(t) => {
                    let succeeded = path.next().copied().unwrap_or(false);
                    let ops = if succeeded { &t.success } else { &t.failure };
                    let responses = self.apply_ops(ops, path)?;
                    ResponseOp::Txn(TxnResult {
                        succeeded,
                        responses,
                    })
                }
            });
        }
        Ok(out)
    }

    /// Applies a transaction: compares, then the chosen branch. Nothing is staged on refusal.
    pub fn txn(&mut self, txn: &TxnRequest) -> std::result::Result<TxnResult, ReadError> {
        if txn_total_ops(txn) > apply_limits::MAX_TXN_TOTAL_OPS {
            return Err(ApplyError::TooManyOps.into());
        }
        let mut path = Vec::new();
        txn_path(self, self.opener, txn, &mut path)?;
        let succeeded = path.first().copied().unwrap_or(false);
        let ops = if succeeded {
            &txn.success
        } else {
            &txn.failure
        };
        {
            let mut it = path[1..].iter();
            for op in ops {
                self.check_op(op, &mut it)?;
            }
            let mut it = path[1..].iter();
            let mut budget = Budget::new(apply_limits::MAX_RESPONSE_BYTES);
            self.check_footprint(ops, &mut it, &mut budget)?;
        }
        let mut it = path[1..].iter();
        let responses = self.apply_ops(ops, &mut it)?;
        Ok(TxnResult {
            succeeded,
            responses,
        })
    }

    pub fn put(&mut self, p: &PutRequest) -> std::result::Result<PutResult, ReadError> {
        self.check_op(&RequestOp::Put(p.clone()), &mut [].iter())?;
        Ok(self.apply_put(p)?)
    }

    pub fn delete(&mut self, d: &DeleteRequest) -> std::result::Result<DeleteResult, ReadError> {
        Ok(self.apply_delete(d)?)
    }

    /// Drops history at or below `revision`, keeping for each key the record live at
    /// `revision`. Later reads below it get "required revision has been compacted".
    pub fn compact(&mut self, revision: i64) -> std::result::Result<(), ReadError> {
        if revision > self.base.revision {
            return Err(ApplyError::FutureRevision.into());
        }
        if revision <= self.base.compacted {
            return Err(ApplyError::Compacted.into());
        }
        let revs = self.store.cf(CF_REVISIONS)?;
        let hist = self.store.cf(CF_HISTORY)?;
        let mut ro = ReadOptions::default();
        ro.set_iterate_upper_bound(revision_key(revision + 1, 0).to_vec());
        let mut keys: BTreeSet<Vec<u8>> = BTreeSet::new();
        for item in self
            .store
            .db()
            .iterator_cf_opt(revs, ro, IteratorMode::Start)
        {
            let (_, key) = item?;
            keys.insert(key.to_vec());
        }
        for key in &keys {
            let mut lower = Vec::new();
            codec::encode_key(key, &mut lower);
            let upper = history_key(key, revision + 1);
            let mut ro = ReadOptions::default();
            ro.set_iterate_upper_bound(upper);
            let mut entries: Vec<(Vec<u8>, bool)> = Vec::new();
            for item in self.store.db().iterator_cf_opt(
                hist,
                ro,
                IteratorMode::From(&lower, Direction::Forward),
            ) {
                let (k, v) = item?;
                let rec = Record::decode(&v)?;
                entries.push((k.to_vec(), rec.tombstone));
            }
            // Keep only the newest record at or below the compaction point, and not even that
            // when it is a tombstone.
            if let Some((last, tomb)) = entries.pop() {
                if tomb {
                    self.batch.delete_cf(hist, &last);
                }
                for (k, _) in entries {
                    self.batch.delete_cf(hist, &k);
                }
            }
        }
        // The compaction revision itself stays in the index: its records are kept, and a
        // watcher may still start there (etcd allows a watch from the compacted revision).
        self.batch
            .delete_range_cf(revs, revision_key(0, 0), revision_key(revision, 0));
        self.base.compacted = revision;
        Ok(())
    }

    /// Grants a lease (expiry is the leader's business; here it is only recorded).
    pub fn lease_grant(&mut self, id: i64, ttl: i64) -> Result<bool> {
        if self.lease_exists(id)? {
            return Ok(false);
        }
        let meta = self.store.cf(CF_META)?;
        self.batch.put_cf(meta, lease_entry(id), ttl.to_be_bytes());
        Ok(true)
    }

    /// Revokes a lease, deleting the keys attached to it. Returns false if it did not exist.
    pub fn lease_revoke(&mut self, id: i64) -> Result<bool> {
        if !self.lease_exists(id)? {
            return Ok(false);
        }
        let keys = lease_keys(self.store, ReadOptions::default(), id)?;
        for k in keys {
            if let Some(prev) = self.latest(&k)? {
                let rev = self.write_revision();
                let tomb = Record {
                    tombstone: true,
                    create_revision: 0,
                    mod_revision: rev,
                    version: 0,
                    lease: 0,
                    value: Vec::new(),
                };
                self.put_record(&k, tomb, Some(prev))?;
            }
        }
        let meta = self.store.cf(CF_META)?;
        self.batch.delete_cf(meta, lease_entry(id));
        Ok(true)
    }

    /// Replaces stored ciphertext in place where it is still what was read. Returns how many
    /// records were replaced.
    pub fn reencrypt(&mut self, items: &[Reencrypted]) -> Result<u64> {
        let kv = self.store.cf(CF_KV)?;
        let hist = self.store.cf(CF_HISTORY)?;
        let mut replaced = 0;
        for it in items {
            let hk = history_key(&it.key, it.mod_revision);
            let Some(raw) = self.store.db().get_cf(hist, &hk)? else {
                continue;
            };
            let mut rec = Record::decode(&raw)?;
            if rec.tombstone || rec.value != it.old_value {
                continue;
            }
            rec.value = it.new_value.clone();
            let encoded = rec.encode();
            self.batch.put_cf(hist, &hk, &encoded);
            if let Some(live) = self.latest(&it.key)?
                && live.mod_revision == it.mod_revision
            {
                self.batch.put_cf(kv, &it.key, &encoded);
            }
            replaced += 1;
        }
        Ok(replaced)
    }

    /// Ends the transaction: the counters after it, its events, and its changes for the
    /// batch's overlay.
    pub fn finish(self) -> (Counters, Vec<Event>, Overlay) {
        (self.counters(), self.events, self.overlay)
    }
}

/// Stages the revision counters, if they changed from `before`.
pub fn stage_counters(
    store: &Store,
    batch: &mut WriteBatch,
    before: Counters,
    after: Counters,
) -> Result<()> {
    let meta = store.cf(CF_META)?;
    if after.revision != before.revision {
        batch.put_cf(meta, META_REVISION, after.revision.to_be_bytes());
    }
    if after.compacted != before.compacted {
        batch.put_cf(meta, META_COMPACTED, after.compacted.to_be_bytes());
    }
    Ok(())
}

impl Record {
    fn absent() -> Record {
        Record {
            tombstone: false,
            create_revision: 0,
            mod_revision: 0,
            version: 0,
            lease: 0,
            value: Vec::new(),
        }
    }
}

/// Evaluates every compare on the chosen path before anything is written, as etcd does:
/// nested transactions compare against the state before the outer transaction.
fn txn_path(
    src: &dyn Source,
    opener: &dyn ValueOpener,
    txn: &TxnRequest,
    out: &mut Vec<bool>,
) -> std::result::Result<(), ReadError> {
    let ok = compares_hold(src, opener, &txn.compare)?;
    out.push(ok);
    let ops = if ok { &txn.success } else { &txn.failure };
    for op in ops {
        if let RequestOp::Txn(t) = op {
            txn_path(src, opener, t, out)?;
        }
    }
    Ok(())
}

fn compares_hold(
    src: &dyn Source,
    opener: &dyn ValueOpener,
    compares: &[Compare],
) -> std::result::Result<bool, ReadError> {
    for c in compares {
        if !compare_holds(src, opener, c)? {
            return Ok(false);
        }
    }
    Ok(true)
}

fn compare_holds(
    src: &dyn Source,
    opener: &dyn ValueOpener,
    c: &Compare,
) -> std::result::Result<bool, ReadError> {
    let mut records: Vec<(Vec<u8>, Record)> = Vec::new();
    if c.range_end.is_empty() {
        if let Some(r) = src.latest(&c.key)? {
            records.push((c.key.clone(), r));
        }
    } else {
        let (start, end) = key_interval(&c.key, &c.range_end);
        src.scan_latest(&start, end.as_deref(), &mut |k, r| {
            records.push((k.to_vec(), r));
            Ok(true)
        })?;
    }
    if records.is_empty() {
        // A missing key compares as zero revisions and version; a VALUE compare on a missing
        // key always fails (there is no way to express "no value").
        if matches!(c.target, CompareTarget::Value(_)) {
            return Ok(false);
        }
        return Ok(compare_one(c, &Record::absent(), None, None));
    }
    let operand = match &c.target {
        CompareTarget::Value(v) => Some(
            opener
                .open_operand(&c.key, v)
                .map_err(|e| ReadError::Refused(ApplyError::Encryption(e)))?,
        ),
        _ => None,
    };
    for (k, r) in records {
        let plain = match &c.target {
            CompareTarget::Value(_) => Some(
                opener
                    .open(&k, &r.value)
                    .map_err(|e| ReadError::Refused(ApplyError::Encryption(e)))?,
            ),
            _ => None,
        };
        if !compare_one(c, &r, plain.as_deref(), operand.as_deref()) {
            return Ok(false);
        }
    }
    Ok(true)
}

/// What a read-only transaction reads from: a view, at its current and compacted revisions.
struct ReadAt<'a> {
    src: &'a dyn Source,
    opener: &'a dyn ValueOpener,
    current: i64,
    compacted: i64,
}

/// Serves a transaction without writes from a read view.
fn read_only_txn(
    at: &ReadAt<'_>,
    txn: &TxnRequest,
    path: &mut std::slice::Iter<'_, bool>,
    succeeded: bool,
    budget: &mut Budget,
) -> std::result::Result<TxnResult, ReadError> {
    let ops = if succeeded {
        &txn.success
    } else {
        &txn.failure
    };
    let mut responses = Vec::with_capacity(ops.len());
    for op in ops {
        responses.push(match op {
            RequestOp::Range(r) => ResponseOp::Range(range(
                at.src,
                at.current,
                at.compacted,
                r,
                at.opener,
                budget,
            )?),
            RequestOp::Txn(t) => {
                let inner = path.next().copied().unwrap_or(false);
                ResponseOp::Txn(read_only_txn(at, t, path, inner, budget)?)
            }
            RequestOp::Put(_) | RequestOp::Delete(_) => {
                return Err(ReadError::Storage(StorageError::Other(
                    "write inside a read-only transaction".into(),
                )));
            }
        });
    }
    Ok(TxnResult {
        succeeded,
        responses,
    })
}

fn compare_one(c: &Compare, r: &Record, plain: Option<&[u8]>, operand: Option<&[u8]>) -> bool {
    use std::cmp::Ordering;
    let ord = match &c.target {
        CompareTarget::Version(v) => r.version.cmp(v),
        CompareTarget::Create(v) => r.create_revision.cmp(v),
        CompareTarget::Mod(v) => r.mod_revision.cmp(v),
        CompareTarget::Lease(v) => r.lease.cmp(v),
        CompareTarget::Value(v) => plain
            .unwrap_or(&r.value)
            .cmp(operand.unwrap_or(v.as_slice())),
    };
    match c.result {
        CompareResult::Equal => ord == Ordering::Equal,
        CompareResult::NotEqual => ord != Ordering::Equal,
        CompareResult::Greater => ord == Ordering::Greater,
        CompareResult::Less => ord == Ordering::Less,
    }
}

fn lease_entry(id: i64) -> Vec<u8> {
    let mut k = LEASE_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k
}

fn lease_key_entry(id: i64, key: &[u8]) -> Vec<u8> {
    let mut k = LEASE_KEY_PREFIX.to_vec();
    k.extend_from_slice(&id.to_be_bytes());
    k.extend_from_slice(key);
    k
}

fn list_leases(store: &Store, ro: ReadOptions) -> Result<Vec<(i64, i64)>> {
    let mut out = Vec::new();
    for (k, v) in meta_prefix(store, ro, LEASE_PREFIX)? {
        let id = codec::decode_i64(&k[LEASE_PREFIX.len()..])?;
        out.push((id, codec::decode_i64(&v)?));
    }
    Ok(out)
}

fn lease_keys(store: &Store, ro: ReadOptions, id: i64) -> Result<Vec<Vec<u8>>> {
    let mut prefix = LEASE_KEY_PREFIX.to_vec();
    prefix.extend_from_slice(&id.to_be_bytes());
    Ok(meta_prefix(store, ro, &prefix)?
        .into_iter()
        .map(|(k, _)| k[prefix.len()..].to_vec())
        .collect())
}

/// Permissions a request needs, for every key it may touch (both branches of a transaction,
/// all compares), checked against an authorizer. Returns false at the first denial.
pub fn authorize_command(auth: &dyn Authorizer, cmd: &Command) -> bool {
    match cmd {
        Command::Put(p) => authorize_op(auth, &RequestOp::Put(p.clone())),
        Command::Delete(d) => authorize_op(auth, &RequestOp::Delete(d.clone())),
        Command::Txn(t) => authorize_op(auth, &RequestOp::Txn(t.clone())),
        _ => true,
    }
}

/// Same as `authorize_command` for one operation (reads included).
pub fn authorize_op(auth: &dyn Authorizer, op: &RequestOp) -> bool {
    match op {
        RequestOp::Range(r) => auth.permits(PermType::Read, &r.key, &r.range_end),
        RequestOp::Put(p) => {
            auth.permits(PermType::Write, &p.key, b"")
                && (!p.prev_kv || auth.permits(PermType::Read, &p.key, b""))
        }
        RequestOp::Delete(d) => {
            auth.permits(PermType::Write, &d.key, &d.range_end)
                && (!d.prev_kv || auth.permits(PermType::Read, &d.key, &d.range_end))
        }
        RequestOp::Txn(t) => {
            t.compare
                .iter()
                .all(|c| auth.permits(PermType::Read, &c.key, &c.range_end))
                && t.success.iter().all(|o| authorize_op(auth, o))
                && t.failure.iter().all(|o| authorize_op(auth, o))
        }
    }
}

/// True if the transaction writes nothing on any path.
pub fn txn_is_read_only(t: &TxnRequest) -> bool {
    t.success.iter().chain(t.failure.iter()).all(|op| match op {
        RequestOp::Range(_) => true,
        RequestOp::Txn(inner) => txn_is_read_only(inner),
        _ => false,
    })
}

#[cfg(test)]
mod tests;
