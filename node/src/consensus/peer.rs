//! Incoming node-to-node traffic on the peer port: hands Raft messages to openraft, receives
//! snapshots into files, and serves proposals, read-index requests and membership changes that
//! followers forward to this node when it leads.

use super::forward::{LEADER_IN_FLIGHT, StreamAnswer, StreamRequest};
use super::network::CLUSTER_ID_HEADER;
use super::pipe::{self, PipeAnswer, PipeRequest, WireAnswer, WireRequest};
use super::state_machine::{SnapshotFile, StateMachine};
use super::types::{SnapshotMeta, TypeConfig, Vote, decode, encode};
use super::{Consensus, MembershipChange, ProposeError};
use crate::model::Credential;
use crate::tls::PeerConnInfo;
use futures::StreamExt;
use openraft::Snapshot;
use openraft::vote::RaftLeaderId;
use raftkv_proto::peer::raft_peer_server::{RaftPeer, RaftPeerServer};
use raftkv_proto::peer::{Frame, SnapshotChunk};
use std::pin::Pin;
use tokio::io::AsyncWriteExt;
use tonic::{Request, Response, Status, Streaming};

#[derive(Clone)]
pub struct PeerService {
    consensus: Consensus,
}

impl PeerService {
    pub(super) fn new(consensus: Consensus) -> PeerService {
        PeerService { consensus }
    }

    /// The tonic server for this service, with message limits suited to log batches.
    pub fn into_server(self) -> RaftPeerServer<PeerService> {
        RaftPeerServer::new(self)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX)
    }

    /// Checks that a request comes from a member of this cluster. Returns whether the member
    /// proved who it is with its certificate (always, unless the peer port runs without TLS).
    fn check_cluster<T>(&self, req: &Request<T>) -> Result<bool, Status> {
        let verified = req
            .extensions()
            .get::<PeerConnInfo>()
            .is_some_and(|i| i.verified);
        if self.consensus.peer_identity().is_some() && !verified {
            return Err(Status::unauthenticated(
                "the peer port requires a member certificate",
            ));
        }
        self.check_cluster_id(req)?;
        Ok(verified)
    }

    fn check_cluster_id<T>(&self, req: &Request<T>) -> Result<(), Status> {
        let expected = self.consensus.cluster_id();
        match req
            .metadata()
            .get(CLUSTER_ID_HEADER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok())
        {
            Some(id) if id == expected => Ok(()),
            Some(id) => Err(Status::failed_precondition(format!(
                "peer belongs to cluster {id:x}, this node to cluster {expected:x}"
            ))),
            None => Err(Status::failed_precondition(
                "peer request without a cluster id: not a raftkv peer of this version",
            )),
        }
    }
}

fn bad(e: std::io::Error) -> Status {
    Status::invalid_argument(format!("undecodable peer message: {e}"))
}

fn to_frame<T: serde::Serialize>(v: &T) -> Result<Frame, Status> {
    encode(v)
        .map(|data| Frame { data })
        .map_err(|e| Status::internal(e.to_string()))
}

fn frame<T: serde::Serialize>(v: &T) -> Result<Response<Frame>, Status> {
    to_frame(v).map(Response::new)
}

type FrameStream = Pin<Box<dyn futures::Stream<Item = Result<Frame, Status>> + Send>>;

