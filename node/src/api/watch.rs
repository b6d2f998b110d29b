//! etcd's Watch service.
//!
//! Applied writes go into a ring of recent notifications shared by every watch stream of the
//! member, bounded in bytes and entries. Each stream reads the ring at its own pace; a stream
//! that falls behind the ring (a slow or stalled client), a watcher that starts in the past, and
//! every watcher after a snapshot install catch up from the history in storage instead, a
//! bounded page at a time and filtered by the watched range. So one client can cost the member
//! only its own small queue, never a copy of every write, and every watcher still sees every
//! event exactly once and in order.
//!
//! A stream ends with `Unauthenticated` when its token expires or its user is deleted or
//! changes password; a watcher whose range the caller may no longer read is cancelled with
//! etcd's permission-denied reason as soon as the roles change.

use super::{Api, convert, status};
use crate::auth::Caller;
use crate::consensus::EventSink;
use crate::model::{PermType, key_interval};
use crate::storage::auth_state::AuthSnapshot;
use crate::storage::mvcc::{Authorizer, Event};
use futures::{Stream, StreamExt};
use raftkv_proto::etcdserverpb as pb;
use raftkv_proto::etcdserverpb::watch_server::Watch;
use raftkv_proto::mvccpb;
use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tonic::{Request, Response, Status, Streaming};

/// Events of one applied write.
pub struct Notification {
    pub revision: i64,
    pub events: Vec<Event>,
    bytes: usize,
}

/// Bytes of recent notifications a member keeps for its watch streams, all streams together.
pub const RING_BYTES: usize = 64 << 20;
/// Notifications kept at most, however small.
const RING_ENTRIES: usize = 16_384;
/// Responses queued per stream before the stream stops reading the ring (and later catches up
/// from storage).
const OUT_QUEUE: usize = 16;
/// Key-value bytes per response when catching up from storage.
const PAGE_BYTES: usize = 1 << 20;
/// Notifications a stream handles before it looks at its requests again.
const DRAIN_STEP: usize = 256;

struct Ring {
    buf: VecDeque<Arc<Notification>>,
    bytes: usize,
    /// Every revision at or below this must be read from storage (it left the ring, or the
    /// state was replaced by a snapshot).
    evicted_upto: i64,
}

struct Hub {
    ring: Mutex<Ring>,
    latest: watch::Sender<i64>,
    held: Option<prometheus::IntGauge>,
    waits: Mutex<Waits>,
}

/// One-shot waits for a change of a key, or of any key in a range (locks and elections wait
/// this way, so that a write elsewhere costs them nothing).
#[derive(Default)]
struct Waits {
    keys: std::collections::HashMap<Vec<u8>, Vec<tokio::sync::oneshot::Sender<()>>>,
    ranges: Vec<(Vec<u8>, Vec<u8>, tokio::sync::oneshot::Sender<()>)>,
    registered: usize,
}

impl Waits {
    fn is_empty(&self) -> bool {
        self.keys.is_empty() && self.ranges.is_empty()
    }

    /// Wakes whoever waits on a key of `events` (everyone, when the state was replaced).
    fn fire(&mut self, events: &[Event]) {
        if events.is_empty() {
            for (_, txs) in self.keys.drain() {
                for tx in txs {
                    let _ = tx.send(());
                }
            }
            for (_, _, tx) in self.ranges.drain(..) {
                let _ = tx.send(());
            }
            return;
        }
        for e in events {
            if let Some(txs) = self.keys.remove(&e.kv.key) {
                for tx in txs {
                    let _ = tx.send(());
                }
            }
        }
        if !self.ranges.is_empty() {
            let (fired, kept): (Vec<_>, Vec<_>) = std::mem::take(&mut self.ranges)
                .into_iter()
                .partition(|(start, end, _)| {
                    events.iter().any(|e| {
                        e.kv.key.as_slice() >= start.as_slice()
                            && (end.as_slice() == [0] || e.kv.key.as_slice() < end.as_slice())
                    })
                });
            self.ranges = kept;
            for (_, _, tx) in fired {
                let _ = tx.send(());
            }
        }
    }

