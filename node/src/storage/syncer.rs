//! Group commit for the write-ahead log: callers register a callback after writing; one thread
//! fsyncs the WAL once for everything that queued up meanwhile, then runs all their callbacks.

use super::Inner;
use std::sync::mpsc::{Receiver, Sender, channel};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

/// Runs with the outcome of the fsync that covered the caller's writes.
pub type SyncCallback = Box<dyn FnOnce(Result<(), String>) + Send>;

/// Observes the duration of each fsync (for the fsync latency histogram).
pub type SyncObserver = Arc<dyn Fn(Duration, usize) + Send + Sync>;

pub struct WalSyncer {
    tx: Mutex<Sender<SyncCallback>>,
    observer: Arc<Mutex<Option<SyncObserver>>>,
}

impl WalSyncer {
    pub(super) fn new() -> (WalSyncer, Receiver<SyncCallback>) {
        let (tx, rx) = channel();
        (
            WalSyncer {
                tx: Mutex::new(tx),
                observer: Arc::new(Mutex::new(None)),
            },
            rx,
        )
    }

    pub(super) fn start(&self, inner: Weak<Inner>, rx: Receiver<SyncCallback>) {
        let observer = self.observer.clone();
        let spawned = std::thread::Builder::new()
            .name("raftkv-wal-sync".into())
            .spawn(move || run(inner, rx, observer));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the WAL sync thread; appends will sync inline");
        }
    }

    pub(super) fn set_observer(&self, obs: SyncObserver) {
        if let Ok(mut o) = self.observer.lock() {
            *o = Some(obs);
        }
    }

    pub(super) fn submit(&self, cb: SyncCallback, inline: impl FnOnce() -> Result<(), String>) {
        let sent = match self.tx.lock() {
            Ok(tx) => tx.send(cb).map_err(|e| e.0),
            Err(_) => Err(cb),
        };
        // The thread is gone (only at shutdown or if it could not start): sync inline.
        if let Err(cb) = sent {
            cb(inline());
        }
    }
}

fn run(inner: Weak<Inner>, rx: Receiver<SyncCallback>, observer: Arc<Mutex<Option<SyncObserver>>>) {
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while let Ok(more) = rx.try_recv() {
            batch.push(more);
        }
        let Some(inner) = inner.upgrade() else {
            for cb in batch {
                cb(Err("database closed".into()));
            }
            return;
        };
        let started = Instant::now();
        let result = inner.db.flush_wal(true).map_err(|e| e.to_string());
        drop(inner);
        if let Ok(guard) = observer.lock()
            && let Some(obs) = guard.as_ref()
        {
            obs(started.elapsed(), batch.len());
        }
        if let Err(e) = &result {
            tracing::error!(error = %e, "WAL fsync failed");
        }
        for cb in batch {
            cb(result.clone());
        }
    }
}
