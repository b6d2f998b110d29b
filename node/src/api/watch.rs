//! etcd's Watch service. Applied writes are broadcast to every watch stream; a watcher that
//! starts in the past, falls behind, or misses changes (a snapshot install) catches up from the
//! revision index in storage, so it sees every event exactly once and in order.

use super::{Api, convert, status};
use crate::consensus::EventSink;
use crate::model::{PermType, key_interval};
use crate::storage::mvcc::{Authorizer, Event};
use futures::{Stream, StreamExt};
use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::etcdserverpb::watch_server::Watch;
use raftkv_proto::mvccpb;
use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{broadcast, mpsc};
use tonic::{Request, Response, Status, Streaming};

/// Events of one applied write (empty: "state replaced, re-read from storage").
pub struct Notification {
    pub revision: i64,
    pub events: Vec<Event>,
}

/// Fans applied writes out to watch streams.
#[derive(Clone)]
pub struct WatchHub {
    tx: broadcast::Sender<Arc<Notification>>,
}

impl Default for WatchHub {
    fn default() -> Self {
        let (tx, _) = broadcast::channel(4096);
        WatchHub { tx }
    }
}

impl WatchHub {
    /// The sink the state machine calls after each applied write.
    pub fn sink(&self) -> EventSink {
        let tx = self.tx.clone();
        Arc::new(move |revision, events: &[Event]| {
            if tx.receiver_count() == 0 {
                return;
            }
            let _ = tx.send(Arc::new(Notification {
                revision,
                events: events.to_vec(),
            }));
        })
    }
}

struct Watcher {
    start: Vec<u8>,
    end: Option<Vec<u8>>,
    prev_kv: bool,
    no_put: bool,
    no_delete: bool,
    progress_notify: bool,
    /// The next revision this watcher has not seen yet.
    next_rev: i64,
    sent_since_tick: bool,
}

impl Watcher {
    fn matches(&self, e: &Event) -> bool {
        let k = e.kv.key.as_slice();
        if k < self.start.as_slice()
            || self
                .end
                .as_ref()
                .map(|end| k >= end.as_slice())
                .unwrap_or(false)
        {
            return false;
        }
        !(e.deleted && self.no_delete || !e.deleted && self.no_put)
    }
}

pub struct WatchService {
    api: Api,
    progress_interval: Duration,
}