    /// Drops waits whose waiter gave up, now and then.
    fn prune(&mut self) {
        self.registered += 1;
        if !self.registered.is_multiple_of(1024) {
            return;
        }
        self.keys.retain(|_, txs| {
            txs.retain(|tx| !tx.is_closed());
            !txs.is_empty()
        });
        self.ranges.retain(|(_, _, tx)| !tx.is_closed());
    }
}

/// Fans applied writes out to watch streams.
#[derive(Clone)]
pub struct WatchHub {
    inner: Arc<Hub>,
}

impl Default for WatchHub {
    fn default() -> Self {
        WatchHub::new(None)
    }
}

/// What a stream reads next.
enum Read {
    Notifications(Vec<Arc<Notification>>),
    /// Revisions through this one are no longer in the ring: read them from storage.
    Storage(i64),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl WatchHub {
    /// A hub reporting the bytes it holds in `held`.
    pub fn new(held: Option<prometheus::IntGauge>) -> WatchHub {
        let (latest, _) = watch::channel(0);
        WatchHub {
            inner: Arc::new(Hub {
                ring: Mutex::new(Ring {
                    buf: VecDeque::new(),
                    bytes: 0,
                    evicted_upto: 0,
                }),
                latest,
                held,
                waits: Mutex::new(Waits::default()),
            }),
        }
    }

    /// The sink the state machine calls after each applied write (no events: the state was
    /// replaced by a snapshot).
    pub fn sink(&self) -> EventSink {
        let hub = self.clone();
        Arc::new(move |revision, events: &[Event]| hub.publish(revision, events))
    }

    fn publish(&self, revision: i64, events: &[Event]) {
        let held = {
            let mut ring = lock(&self.inner.ring);
            if events.is_empty() {
                ring.buf.clear();
                ring.bytes = 0;
                ring.evicted_upto = ring.evicted_upto.max(revision);
            } else if self.inner.latest.receiver_count() == 0 {
                // Nobody watches: remember only that these revisions are not in the ring.
                ring.evicted_upto = ring.evicted_upto.max(revision);
            } else {
                let bytes = events
                    .iter()
                    .map(|e| {
                        64 + e.kv.key.len()
                            + e.kv.value.len()
                            + e.prev_kv.as_ref().map(|p| p.value.len()).unwrap_or(0)
                    })
                    .sum();
                ring.buf.push_back(Arc::new(Notification {
                    revision,
                    events: events.to_vec(),
                    bytes,
                }));
                ring.bytes += bytes;
                while ring.bytes > RING_BYTES || ring.buf.len() > RING_ENTRIES {
                    let Some(old) = ring.buf.pop_front() else {
                        break;
                    };
                    ring.bytes -= old.bytes;
                    ring.evicted_upto = ring.evicted_upto.max(old.revision);
                }
            }
            ring.bytes
        };
        if let Some(g) = &self.inner.held {
            g.set(held as i64);
        }
        {
            let mut waits = lock(&self.inner.waits);
            if !waits.is_empty() {
                waits.fire(events);
            }
        }
        self.inner.latest.send_replace(revision);
    }

    /// Notifications from revision `cursor` on (at most `max`), or where storage must serve.
    fn read(&self, cursor: i64, max: usize) -> Read {
        let ring = lock(&self.inner.ring);
        if cursor <= ring.evicted_upto {
            return Read::Storage(ring.evicted_upto);
        }
        let start = ring.buf.partition_point(|n| n.revision < cursor);
        Read::Notifications(ring.buf.iter().skip(start).take(max).cloned().collect())
    }

    fn subscribe(&self) -> watch::Receiver<i64> {
        self.inner.latest.subscribe()
    }

    /// Changes whenever a write is applied (its value: the newest revision).
    pub fn changes(&self) -> watch::Receiver<i64> {
        self.subscribe()
    }

    /// Resolves at the next applied change of `key` (or when the state is replaced). Register
    /// before checking the key, so that a change in between is not missed.
    pub fn key_changed(&self, key: &[u8]) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut waits = lock(&self.inner.waits);
        waits.prune();
        waits.keys.entry(key.to_vec()).or_default().push(tx);
        rx
    }