#[tonic::async_trait]
impl RaftPeer for PeerService {
    async fn append_entries(&self, req: Request<Frame>) -> Result<Response<Frame>, Status> {
        self.check_cluster(&req)?;
        self.consensus.touch_leader_contact();
        let rpc = decode(&req.into_inner().data).map_err(bad)?;
        let resp = self
            .consensus
            .inner
            .raft
            .append_entries(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        frame(&resp)
    }

    type StreamAppendStream = FrameStream;

    async fn stream_append(
        &self,
        req: Request<Streaming<Frame>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        self.check_cluster(&req)?;
        // The stream ends at the first transport error or undecodable frame; the leader then
        // reopens it.
        let consensus = self.consensus.clone();
        let input = req
            .into_inner()
            .map(move |item| {
                consensus.touch_leader_contact();
                let frame = item.map_err(|e| e.to_string())?;
                decode::<openraft::raft::AppendEntriesRequest<TypeConfig>>(&frame.data)
                    .map_err(|e| e.to_string())
            })
            .take_while(|r| {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "append stream ended");
                }
                futures::future::ready(r.is_ok())
            })
            .filter_map(|r| futures::future::ready(r.ok()));
        let out = self.consensus.inner.raft.stream_append(input).map(|item| {
            let wire: Result<openraft::raft::StreamAppendResult<TypeConfig>, String> =
                item.map_err(|fatal| fatal.to_string());
            to_frame(&wire)
        });
        Ok(Response::new(Box::pin(out)))
    }

    async fn vote(&self, req: Request<Frame>) -> Result<Response<Frame>, Status> {
        self.check_cluster(&req)?;
        if self.consensus.is_abstaining() {
            return Err(Status::unavailable(
                "member is joining with empty storage and abstains from elections until caught up",
            ));
        }
        let rpc: openraft::raft::VoteRequest<TypeConfig> =
            decode(&req.into_inner().data).map_err(bad)?;
        if self.consensus.was_removed(
            *rpc.vote.leader_id().node_id(),
            rpc.last_log_id.map(|l| l.index),
        ) {
            return Err(Status::failed_precondition(super::network::REMOVED_MEMBER));
        }
        let resp = self
            .consensus
            .inner
            .raft
            .vote(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        frame(&resp)
    }

    async fn pre_vote(&self, req: Request<Frame>) -> Result<Response<Frame>, Status> {
        self.check_cluster(&req)?;
        if self.consensus.is_abstaining() {
            return Err(Status::unavailable(
                "member is joining with empty storage and abstains from elections until caught up",
            ));
        }
        let rpc: openraft::raft::VoteRequest<TypeConfig> =
            decode(&req.into_inner().data).map_err(bad)?;
        if self.consensus.was_removed(
            *rpc.vote.leader_id().node_id(),
            rpc.last_log_id.map(|l| l.index),
        ) {
            return Err(Status::failed_precondition(super::network::REMOVED_MEMBER));
        }
        let resp = self
            .consensus
            .inner
            .raft
            .pre_vote(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        frame(&resp)
    }

    async fn install_snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<Frame>, Status> {
        self.check_cluster(&req)?;
        let mut stream = req.into_inner();
        let first = stream
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let (vote, meta): (Vote, SnapshotMeta) = decode(&first.header).map_err(bad)?;
        let path = StateMachine::incoming_path(self.consensus.store());
        let received = async {
            let mut file = tokio::fs::File::create(&path).await?;
            file.write_all(&first.data).await?;
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(std::io::Error::other)?;
                file.write_all(&chunk.data).await?;
            }
            file.flush().await?;
            file.sync_all().await?;
            Ok::<_, std::io::Error>(())
        }
        .await;
        if let Err(e) = received {
            let _ = tokio::fs::remove_file(&path).await;
            return Err(Status::aborted(format!("receiving snapshot: {e}")));
        }
        tracing::info!(node = self.consensus.id(), last_log_id = ?meta.last_log_id, "received snapshot");
        let snapshot = Snapshot {
            meta,
            snapshot: SnapshotFile::received(path.clone()),
        };
        let resp = self
            .consensus
            .inner
            .raft
            .install_full_snapshot(vote, snapshot)
            .await;
        // On success the state machine moved the file into place; otherwise it is garbage.
        if tokio::fs::metadata(&path).await.is_ok() {
            let _ = tokio::fs::remove_file(&path).await;
        }
        frame(&resp.map_err(|e| Status::unavailable(e.to_string()))?)
    }

    async fn transfer_leader(&self, req: Request<Frame>) -> Result<Response<Frame>, Status> {
        self.check_cluster(&req)?;
        let rpc = decode(&req.into_inner().data).map_err(bad)?;
        let resp = self
            .consensus
            .inner
            .raft
            .handle_transfer_leader(rpc)
            .await
            .map_err(|e| Status::unavailable(e.to_string()))?;
        frame(&resp)
    }

    type ProposeStreamStream = FrameStream;

    async fn propose_stream(
        &self,
        req: Request<Streaming<Frame>>,
    ) -> Result<Response<Self::ProposeStreamStream>, Status> {
        let verified = self.check_cluster(&req)?;
        let consensus = self.consensus.clone();
        // Proposals run concurrently and are answered as they finish. A transport error or an
        // undecodable frame ends the stream; the follower reports what was in flight as of
        // unknown outcome.
        let out = req
            .into_inner()
            .map(move |item| {
                let consensus = consensus.clone();
                async move {
                    let (id, credential, proposal): StreamRequest =
                        decode(&item?.data).map_err(bad)?;
                    let res = consensus
                        .propose_forwarded(proposal, credential, verified)
                        .await;
                    let answer: StreamAnswer = (id, res);
                    to_frame(&answer)
                }
            })
            .buffer_unordered(LEADER_IN_FLIGHT);
        Ok(Response::new(Box::pin(out)))
    }

    async fn read_index(&self, req: Request<Frame>) -> Result<Response<Frame>, Status> {
        self.check_cluster(&req)?;
        let res: Result<u64, ProposeError> = self.consensus.read_index_as_leader().await;
        frame(&res)
    }

    type PipeStream = FrameStream;

    async fn pipe(
        &self,
        req: Request<Streaming<Frame>>,
    ) -> Result<Response<Self::PipeStream>, Status> {
        self.check_cluster(&req)?;
        let consensus = self.consensus.clone();
        // Exchanges run concurrently and are answered as they finish. A transport error or an
        // undecodable frame ends the stream; the sender asks again over a new one.
        let out = req
            .into_inner()
            .map(move |item| {
                let consensus = consensus.clone();
                async move {
                    let (id, request): WireRequest = decode(&item?.data).map_err(bad)?;
                    let answer = match request {
                        PipeRequest::Heartbeat(rpc) => {
                            consensus.touch_leader_contact();
                            let answers: Vec<_> = consensus
                                .inner
                                .raft
                                .stream_append(futures::stream::iter([rpc]))
                                .collect()
                                .await;
                            PipeAnswer::Heartbeat(
                                answers
                                    .into_iter()
                                    .map(|a| a.map_err(|fatal| fatal.to_string()))
                                    .collect(),
                            )
                        }
                        PipeRequest::ReadIndex(vote) => {
                            PipeAnswer::ReadIndex(consensus.read_index_for(vote).await)
                        }
                    };
                    let wire: WireAnswer = (id, answer);
                    to_frame(&wire)
                }
            })
            .buffer_unordered(pipe::IN_FLIGHT)
            .take_until(self.consensus.stopped());
        Ok(Response::new(Box::pin(out)))
    }

    async fn leader_call(&self, req: Request<Frame>) -> Result<Response<Frame>, Status> {
        self.check_cluster(&req)?;
        let res = self
            .consensus
            .call_leader_local(req.into_inner().data)
            .await;
        frame(&res)
    }

    async fn change_membership(&self, req: Request<Frame>) -> Result<Response<Frame>, Status> {
        let verified = self.check_cluster(&req)?;
        let (credential, change): (Option<Credential>, MembershipChange) =
            decode(&req.into_inner().data).map_err(bad)?;
        let res = self
            .consensus
            .change_membership_as_leader(change, credential, verified)
            .await;
        frame(&res)
    }
}