impl WatchService {
    pub fn new(api: Api, progress_interval: Duration) -> WatchService {
        WatchService {
            api,
            progress_interval,
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

/// Largest number of events per response when catching up from storage.
const REPLAY_BATCH: usize = 1000;

struct Session {
    api: Api,
    principal: crate::model::Principal,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    out: mpsc::Sender<Result<pb::WatchResponse, Status>>,
}

impl Session {
    fn current(&self) -> i64 {
        self.api
            .consensus
            .store()
            .revisions()
            .map(|(r, _)| r)
            .unwrap_or(0)
    }

    async fn send(&self, resp: pb::WatchResponse) -> bool {
        self.out.send(Ok(resp)).await.is_ok()
    }

    fn event_out(&self, e: &Event, with_prev: bool) -> Result<mvccpb::Event, Status> {
        let open = |k: &[u8], v: Vec<u8>| self.api.open(k, v);
        Ok(mvccpb::Event {
            r#type: if e.deleted {
                mvccpb::event::EventType::Delete as i32
            } else {
                mvccpb::event::EventType::Put as i32
            },
            kv: Some(convert::kv_out(e.kv.clone(), &open)?),
            prev_kv: match (&e.prev_kv, with_prev) {
                (Some(p), true) => Some(convert::kv_out(p.clone(), &open)?),
                _ => None,
            },
        })
    }

    async fn create(&mut self, c: pb::WatchCreateRequest) -> bool {
        let key = if c.key.is_empty() { vec![0] } else { c.key };
        let (start, end) = key_interval(&key, &c.range_end);
        let (current, compacted) = self.api.consensus.store().revisions().unwrap_or((0, 0));
        let header = self.api.header(current);
        let permitted =
            self.api
                .grants(&self.principal)
                .permits(PermType::Read, &key, &c.range_end);
        if !permitted {
            self.api.metrics.permission_denials.inc();
            return self
                .send(pb::WatchResponse {
                    header,
                    watch_id: c.watch_id,
                    created: true,
                    canceled: true,
                    cancel_reason: status::PERMISSION_DENIED.into(),
                    ..Default::default()
                })
                .await;
        }
        let id = if c.watch_id != 0 {
            if self.watchers.contains_key(&c.watch_id) {
                return self
                    .send(pb::WatchResponse {
                        header,
                        watch_id: -1,
                        created: true,
                        canceled: true,
                        cancel_reason: "etcdserver: duplicate watch ID".into(),
                        ..Default::default()
                    })
                    .await;
            }
            c.watch_id
        } else {
            while self.watchers.contains_key(&self.next_id) {
                self.next_id += 1;
            }
            let id = self.next_id;
            self.next_id += 1;
            id
        };
        let mut no_put = false;
        let mut no_delete = false;
        for f in &c.filters {
            match pb::watch_create_request::FilterType::try_from(*f) {
                Ok(pb::watch_create_request::FilterType::Noput) => no_put = true,
                Ok(pb::watch_create_request::FilterType::Nodelete) => no_delete = true,
                Err(_) => {}
            }
        }
        if !self
            .send(pb::WatchResponse {
                header,
                watch_id: id,
                created: true,
                ..Default::default()
            })
            .await
        {
            return false;
        }
        if c.start_revision > 0 && c.start_revision < compacted {
            return self
                .send(pb::WatchResponse {
                    header,
                    watch_id: id,
                    canceled: true,
                    compact_revision: compacted,
                    cancel_reason: "mvcc: required revision has been compacted".into(),
                    ..Default::default()
                })
                .await;
        }
        let next_rev = if c.start_revision > 0 {
            c.start_revision
        } else {
            current + 1
        };
        self.watchers.insert(
            id,
            Watcher {
                start,
                end,
                prev_kv: c.prev_kv,
                no_put,
                no_delete,
                progress_notify: c.progress_notify,
                next_rev,
                sent_since_tick: false,
            },
        );
        if next_rev <= current {
            return self.catch_up(id, current).await;
        }
        true
    }

    /// Sends watcher `id` the stored events from its next revision through `upto`.
    async fn catch_up(&mut self, id: i64, upto: i64) -> bool {
        let Some(w) = self.watchers.get(&id) else {
            return true;
        };
        let from = w.next_rev;
        if from > upto {
            return true;
        }
        let compacted = self
            .api
            .consensus
            .store()
            .revisions()
            .map(|(_, c)| c)
            .unwrap_or(0);
        if from < compacted {
            self.watchers.remove(&id);
            return self
                .send(pb::WatchResponse {
                    header: self.api.header(upto),
                    watch_id: id,
                    canceled: true,
                    compact_revision: compacted,
                    cancel_reason: "mvcc: required revision has been compacted".into(),
                    ..Default::default()
                })
                .await;
        }
        let events = match self.api.consensus.store().read_view() {
            Ok(view) => view.events_between(from, upto),
            Err(e) => Err(e),
        };
        let events = match events {
            Ok(ev) => ev,
            Err(e) => {
                tracing::error!(error = %e, "reading events for a watcher");
                return self
                    .cancel(id, &format!("etcdserver: reading history failed: {e}"))
                    .await;
            }
        };
        let mut batch = Vec::new();
        let mut last_rev = from;
        for (rev, e) in events {
            let w = &self.watchers[&id];
            if !w.matches(&e) {
                continue;
            }
            match self.event_out(&e, w.prev_kv) {
                Ok(ev) => batch.push(ev),
                Err(s) => return self.cancel(id, s.message()).await,
            }
            last_rev = rev;
            if batch.len() >= REPLAY_BATCH
                && !self
                    .send_events(id, last_rev, std::mem::take(&mut batch))
                    .await
            {
                return false;
            }
        }
        if !batch.is_empty() && !self.send_events(id, last_rev, batch).await {
            return false;
        }
        if let Some(w) = self.watchers.get_mut(&id) {
            w.next_rev = upto + 1;
        }
        true
    }

    async fn send_events(&mut self, id: i64, rev: i64, events: Vec<mvccpb::Event>) -> bool {
        if let Some(w) = self.watchers.get_mut(&id) {
            w.sent_since_tick = true;
        }
        self.send(pb::WatchResponse {
            header: self.api.header(rev),
            watch_id: id,
            events,
            ..Default::default()
        })
        .await
    }

    async fn cancel(&mut self, id: i64, reason: &str) -> bool {
        self.watchers.remove(&id);
        self.send(pb::WatchResponse {
            header: self.api.header(self.current()),
            watch_id: id,
            canceled: true,
            cancel_reason: reason.to_string(),
            ..Default::default()
        })
        .await
    }

    async fn deliver(&mut self, n: &Notification) -> bool {
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            let Some(w) = self.watchers.get(&id) else {
                continue;
            };
            if n.revision < w.next_rev {
                continue;
            }
            if n.events.is_empty() || n.revision > w.next_rev {
                // A gap (or a replaced state): read what was missed from storage.
                if !self.catch_up(id, n.revision).await {
                    return false;
                }
                continue;
            }
            let mut out = Vec::new();
            let wants_prev = w.prev_kv;
            for e in n.events.iter().filter(|e| w.matches(e)) {
                let filled;
                let e = if wants_prev && !e.prev_known {
                    // The write did not read the previous version: take it from history.
                    let prev = self
                        .api
                        .consensus
                        .store()
                        .read_view()
                        .and_then(|v| v.history_before(&e.kv.key, e.kv.mod_revision))
                        .unwrap_or(None);
                    filled = Event {
                        prev_kv: prev,
                        prev_known: true,
                        ..e.clone()
                    };
                    &filled
                } else {
                    e
                };
                match self.event_out(e, wants_prev) {
                    Ok(ev) => out.push(ev),
                    Err(s) => {
                        if !self.cancel(id, s.message()).await {
                            return false;
                        }
                        break;
                    }
                }
            }
            if let Some(w) = self.watchers.get_mut(&id) {
                w.next_rev = n.revision + 1;
            } else {
                continue;
            }
            if !out.is_empty() && !self.send_events(id, n.revision, out).await {
                return false;
            }
        }
        true
    }

    async fn resync_all(&mut self) -> bool {
        let current = self.current();
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            if !self.catch_up(id, current).await {
                return false;
            }
        }
        true
    }

