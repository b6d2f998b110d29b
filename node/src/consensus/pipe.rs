//! One long-lived stream per peer for the small exchanges that happen many times a second and
//! may simply be asked again: heartbeats (openraft sends each as its own one-request
//! replication stream) and followers' read-index requests. As separate calls each cost an
//! HTTP/2 stream (headers both ways, a task and a route on the receiver); under linearizable
//! reads, where every batch of reads is a heartbeat round, that was most of the peer traffic's
//! CPU. On the pipe each is one small frame each way.
//!
//! Nothing here is ordered or retried: answers come back as they finish, and a caller whose
//! answer does not come (the stream broke, the time ran out) gets an error and asks again, as
//! it would after a failed call. A peer that has no pipe (an older version, during a rolling
//! upgrade) is remembered for a while and its callers use the separate calls.

use super::ProposeError;
use super::network::PeerChannels;
use super::types::{NodeId, TypeConfig, Vote, decode, encode};
use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use openraft::raft::{AppendEntriesRequest, StreamAppendResult};
use raftkv_proto::peer::Frame;
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How many exchanges a receiver works on at once per pipe; more wait in the stream.
pub(super) const IN_FLIGHT: usize = 1024;

/// How long a peer without a pipe is left alone before the pipe is tried again.
const UNSUPPORTED_FOR: Duration = Duration::from_secs(30);

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum PipeRequest {
    /// A heartbeat: an AppendEntries with no entries, answered by the follower's openraft.
    Heartbeat(AppendEntriesRequest<TypeConfig>),
    /// A follower asks the leader for a read index, with its id and the vote its Raft core held
    /// once every read of the batch had arrived (see `Consensus::read_index_for`).
    ReadIndex(Option<(NodeId, Vote)>),
}

#[derive(Debug, Serialize, Deserialize)]
pub(super) enum PipeAnswer {
    /// What openraft answered to the heartbeat, or the fatal error that stopped it.
    Heartbeat(Result<Vec<StreamAppendResult<TypeConfig>>, String>),
    ReadIndex(Result<u64, ProposeError>),
}

/// On the wire: the sender's id for the exchange, then the request or its answer.
pub(super) type WireRequest = (u64, PipeRequest);
pub(super) type WireAnswer = (u64, PipeAnswer);

#[derive(Debug, Clone)]
pub(super) enum PipeError {
    /// The peer runs a version without the pipe: use the separate calls.
    Unsupported,
    /// No answer: the stream could not be opened or broke, or the time ran out.
    Failed(String),
}

type Waiter = oneshot::Sender<Result<PipeAnswer, PipeError>>;

/// Callers waiting for an answer, by id; `None` once the stream is over.
type Pending = Arc<Mutex<Option<HashMap<u64, Waiter>>>>;

struct Stream {
    tx: mpsc::UnboundedSender<Frame>,
    pending: Pending,
    next_id: AtomicU64,
    /// When this stream last carried an answer: a stream that stays silent while calls time
    /// out is abandoned, so a stalled one does not hold every later call.
    last_answer: Mutex<Instant>,
}

/// The open pipes of this member, by peer URL.
#[derive(Default)]
pub(super) struct Pipes {
    open: Mutex<HashMap<String, Arc<Stream>>>,
    unsupported: Mutex<HashMap<String, Instant>>,
}

/// Takes a caller's id off the pending table however the call ends (answered, timed out, or
/// dropped by its own caller's timeout).
struct Unregister<'a> {
    pending: &'a Pending,
    id: u64,
}

impl Drop for Unregister<'_> {
    fn drop(&mut self) {
        if let Ok(mut p) = self.pending.lock()
            && let Some(map) = p.as_mut()
        {
            map.remove(&self.id);
        }
    }
}

impl Pipes {
    /// Forgets every stream (new TLS settings): the next call opens a new one.
    pub(super) fn clear(&self) {
        if let Ok(mut open) = self.open.lock() {
            open.clear();
        }
        if let Ok(mut u) = self.unsupported.lock() {
            u.clear();
        }
    }

