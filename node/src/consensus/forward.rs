//! Proposals a follower hands to the leader, over one long-lived stream per leader. A unary
//! call per forwarded write cost an HTTP/2 stream (headers both ways, a task on the leader) for
//! every request; on the stream each proposal is one small frame, answered as soon as it is
//! applied, in whatever order the proposals finish.
//!
//! What a failure means for the caller is kept exact: a proposal that certainly never reached
//! the leader is `NotDelivered` (safe to retry elsewhere), one that may have is `OutcomeUnknown`.

use super::network::PeerChannels;
use super::types::{decode, encode};
use super::{ForwardError, ProposeError, Proposed, is_connect_failure};
use crate::model::{Credential, Proposal};
use futures::StreamExt;
use futures::channel::{mpsc, oneshot};
use raftkv_proto::peer::Frame;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A proposal on the wire: the follower's id for it, what proves who the caller is (the leader
/// checks it again and authorizes the proposal itself), then the proposal.
pub(super) type StreamRequest = (u64, Option<Credential>, Proposal);
/// An answer on the wire: the id it answers, then what the leader's `propose` returned.
pub(super) type StreamAnswer = (u64, Result<Proposed, ProposeError>);

/// How many forwarded proposals the leader works on at once per stream; more wait in the stream.
pub(super) const LEADER_IN_FLIGHT: usize = 4096;

/// What a waiting caller is told.
type Answer = Result<Proposed, ForwardError>;

type Waiter = oneshot::Sender<Answer>;

/// Callers waiting for an answer, by id. `None` once the stream is over: nothing more may wait.
type Pending = Arc<Mutex<Option<HashMap<u64, Waiter>>>>;

/// One stream to one leader.
struct ProposalStream {
    url: String,
    tx: mpsc::UnboundedSender<Frame>,
    pending: Pending,
    next_id: AtomicU64,
}

/// The follower's side: the open stream to the current leader, opened on first use and
/// replaced when the leader changes or the stream ends.
#[derive(Default)]
pub(super) struct Forwarder {
    current: Mutex<Option<Arc<ProposalStream>>>,
}

impl Forwarder {
    /// Hands `proposal` to the leader at `url` and waits up to `timeout` for its answer.
    pub(super) async fn forward(
        &self,
        channels: &PeerChannels,
        url: &str,
        credential: Option<&Credential>,
        proposal: &Proposal,
        timeout: Duration,
    ) -> Result<Proposed, ForwardError> {
        let stream = match self.stream_to(channels, url) {
            Ok(s) => s,
            Err(e) => return Err(ForwardError::Failed(ProposeError::Unavailable(e))),
        };
        let id = stream.next_id.fetch_add(1, Ordering::Relaxed);
        let data = match encode(&(id, credential, proposal)) {
            Ok(d) => d,
            Err(e) => return Err(ForwardError::Failed(ProposeError::Rejected(e.to_string()))),
        };
        let (tx, rx) = oneshot::channel();
        {
            let Ok(mut pending) = stream.pending.lock() else {
                return Err(ForwardError::NotDelivered);
            };
            let Some(map) = pending.as_mut() else {
                // The stream ended before this proposal was queued on it.
                self.drop_stream(&stream);
                return Err(ForwardError::NotDelivered);
            };
            if stream.tx.unbounded_send(Frame { data }).is_err() {
                self.drop_stream(&stream);
                return Err(ForwardError::NotDelivered);
            }
            map.insert(id, tx);
        }
        match tokio::time::timeout(timeout, rx).await {
            Ok(Ok(answer)) => answer,
            // The stream's reader went away without answering (it always answers first).
            Ok(Err(_)) => Err(ForwardError::Failed(ProposeError::OutcomeUnknown(
                "the stream to the leader closed before it answered".into(),
            ))),
            Err(_) => {
                if let Ok(mut pending) = stream.pending.lock()
                    && let Some(map) = pending.as_mut()
                {
                    map.remove(&id);
                }
                Err(ForwardError::Failed(ProposeError::OutcomeUnknown(
                    "no answer from the leader within the request timeout".into(),
                )))
            }
        }
    }

    /// The open stream to `url`, opening one if there is none (or it goes elsewhere).
    fn stream_to(&self, channels: &PeerChannels, url: &str) -> Result<Arc<ProposalStream>, String> {
        let mut current = self
            .current
            .lock()
            .map_err(|_| "proposal stream table poisoned".to_string())?;
        if let Some(s) = current.as_ref()
            && s.url == url
            && !s.tx.is_closed()
        {
            return Ok(s.clone());
        }
        let stream = open(channels, url)?;
        *current = Some(stream.clone());
        Ok(stream)
    }

    fn drop_stream(&self, stream: &Arc<ProposalStream>) {
        if let Ok(mut current) = self.current.lock()
            && current.as_ref().is_some_and(|c| Arc::ptr_eq(c, stream))
        {
            *current = None;
        }
    }
}

/// Starts a stream to `url`. Proposals can be queued at once; they go out once it is open.
fn open(channels: &PeerChannels, url: &str) -> Result<Arc<ProposalStream>, String> {
    let mut client = channels.client(url)?;
    let (tx, rx) = mpsc::unbounded::<Frame>();
    let pending: Pending = Arc::new(Mutex::new(Some(HashMap::new())));
    let stream = Arc::new(ProposalStream {
        url: url.to_string(),
        tx,
        pending: pending.clone(),
        next_id: AtomicU64::new(0),
    });
    let req = channels.request(rx);
    let url = url.to_string();
    tokio::spawn(async move {
        let mut answers = match client.propose_stream(req).await {
            Ok(resp) => resp.into_inner(),
            Err(status) => {
                // The leader refused or could not be reached before taking any proposal.
                let outcome = if is_connect_failure(&status) {
                    Err(ForwardError::NotDelivered)
                } else {
                    tracing::warn!(leader = %url, error = %status, "proposal stream refused");
                    Err(ForwardError::Failed(ProposeError::OutcomeUnknown(format!(
                        "the leader's proposal stream failed as it opened: {}",
                        status.message()
                    ))))
                };
                close(&pending, outcome);
                return;
            }
        };
        while let Some(item) = answers.next().await {
            let frame = match item {
                Ok(f) => f,
                Err(status) => {
                    tracing::debug!(leader = %url, error = %status, "proposal stream ended");
                    break;
                }
            };
            let (id, answer): StreamAnswer = match decode(&frame.data) {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(leader = %url, error = %e, "undecodable answer on the proposal stream");
                    break;
                }
            };
            let waiter = pending
                .lock()
                .ok()
                .and_then(|mut p| p.as_mut().and_then(|m| m.remove(&id)));
            if let Some(w) = waiter {
                let _ = w.send(ForwardError::from_leader(answer));
            }
        }
        close(
            &pending,
            Err(ForwardError::Failed(ProposeError::OutcomeUnknown(
                "the connection to the leader was lost with the proposal in flight".into(),
            ))),
        );
    });
    Ok(stream)
}

/// Ends the stream for its waiters: each gets `outcome`, and no one can wait any more.
fn close(pending: &Pending, outcome: Answer) {
    let waiters = pending.lock().ok().and_then(|mut p| p.take());
    for (_, w) in waiters.into_iter().flatten() {
        let _ = w.send(outcome.clone());
    }
}