    async fn progress_tick(&mut self) -> bool {
        let current = self.current();
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            let Some(w) = self.watchers.get_mut(&id) else {
                continue;
            };
            let due = w.progress_notify && !w.sent_since_tick;
            w.sent_since_tick = false;
            if due
                && !self
                    .send(pb::WatchResponse {
                        header: self.api.header(current),
                        watch_id: id,
                        ..Default::default()
                    })
                    .await
            {
                return false;
            }
        }
        true
    }
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let principal = Api::principal(&req)?;
        let mut input = req.into_inner();
        let (out, rx) = mpsc::channel(256);
        let mut updates = self.api.watches.tx.subscribe();
        let mut session = Session {
            api: self.api.clone(),
            principal,
            watchers: BTreeMap::new(),
            next_id: 0,
            out,
        };
        let mut tick = tokio::time::interval(self.progress_interval);
        tick.tick().await;
        tokio::spawn(async move {
            loop {
                let alive = tokio::select! {
                    msg = input.next() => match msg {
                        Some(Ok(m)) => {
                            use pb::watch_request::RequestUnion as U;
                            match m.request_union {
                                Some(U::CreateRequest(c)) => session.create(c).await,
                                Some(U::CancelRequest(c))
                                    if session.watchers.remove(&c.watch_id).is_some() =>
                                {
                                    session.send(pb::WatchResponse {
                                        header: session.api.header(session.current()),
                                        watch_id: c.watch_id,
                                        canceled: true,
                                        ..Default::default()
                                    }).await
                                }
                                Some(U::CancelRequest(_)) => true,
                                Some(U::ProgressRequest(_)) => {
                                    session.send(pb::WatchResponse {
                                        header: session.api.header(session.current()),
                                        watch_id: -1,
                                        ..Default::default()
                                    }).await
                                }
                                None => true,
                            }
                        }
                        _ => false,
                    },
                    n = updates.recv() => match n {
                        Ok(n) => session.deliver(&n).await,
                        Err(broadcast::error::RecvError::Lagged(_)) => session.resync_all().await,
                        Err(broadcast::error::RecvError::Closed) => false,
                    },
                    _ = tick.tick() => session.progress_tick().await,
                };
                if !alive {
                    break;
                }
            }
        });
        Ok(Response::new(Box::pin(
            tokio_stream::wrappers::ReceiverStream::new(rx),
        )))
    }
}
