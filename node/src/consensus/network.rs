//! Outgoing node-to-node traffic over gRPC on the peer port: openraft's network (replication,
//! votes, snapshot streaming, leadership transfer) and the channels the node uses to forward
//! proposals and read-index requests to the leader.

use super::pipe::{PipeAnswer, PipeError, PipeRequest, Pipes};
use super::state_machine::SnapshotFile;
use super::types::{MemberNode, NodeId, TypeConfig, decode, encode};
use futures::{FutureExt, Stream, StreamExt};
use openraft::errors::{NetworkError, RPCError, ReplicationClosed, StreamingError, Unreachable};
use openraft::network::{RPCOption, RaftNetworkFactory, RaftNetworkV2};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, SnapshotResponse, StreamAppendResult,
    TransferLeaderRequest, TransferLeaderResponse, VoteRequest, VoteResponse,
};
use openraft::{OptionalSend, base::BoxFuture, base::BoxStream};
use raftkv_proto::peer::raft_peer_client::RaftPeerClient;
use raftkv_proto::peer::{Frame, SnapshotChunk};
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tonic::transport::{Channel, ClientTlsConfig, Endpoint};

/// Metadata key carrying the cluster id on every peer request; peers of other clusters are
/// refused.
pub const CLUSTER_ID_HEADER: &str = "raftkv-cluster-id";

const SNAPSHOT_CHUNK: usize = 1 << 20;

/// What a member answers a vote request from a node its membership no longer names (etcd's
/// words); the node that gets it knows it was removed.
pub const REMOVED_MEMBER: &str = "the member has been permanently removed from the cluster";

/// Shared gRPC channels to peers, one per peer URL (HTTP/2 multiplexes all traffic over it).
#[derive(Clone)]
pub struct PeerChannels {
    cluster_id: u64,
    tls: Arc<Mutex<Option<ClientTlsConfig>>>,
    channels: Arc<Mutex<HashMap<String, Channel>>>,
    pub(super) pipes: Arc<Pipes>,
    /// Set once a peer said this member was removed.
    pub(crate) removed: Arc<tokio::sync::watch::Sender<bool>>,
}

impl PeerChannels {
    pub fn new(cluster_id: u64, tls: Option<ClientTlsConfig>) -> PeerChannels {
        PeerChannels {
            cluster_id,
            tls: Arc::new(Mutex::new(tls)),
            channels: Arc::new(Mutex::new(HashMap::new())),
            pipes: Arc::new(Pipes::default()),
            removed: Arc::new(tokio::sync::watch::channel(false).0),
        }
    }

    /// Switches to new client TLS (a rotated member certificate): connections made from now
    /// on present it; open ones finish what they carry.
    pub fn set_tls(&self, tls: ClientTlsConfig) {
        if let Ok(mut t) = self.tls.lock() {
            *t = Some(tls);
        }
        if let Ok(mut map) = self.channels.lock() {
            map.clear();
        }
        self.pipes.clear();
    }