    /// Sends `request` to the peer at `url` and waits up to `timeout` for its answer.
    pub(super) async fn call(
        &self,
        channels: &PeerChannels,
        url: &str,
        request: PipeRequest,
        timeout: Duration,
    ) -> Result<PipeAnswer, PipeError> {
        if self.is_unsupported(url) {
            return Err(PipeError::Unsupported);
        }
        let stream = self.stream_to(channels, url)?;
        let id = stream.next_id.fetch_add(1, Ordering::Relaxed);
        let data = encode(&(id, request)).map_err(|e| PipeError::Failed(e.to_string()))?;
        let (tx, rx) = oneshot::channel();
        {
            let mut pending = stream
                .pending
                .lock()
                .map_err(|_| PipeError::Failed("pipe table poisoned".into()))?;
            let Some(map) = pending.as_mut() else {
                drop(pending);
                self.drop_stream(url, &stream);
                return Err(PipeError::Failed("the pipe to the peer closed".into()));
            };
            if stream.tx.unbounded_send(Frame { data }).is_err() {
                drop(pending);
                self.drop_stream(url, &stream);
                return Err(PipeError::Failed("the pipe to the peer closed".into()));
            }
            map.insert(id, tx);
        }
        let _unregister = Unregister {
            pending: &stream.pending,
            id,
        };
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => {
                if matches!(answer, Err(PipeError::Unsupported))
                    && let Ok(mut u) = self.unsupported.lock()
                {
                    u.insert(url.to_string(), Instant::now() + UNSUPPORTED_FOR);
                }
                answer
            }
            Ok(Err(_)) => Err(PipeError::Failed(
                "the pipe to the peer closed before it answered".into(),
            )),
            Err(_) => {
                let silent = stream
                    .last_answer
                    .lock()
                    .map(|t| t.elapsed() >= timeout)
                    .unwrap_or(true);
                if silent {
                    self.drop_stream(url, &stream);
                }
                Err(PipeError::Failed(format!(
                    "no answer from the peer within {timeout:?}"
                )))
            }
        }
    }

    fn is_unsupported(&self, url: &str) -> bool {
        let Ok(mut u) = self.unsupported.lock() else {
            return false;
        };
        match u.get(url) {
            Some(until) if Instant::now() < *until => true,
            Some(_) => {
                u.remove(url);
                false
            }
            None => false,
        }
    }

    fn stream_to(&self, channels: &PeerChannels, url: &str) -> Result<Arc<Stream>, PipeError> {
        let mut open = self
            .open
            .lock()
            .map_err(|_| PipeError::Failed("pipe table poisoned".into()))?;
        if let Some(s) = open.get(url)
            && !s.tx.is_closed()
        {
            return Ok(s.clone());
        }
        let stream = start(channels, url).map_err(PipeError::Failed)?;
        open.insert(url.to_string(), stream.clone());
        Ok(stream)
    }

    fn drop_stream(&self, url: &str, stream: &Arc<Stream>) {
        stream.tx.close_channel();
        if let Ok(mut open) = self.open.lock()
            && open.get(url).is_some_and(|s| Arc::ptr_eq(s, stream))
        {
            open.remove(url);
        }
    }
}

/// Starts a pipe to `url`. Requests can be queued at once; they go out once it is open.
fn start(channels: &PeerChannels, url: &str) -> Result<Arc<Stream>, String> {
    let mut client = channels.client(url)?;
    let (tx, rx) = mpsc::unbounded::<Frame>();
    let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
    let stream = Arc::new(Stream {
        tx,
        pending: pending.clone(),
        next_id: AtomicU64::new(0),
        last_answer: Mutex::new(Instant::now()),
    });
    let req = channels.request(rx);
    let url = url.to_string();
    let this = stream.clone();
    tokio::spawn(async move {
        let mut answers = match client.pipe(req).await {
            Ok(resp) => resp.into_inner(),
            Err(status) => {
                let outcome = if status.code() == tonic::Code::Unimplemented {
                    tracing::info!(peer = %url, "peer has no pipe; using separate calls");
                    PipeError::Unsupported
                } else {
                    PipeError::Failed(format!("opening the pipe: {}", status.message()))
                };
                this.tx.close_channel();
                close(&pending, outcome);
                return;
            }
        };
        while let Some(item) = answers.next().await {
            let (id, answer): WireAnswer = match item
                .map_err(|s| s.to_string())
                .and_then(|f| decode(&f.data).map_err(|e| e.to_string()))
            {
                Ok(a) => a,
                Err(e) => {
                    tracing::debug!(peer = %url, error = %e, "pipe ended");
                    break;
                }
            };
            if let Ok(mut t) = this.last_answer.lock() {
                *t = Instant::now();
            }
            let waiter = pending
                .lock()
                .ok()
                .and_then(|mut p| p.as_mut().and_then(|m| m.remove(&id)));
            if let Some(w) = waiter {
                let _ = w.send(Ok(answer));
            }
        }
        this.tx.close_channel();
        close(
            &pending,
            PipeError::Failed("the pipe to the peer was lost with the request in flight".into()),
        );
    });
    Ok(stream)
}

/// Ends the stream for its waiters: each gets `outcome`, and no one can wait any more.
fn close(pending: &Pending, outcome: PipeError) {
    let waiters = pending.lock().ok().and_then(|mut p| p.take());
    for (_, w) in waiters.into_iter().flatten() {
        let _ = w.send(Err(outcome.clone()));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer whose version has no pipe answers Unimplemented: callers are told to use the
    /// separate calls, and the pipe is not tried again for a while.
    #[tokio::test]
    async fn a_peer_without_the_pipe_is_reached_by_separate_calls() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (_reporter, health) = tonic_health::server::health_reporter();
        tokio::spawn(
            tonic::transport::Server::builder()
                .add_service(health)
                .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
        );
        let channels = PeerChannels::new(7, None);
        let url = format!("http://{addr}");
        let timeout = Duration::from_secs(5);
        let first = channels
            .call_pipe(&url, PipeRequest::ReadIndex(None), timeout)
            .await;
        assert!(matches!(first, Err(PipeError::Unsupported)), "{first:?}");
        let started = Instant::now();
        let again = channels
            .call_pipe(&url, PipeRequest::ReadIndex(None), timeout)
            .await;
        assert!(matches!(again, Err(PipeError::Unsupported)), "{again:?}");
        assert!(channels.pipes.is_unsupported(&url));
        assert!(started.elapsed() < timeout);
    }

    /// A peer that cannot be reached fails the call without leaving it waiting.
    #[tokio::test]
    async fn an_unreachable_peer_fails_the_call() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        drop(listener);
        let channels = PeerChannels::new(7, None);
        let answer = channels
            .call_pipe(
                &format!("http://{addr}"),
                PipeRequest::ReadIndex(None),
                Duration::from_secs(5),
            )
            .await;
        assert!(matches!(answer, Err(PipeError::Failed(_))), "{answer:?}");
    }
}