    /// Resolves at the next applied change of a key in `[start, end)`.
    pub fn range_changed(&self, start: &[u8], end: &[u8]) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let mut waits = lock(&self.inner.waits);
        waits.prune();
        waits.ranges.push((start.to_vec(), end.to_vec(), tx));
        rx
    }

    /// Bytes of notifications held now (for tests and metrics).
    pub fn held_bytes(&self) -> usize {
        lock(&self.inner.ring).bytes
    }
}

struct Watcher {
    /// As the client gave it, for permission checks.
    key: Vec<u8>,
    range_end: Vec<u8>,
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
    fn covers(&self, k: &[u8]) -> bool {
        k >= self.start.as_slice()
            && self
                .end
                .as_ref()
                .map(|end| k < end.as_slice())
                .unwrap_or(true)
    }

    fn matches(&self, e: &Event) -> bool {
        self.covers(&e.kv.key) && !(e.deleted && self.no_delete || !e.deleted && self.no_put)
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

struct Session {
    api: Api,
    caller: Caller,
    watchers: BTreeMap<i64, Watcher>,
    next_id: i64,
    out: mpsc::Sender<Result<pb::WatchResponse, Status>>,
    /// The next revision this stream reads from the hub: every notification below it has been
    /// handed to every watcher that was synced.
    cursor: i64,
    /// The auth state permissions were last checked against.
    auth_seen: Arc<AuthSnapshot>,
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

    /// The newest revision this stream has delivered everything up to, for every watcher:
    /// what a progress notification may claim.
    fn safe_revision(&self) -> i64 {
        self.watchers
            .values()
            .map(|w| w.next_rev - 1)
            .fold(self.cursor - 1, i64::min)
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
                .grants(&self.caller.principal)
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
        if self.watchers.len() >= self.api.limits.max_watchers_per_stream {
            return self
                .send(pb::WatchResponse {
                    header,
                    watch_id: c.watch_id,
                    created: true,
                    canceled: true,
                    cancel_reason: format!(
                        "etcdserver: this stream already has {} watchers, its limit \
                         (--max-watchers-per-stream); open another stream",
                        self.watchers.len()
                    ),
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
            return self.send(compacted_response(header, id, compacted)).await;
        }
        let next_rev = if c.start_revision > 0 {
            c.start_revision
        } else {
            current + 1
        };
        self.watchers.insert(
            id,
            Watcher {
                key: key.clone(),
                range_end: c.range_end.clone(),
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

    /// Sends watcher `id` the stored events from its next revision through `upto`, a bounded
    /// page at a time.
    async fn catch_up(&mut self, id: i64, upto: i64) -> bool {
        loop {
            let Some(w) = self.watchers.get(&id) else {
                return true;
            };
            let from = w.next_rev;
            if from > upto {
                return true;
            }
            // A fresh view per page: a view pins the state machine's snapshot installs and
            // cannot be held while the client is slow to read.
            let page = self.api.consensus.store().read_view().and_then(|view| {
                if from < view.compacted {
                    return Ok(Err(view.compacted));
                }
                view.events_page(from, upto, PAGE_BYTES, &|k| w.covers(k))
                    .map(Ok)
            });
            let (events, next) = match page {
                Ok(Ok(p)) => p,
                Ok(Err(compacted)) => {
                    self.watchers.remove(&id);
                    let header = self.api.header(upto);
                    return self.send(compacted_response(header, id, compacted)).await;
                }
                Err(e) => {
                    tracing::error!(error = %e, "reading events for a watcher");
                    return self
                        .cancel(id, &format!("etcdserver: reading history failed: {e}"))
                        .await;
                }
            };
            let mut batch = Vec::new();
            let mut last_rev = from;
            for (rev, e) in &events {
                let w = &self.watchers[&id];
                if !w.matches(e) {
                    continue;
                }
                match self.event_out(e, w.prev_kv) {
                    Ok(ev) => batch.push(ev),
                    Err(s) => return self.cancel(id, s.message()).await,
                }
                last_rev = *rev;
            }
            let resume = next.unwrap_or(upto + 1);
            if let Some(w) = self.watchers.get_mut(&id) {
                w.next_rev = resume;
            }
            if !batch.is_empty() && !self.send_events(id, last_rev, batch).await {
                return false;
            }
            if next.is_none() {
                return true;
            }
        }
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

    /// After a change of users or roles: ends the stream if its token no longer counts, and
    /// cancels every watcher whose range the caller may no longer read.
    async fn recheck_permissions(&mut self) -> bool {
        let auth = self.api.executor.auth().get();
        if Arc::ptr_eq(&auth, &self.auth_seen) {
            return true;
        }
        self.auth_seen = auth.clone();
        if !auth.token_current(&self.caller.principal) {
            let _ = self
                .out
                .send(Err(Status::unauthenticated(status::INVALID_TOKEN)))
                .await;
            return false;
        }
        let grants = auth.grants(Some(&self.caller.principal));
        let revoked: Vec<i64> = self
            .watchers
            .iter()
            .filter(|(_, w)| !grants.permits(PermType::Read, &w.key, &w.range_end))
            .map(|(id, _)| *id)
            .collect();
        for id in revoked {
            self.api.metrics.permission_denials.inc();
            if !self.cancel(id, status::PERMISSION_DENIED).await {
                return false;
            }
        }
        true
    }

    async fn deliver(&mut self, n: &Notification) -> bool {
        if !self.recheck_permissions().await {
            return false;
        }
        // Each event is decrypted (and its previous version looked up) once for every watcher
        // of this stream that wants it, not once per watcher.
        let mut converted: Vec<[Option<mvccpb::Event>; 2]> = vec![[None, None]; n.events.len()];
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            let Some(w) = self.watchers.get(&id) else {
                continue;
            };
            if n.revision < w.next_rev {
                continue;
            }
            if n.revision > w.next_rev {
                // A gap: read what was missed from storage.
                if !self.catch_up(id, n.revision).await {
                    return false;
                }
                continue;
            }
            let mut out = Vec::new();
            let wants_prev = w.prev_kv;
            let mut failed = None;
            for (i, e) in n.events.iter().enumerate() {
                if !w.matches(e) {
                    continue;
                }
                let slot = &mut converted[i][usize::from(wants_prev)];
                if slot.is_none() {
                    match self.convert(e, wants_prev) {
                        Ok(ev) => *slot = Some(ev),
                        Err(s) => {
                            failed = Some(s);
                            break;
                        }
                    }
                }
                if let Some(ev) = slot {
                    out.push(ev.clone());
                }
            }
            if let Some(s) = failed {
                if !self.cancel(id, s.message()).await {
                    return false;
                }
                continue;
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

    /// An applied event in the wire form; with `with_prev`, the previous version is read from
    /// history when the write did not carry it.
    fn convert(&self, e: &Event, with_prev: bool) -> Result<mvccpb::Event, Status> {
        if with_prev && !e.prev_known {
            let prev = self
                .api
                .consensus
                .store()
                .read_view()
                .and_then(|v| v.history_before(&e.kv.key, e.kv.mod_revision))
                .unwrap_or(None);
            let filled = Event {
                prev_kv: prev,
                prev_known: true,
                ..e.clone()
            };
            return self.event_out(&filled, true);
        }
        self.event_out(e, with_prev)
    }

    /// Handles what the hub holds from the cursor on, up to `max` notifications. Watchers
    /// whose revisions left the ring catch up from storage.
    async fn drain(&mut self, max: usize) -> bool {
        let mut handled = 0;
        while handled < max {
            match self.api.watches.read(self.cursor, 64) {
                Read::Storage(upto) => {
                    if !self.recheck_permissions().await {
                        return false;
                    }
                    let ids: Vec<i64> = self.watchers.keys().copied().collect();
                    for id in ids {
                        if !self.catch_up(id, upto).await {
                            return false;
                        }
                    }
                    self.cursor = self.cursor.max(upto + 1);
                    handled += 1;
                }
                Read::Notifications(v) if v.is_empty() => break,
                Read::Notifications(v) => {
                    for n in v {
                        if !self.deliver(&n).await {
                            return false;
                        }
                        self.cursor = n.revision + 1;
                        handled += 1;
                    }
                }
            }
        }
        true
    }

    /// Answers a progress request: first everything published so far is delivered, so the
    /// revision it names never runs ahead of events the stream has yet to send.
    async fn progress(&mut self) -> bool {
        let target = *self.api.watches.subscribe().borrow();
        while self.cursor <= target {
            let before = self.cursor;
            if !self.drain(DRAIN_STEP).await {
                return false;
            }
            if self.cursor == before {
                break;
            }
        }
        let rev = self.safe_revision();
        self.send(pb::WatchResponse {
            header: self.api.header(rev),
            watch_id: -1,
            ..Default::default()
        })
        .await
    }

    async fn progress_tick(&mut self) -> bool {
        let safe = self.safe_revision();
        let ids: Vec<i64> = self.watchers.keys().copied().collect();
        for id in ids {
            let Some(w) = self.watchers.get_mut(&id) else {
                continue;
            };
            let due = w.progress_notify && !w.sent_since_tick;
            w.sent_since_tick = false;
            let rev = safe.min(w.next_rev - 1);
            if due
                && !self
                    .send(pb::WatchResponse {
                        header: self.api.header(rev),
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

    async fn handle(&mut self, m: pb::WatchRequest) -> bool {
        use pb::watch_request::RequestUnion as U;
        match m.request_union {
            Some(U::CreateRequest(c)) => self.create(c).await,
            Some(U::CancelRequest(c)) if self.watchers.remove(&c.watch_id).is_some() => {
                self.send(pb::WatchResponse {
                    header: self.api.header(self.current()),
                    watch_id: c.watch_id,
                    canceled: true,
                    ..Default::default()
                })
                .await
            }
            Some(U::CancelRequest(_)) => true,
            Some(U::ProgressRequest(_)) => self.progress().await,
            None => true,
        }
    }
}

/// Cancels watcher `id`: the revision it needs was compacted.
fn compacted_response(
    header: Option<pb::ResponseHeader>,
    id: i64,
    compacted: i64,
) -> pb::WatchResponse {
    pb::WatchResponse {
        header,
        watch_id: id,
        canceled: true,
        compact_revision: compacted,
        cancel_reason: "mvcc: required revision has been compacted".into(),
        ..Default::default()
    }
}

/// When a credential that expires at `exp` (seconds since the epoch) stops being valid.
fn expiry_instant(exp: Option<u64>, leeway: Duration) -> Option<tokio::time::Instant> {
    let exp = exp?;
    let now = crate::auth::jwt::now_secs();
    let left = Duration::from_secs(exp.saturating_sub(now)) + leeway;
    tokio::time::Instant::now().checked_add(left)
}

#[tonic::async_trait]
impl Watch for WatchService {
    type WatchStream = WatchStream;

    async fn watch(
        &self,
        req: Request<Streaming<pb::WatchRequest>>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        let caller = Api::caller(&req)?;
        let require_leader = Api::requires_leader(req.metadata());
        let mut input = req.into_inner();
        let (out, rx) = mpsc::channel(OUT_QUEUE);
        let stopped = self.api.stopped();
        let election_timeout = self.api.consensus.election_timeout();
        let mut leader_check = tokio::time::interval(election_timeout / 4);
        let mut latest = self.api.watches.subscribe();
        let expires = expiry_instant(caller.expires_at, self.api.authn.leeway());
        let mut session = Session {
            auth_seen: self.api.executor.auth().get(),
            api: self.api.clone(),
            caller,
            watchers: BTreeMap::new(),
            next_id: 0,
            out,
            cursor: 0,
        };
        session.cursor = session.current() + 1;
        let mut tick = tokio::time::interval(self.progress_interval);
        tick.tick().await;
        tokio::spawn(async move {
            let expiry = async {
                match expires {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::pin!(expiry);
            tokio::pin!(stopped);
            // With `hasleader`, the stream ends once this member has had no leader for an
            // election timeout (etcd's "no leader" for leader-required watches).
            let mut leaderless_since: Option<tokio::time::Instant> = None;
            loop {
                let behind = session.cursor <= *latest.borrow_and_update();
                let alive = tokio::select! {
                    msg = input.next() => match msg {
                        Some(Ok(m)) => session.handle(m).await,
                        _ => false,
                    },
                    changed = latest.changed(), if !behind => changed.is_ok(),
                    // Draining runs as a handler, never as a branch future: a branch future is
                    // dropped when another branch wins, and a delivery cut off half-way would
                    // send some events twice.
                    _ = std::future::ready(()), if behind => session.drain(DRAIN_STEP).await,
                    _ = tick.tick() => session.progress_tick().await,
                    _ = &mut expiry => {
                        let _ = session
                            .out
                            .send(Err(Status::unauthenticated(status::INVALID_TOKEN)))
                            .await;
                        false
                    }
                    _ = &mut stopped => {
                        let _ = session.out.send(Err(Status::unavailable(status::STOPPED))).await;
                        false
                    }
                    _ = leader_check.tick(), if require_leader => {
                        if session.api.consensus.has_leader() {
                            leaderless_since = None;
                            true
                        } else {
                            let since = *leaderless_since.get_or_insert_with(tokio::time::Instant::now);
                            if since.elapsed() >= election_timeout {
                                let _ = session
                                    .out
                                    .send(Err(Status::unavailable(status::NO_LEADER)))
                                    .await;
                                false
                            } else {
                                true
                            }
                        }
                    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::KeyValue;

    fn event(key: &str, bytes: usize) -> Event {
        Event {
            deleted: false,
            kv: KeyValue {
                key: key.into(),
                value: vec![0; bytes],
                ..Default::default()
            },
            prev_kv: None,
            prev_known: true,
        }
    }

    #[test]
    fn the_ring_is_bounded_in_bytes_and_readers_behind_it_go_to_storage() {
        let hub = WatchHub::default();
        let _reader = hub.subscribe();
        for rev in 2..200 {
            hub.publish(rev, &[event("k", 1 << 20)]);
        }
        assert!(hub.held_bytes() <= RING_BYTES);
        match hub.read(2, 10) {
            Read::Storage(upto) => assert!((2..199).contains(&upto)),
            Read::Notifications(_) => panic!("revision 2 cannot still be in the ring"),
        }
        match hub.read(199, 10) {
            Read::Notifications(v) => assert_eq!(v.len(), 1),
            Read::Storage(_) => panic!("the newest revision is in the ring"),
        }
        // A snapshot install sends everyone to storage.
        hub.publish(300, &[]);
        assert!(matches!(hub.read(250, 10), Read::Storage(300)));
        assert_eq!(hub.held_bytes(), 0);
    }
}