    /// One small idempotent exchange with the peer at `url`, over its pipe.
    pub(super) fn call_pipe(
        &self,
        url: &str,
        request: PipeRequest,
        timeout: Duration,
    ) -> impl Future<Output = Result<PipeAnswer, PipeError>> + Send + 'static {
        // Owned, so the future is Send for any caller's lifetimes (openraft's boxed futures).
        let channels = self.clone();
        let url = url.to_string();
        async move { channels.pipes.call(&channels, &url, request, timeout).await }
    }

    /// A client for the peer at `url`; connects lazily and reconnects on failure.
    pub fn client(&self, url: &str) -> Result<RaftPeerClient<Channel>, String> {
        let mut map = self
            .channels
            .lock()
            .map_err(|_| "peer channel table poisoned".to_string())?;
        if let Some(ch) = map.get(url) {
            return Ok(RaftPeerClient::new(ch.clone())
                .max_decoding_message_size(usize::MAX)
                .max_encoding_message_size(usize::MAX));
        }
        let mut ep = Endpoint::from_shared(url.to_string())
            .map_err(|e| format!("bad peer URL {url}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let tls = self.tls.lock().ok().and_then(|t| t.clone());
        if let Some(tls) = tls {
            ep = ep
                .tls_config(tls)
                .map_err(|e| format!("peer TLS config for {url}: {e}"))?;
        }
        let ch = ep.connect_lazy();
        map.insert(url.to_string(), ch.clone());
        Ok(RaftPeerClient::new(ch)
            .max_decoding_message_size(usize::MAX)
            .max_encoding_message_size(usize::MAX))
    }

    /// Wraps a message with the cluster id header.
    pub fn request<T>(&self, msg: T) -> tonic::Request<T> {
        let mut req = tonic::Request::new(msg);
        if let Ok(v) = self.cluster_id.to_string().parse() {
            req.metadata_mut().insert(CLUSTER_ID_HEADER, v);
        }
        req
    }
}

/// openraft's network factory.
pub struct PeerNetwork {
    channels: PeerChannels,
}

impl PeerNetwork {
    pub fn new(channels: PeerChannels) -> PeerNetwork {
        PeerNetwork { channels }
    }
}

impl RaftNetworkFactory<TypeConfig> for PeerNetwork {
    type Network = PeerClient;

    async fn new_client(&mut self, target: NodeId, node: &MemberNode) -> Self::Network {
        PeerClient {
            target,
            url: node.peer_url.clone(),
            channels: self.channels.clone(),
        }
    }
}

/// openraft's connection to one peer.
pub struct PeerClient {
    target: NodeId,
    url: String,
    channels: PeerChannels,
}

fn status_to_rpc(target: NodeId, s: tonic::Status) -> RPCError<TypeConfig> {
    match s.code() {
        tonic::Code::Unavailable | tonic::Code::Cancelled => RPCError::Unreachable(
            Unreachable::from_string(format!("peer {target}: {}", s.message())),
        ),
        _ => RPCError::Network(NetworkError::from_string(format!(
            "peer {target}: {}: {}",
            s.code(),
            s.message()
        ))),
    }
}

fn io_to_rpc(e: std::io::Error) -> RPCError<TypeConfig> {
    RPCError::Network(NetworkError::from_string(e.to_string()))
}

impl PeerClient {
    fn client(&self) -> Result<RaftPeerClient<Channel>, RPCError<TypeConfig>> {
        self.channels
            .client(&self.url)
            .map_err(|e| RPCError::Unreachable(Unreachable::from_string(e)))
    }

    async fn unary<F, Fut>(
        &self,
        option: &RPCOption,
        call: F,
    ) -> Result<Vec<u8>, RPCError<TypeConfig>>
    where
        F: FnOnce(RaftPeerClient<Channel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<Frame>, tonic::Status>>,
    {
        let client = self.client()?;
        match tokio::time::timeout(option.hard_ttl(), call(client)).await {
            Ok(Ok(resp)) => Ok(resp.into_inner().data),
            Ok(Err(status)) => {
                if status.code() == tonic::Code::FailedPrecondition
                    && status.message().contains(REMOVED_MEMBER)
                    && !*self.channels.removed.borrow()
                {
                    tracing::error!(
                        peer = self.target,
                        "a member says this member was removed from the cluster"
                    );
                    self.channels.removed.send_replace(true);
                }
                Err(status_to_rpc(self.target, status))
            }
            Err(_) => Err(RPCError::Network(NetworkError::from_string(format!(
                "peer {}: timed out after {:?}",
                self.target,
                option.hard_ttl()
            )))),
        }
    }
}

/// Requests are encoded as they come; an encoding failure ends the stream, which the leader
/// sees as a closed replication stream and retries.
fn encoded(
    input: futures::stream::BoxStream<'static, AppendEntriesRequest<TypeConfig>>,
) -> impl Stream<Item = Frame> + Send + 'static {
    input
        .map(|req| encode(&req).map(|data| Frame { data }))
        .take_while(|r| futures::future::ready(r.is_ok()))
        .filter_map(|r| futures::future::ready(r.ok()))
}

/// How a heartbeat that did not go over the pipe is to go on.
enum HeartbeatVia {
    /// The peer has no pipe: send it as its own stream.
    Calls(AppendEntriesRequest<TypeConfig>),
    Failed(RPCError<TypeConfig>),
}

/// Sends a heartbeat over the pipe to `url` and returns openraft's answers.
async fn heartbeat(
    channels: PeerChannels,
    url: String,
    target: NodeId,
    rpc: AppendEntriesRequest<TypeConfig>,
    ttl: Duration,
) -> Result<Vec<StreamAppendResult<TypeConfig>>, HeartbeatVia> {
    let kept = rpc.clone();
    match channels
        .call_pipe(&url, PipeRequest::Heartbeat(rpc), ttl)
        .await
    {
        Ok(PipeAnswer::Heartbeat(Ok(answers))) => Ok(answers),
        Ok(PipeAnswer::Heartbeat(Err(fatal))) => Err(HeartbeatVia::Failed(RPCError::Network(
            NetworkError::from_string(format!("peer {target}: {fatal}")),
        ))),
        Ok(other) => Err(HeartbeatVia::Failed(RPCError::Network(
            NetworkError::from_string(format!(
                "peer {target}: answered a heartbeat with {other:?}"
            )),
        ))),
        Err(PipeError::Unsupported) => Err(HeartbeatVia::Calls(kept)),
        Err(PipeError::Failed(e)) => Err(HeartbeatVia::Failed(RPCError::Unreachable(
            Unreachable::from_string(format!("peer {target}: {e}")),
        ))),
    }
}

impl RaftNetworkV2<TypeConfig> for PeerClient {
    type SnapshotData = SnapshotFile;

    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.channels.request(Frame {
            data: encode(&rpc).map_err(io_to_rpc)?,
        });
        let data = self
            .unary(&option, |mut c| async move { c.append_entries(req).await })
            .await?;
        decode(&data).map_err(io_to_rpc)
    }

    fn stream_append<'s, S>(
        &'s mut self,
        input: S,
        option: RPCOption,
    ) -> BoxFuture<
        's,
        Result<
            BoxStream<'s, Result<StreamAppendResult<TypeConfig>, RPCError<TypeConfig>>>,
            RPCError<TypeConfig>,
        >,
    >
    where
        S: Stream<Item = AppendEntriesRequest<TypeConfig>> + OptionalSend + Unpin + 'static,
    {
        let target = self.target;
        let channels = self.channels.clone();
        let url = self.url.clone();
        let ttl = option.hard_ttl();
        let fut = async move {
            // Owned while awaited: a borrow of the generic stream across the await would make
            // the future's Send bound unprovable.
            let (first, mut input) = input.into_future().await;
            let Some(first) = first else {
                let none: BoxStream<'s, _> = Box::pin(futures::stream::empty());
                return Ok(none);
            };
            // A stream of one request that is over at once is openraft's heartbeat: it goes
            // over the pipe. Anything longer is replication and keeps its own ordered stream.
            let input: futures::stream::BoxStream<'static, AppendEntriesRequest<TypeConfig>> =
                match input.next().now_or_never() {
                    Some(None) => match heartbeat(channels, url, target, first, ttl).await {
                        Ok(answers) => {
                            let answers: BoxStream<'s, _> =
                                Box::pin(futures::stream::iter(answers.into_iter().map(Ok)));
                            return Ok(answers);
                        }
                        Err(HeartbeatVia::Calls(first)) => Box::pin(futures::stream::iter([first])),
                        Err(HeartbeatVia::Failed(e)) => return Err(e),
                    },
                    Some(Some(second)) => {
                        Box::pin(futures::stream::iter([first, second]).chain(input))
                    }
                    None => Box::pin(futures::stream::iter([first]).chain(input)),
                };
            let mut client = self.client()?;
            let req = self.channels.request(encoded(input));
            let resp = client
                .stream_append(req)
                .await
                .map_err(|s| status_to_rpc(target, s))?;
            let out = resp.into_inner().map(move |item| match item {
                Ok(frame) => decode::<Result<StreamAppendResult<TypeConfig>, String>>(&frame.data)
                    .map_err(io_to_rpc)
                    .and_then(|r| {
                        r.map_err(|fatal| {
                            RPCError::Network(NetworkError::from_string(format!(
                                "peer {target}: {fatal}"
                            )))
                        })
                    }),
                Err(status) => Err(status_to_rpc(target, status)),
            });
            let out: BoxStream<'s, _> = Box::pin(out);
            Ok(out)
        };
        Box::pin(fut)
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.channels.request(Frame {
            data: encode(&rpc).map_err(io_to_rpc)?,
        });
        let data = self
            .unary(&option, |mut c| async move { c.vote(req).await })
            .await?;
        decode(&data).map_err(io_to_rpc)
    }

    async fn pre_vote(
        &mut self,
        rpc: VoteRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<VoteResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.channels.request(Frame {
            data: encode(&rpc).map_err(io_to_rpc)?,
        });
        let data = self
            .unary(&option, |mut c| async move { c.pre_vote(req).await })
            .await?;
        decode(&data).map_err(io_to_rpc)
    }

    async fn full_snapshot(
        &mut self,
        vote: super::types::Vote,
        snapshot: openraft::alias::SnapshotOf<TypeConfig, SnapshotFile>,
        cancel: impl Future<Output = ReplicationClosed> + OptionalSend + 'static,
        _option: RPCOption,
    ) -> Result<SnapshotResponse<TypeConfig>, StreamingError<TypeConfig>> {
        let to_stream = |e: RPCError<TypeConfig>| match e {
            RPCError::Unreachable(u) => StreamingError::Unreachable(u),
            RPCError::Network(n) => StreamingError::Network(n),
            other => StreamingError::Network(NetworkError::from_string(other.to_string())),
        };
        let header = encode(&(vote, snapshot.meta.clone())).map_err(|e| to_stream(io_to_rpc(e)))?;
        let path = snapshot
            .snapshot
            .transfer_file()
            .await
            .map_err(|e| to_stream(io_to_rpc(e)))?;
        let file = tokio::fs::File::open(&path)
            .await
            .map_err(|e| to_stream(io_to_rpc(e)))?;
        let first = SnapshotChunk {
            header,
            data: Vec::new(),
        };
        let rest = futures::stream::unfold(Some(file), |state| async move {
            use tokio::io::AsyncReadExt;
            let mut file = state?;
            let mut buf = vec![0u8; SNAPSHOT_CHUNK];
            match file.read(&mut buf).await {
                Ok(0) => None,
                Ok(n) => {
                    buf.truncate(n);
                    Some((
                        SnapshotChunk {
                            header: Vec::new(),
                            data: buf,
                        },
                        Some(file),
                    ))
                }
                Err(e) => {
                    // Ending early makes the receiver see a short file and refuse it.
                    tracing::warn!(error = %e, "reading snapshot file for transfer");
                    None
                }
            }
        });
        let chunks = futures::stream::iter([first]).chain(rest);
        let mut client = self.client().map_err(to_stream)?;
        let req = self.channels.request(chunks);
        let target = self.target;
        tokio::select! {
            closed = cancel => Err(StreamingError::Closed(closed)),
            res = client.install_snapshot(req) => {
                let frame = res.map_err(|s| to_stream(status_to_rpc(target, s)))?.into_inner();
                decode(&frame.data).map_err(|e| to_stream(io_to_rpc(e)))
            }
        }
    }

    async fn transfer_leader(
        &mut self,
        req: TransferLeaderRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<TransferLeaderResponse<TypeConfig>, RPCError<TypeConfig>> {
        let req = self.channels.request(Frame {
            data: encode(&req).map_err(io_to_rpc)?,
        });
        let data = self
            .unary(&option, |mut c| async move { c.transfer_leader(req).await })
            .await?;
        decode(&data).map_err(io_to_rpc)
    }
}
