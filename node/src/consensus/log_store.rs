//! openraft's log storage on our RocksDB store: entries in the `raft_log` column family, the vote
//! and purge point in `raft_state`. Appends return at once and are acknowledged to openraft only
//! after the fsync that covers them (group commit), so the leader never waits on each flush.

use super::types::{Entry, LogId, TypeConfig, Vote, decode, encode};
use crate::storage::Store;
use openraft::entry::RaftEntry;
use openraft::storage::{IOFlushed, LogState, RaftLogReader, RaftLogStorage};
use openraft::{OptionalSend, RaftTypeConfig};
use std::collections::VecDeque;
use std::fmt::Debug;
use std::io;
use std::ops::{Bound, RangeBounds};
use std::sync::{Arc, RwLock};

const VOTE: &[u8] = b"vote";
const PURGED: &[u8] = b"last_purged";
const COMMITTED: &[u8] = b"committed";

/// Recent entries kept decoded in memory: replication and the state machine read what was just
/// appended, and should not pay for a RocksDB scan and a decode each time.
#[derive(Default)]
struct Recent {
    entries: VecDeque<Entry>,
}

/// Entries cached at most.
const RECENT_ENTRIES: usize = 8192;

impl Recent {
    fn first_index(&self) -> Option<u64> {
        self.entries.front().map(|e| e.index())
    }

    /// The cached entries in `[start, end)`, if the cache holds all of them.
    fn get(&self, start: u64, end: u64) -> Option<Vec<Entry>> {
        let first = self.first_index()?;
        let last = self.entries.back()?.index();
        if start < first {
            return None;
        }
        let end = end.min(last + 1);
        if start >= end {
            return Some(Vec::new());
        }
        let from = (start - first) as usize;
        let to = (end - first) as usize;
        Some(self.entries.range(from..to).cloned().collect())
    }

    fn append(&mut self, new: &[Entry]) {
        for e in new {
            // Keep the cache contiguous: a gap or a rewrite restarts it.
            match self.entries.back() {
                Some(last) if last.index() + 1 == e.index() => {}
                _ => self.entries.clear(),
            }
            self.entries.push_back(e.clone());
        }
        while self.entries.len() > RECENT_ENTRIES {
            self.entries.pop_front();
        }
    }

    fn truncate_from(&mut self, from: u64) {
        while self
            .entries
            .back()
            .map(|e| e.index() >= from)
            .unwrap_or(false)
        {
            self.entries.pop_back();
        }
    }

    fn purge_upto(&mut self, upto: u64) {
        while self
            .entries
            .front()
            .map(|e| e.index() <= upto)
            .unwrap_or(false)
        {
            self.entries.pop_front();
        }
    }
}

#[derive(Clone)]
pub struct LogStore {
    store: Store,
    recent: Arc<RwLock<Recent>>,
}

impl LogStore {
    pub fn new(store: Store) -> LogStore {
        LogStore {
            store,
            recent: Arc::default(),
        }
    }

    fn last_purged(&self) -> io::Result<Option<LogId>> {
        match self.store.get_raft_state(PURGED)? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }
}

fn bounds(range: &impl RangeBounds<u64>) -> (u64, u64) {
    let start = match range.start_bound() {
        Bound::Included(s) => *s,
        Bound::Excluded(s) => s.saturating_add(1),
        Bound::Unbounded => 0,
    };
    let end = match range.end_bound() {
        Bound::Included(e) => e.saturating_add(1),
        Bound::Excluded(e) => *e,
        Bound::Unbounded => u64::MAX,
    };
    (start, end)
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + OptionalSend>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, io::Error> {
        let (start, end) = bounds(&range);
        if let Ok(recent) = self.recent.read()
            && let Some(hit) = recent.get(start, end)
        {
            return Ok(hit);
        }
        self.store
            .read_log(start, end)?
            .iter()
            .map(|(_, b)| decode::<Entry>(b))
            .collect()
    }

    async fn read_vote(&mut self) -> Result<Option<Vote>, io::Error> {
        match self.store.get_raft_state(VOTE)? {
            Some(b) => Ok(Some(decode(&b)?)),
            None => Ok(None),
        }
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, io::Error> {
        let last_purged_log_id = self.last_purged()?;
        let last_log_id = match self.store.last_log()? {
            Some((_, b)) => Some(decode::<Entry>(&b)?.log_id()),
            None => last_purged_log_id,
        };
        Ok(LogState {
            last_purged_log_id,
            last_log_id,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote) -> Result<(), io::Error> {
        self.store.put_raft_state(VOTE, &encode(vote)?, true)?;
        Ok(())
    }

    async fn save_committed(&mut self, committed: Option<LogId>) -> Result<(), io::Error> {
        // Not synced: a lost value only means re-applying from the last durable point, which the
        // state machine's own applied marker makes exact.
        self.store
            .put_raft_state(COMMITTED, &encode(&committed)?, false)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId>, io::Error> {
        match self.store.get_raft_state(COMMITTED)? {
            Some(b) => decode(&b),
            None => Ok(None),
        }
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: IOFlushed<TypeConfig>,
    ) -> Result<(), io::Error>
    where
        I: IntoIterator<Item = <TypeConfig as RaftTypeConfig>::Entry> + OptionalSend,
        I::IntoIter: OptionalSend,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let mut encoded = Vec::with_capacity(entries.len());
        for e in &entries {
            encoded.push((e.index(), encode(e)?));
        }
        self.store
            .append_log(encoded.iter().map(|(i, b)| (*i, b.as_slice())))?;
        if let Ok(mut recent) = self.recent.write() {
            recent.append(&entries);
        }
        self.store.after_sync(Box::new(move |res| {
            callback.io_completed(res.map_err(io::Error::other));
        }));
        Ok(())
    }

    async fn truncate_after(&mut self, last_log_id: Option<LogId>) -> Result<(), io::Error> {
        let from = last_log_id.map(|l| l.index() + 1).unwrap_or(0);
        if let Ok(mut recent) = self.recent.write() {
            recent.truncate_from(from);
        }
        self.store.truncate_log_from(from)?;
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId) -> Result<(), io::Error> {
        if let Ok(mut recent) = self.recent.write() {
            recent.purge_upto(log_id.index());
        }
        self.store
            .purge_log_upto(log_id.index(), PURGED, &encode(&log_id)?)?;
        Ok(())
    }
}
