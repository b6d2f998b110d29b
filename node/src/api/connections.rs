//! The client port's connections: a bound on how many are open at once, and a deadline for
//! those that never make an authenticated request, so that idle or hostile sockets cannot pile
//! up. A connection that authenticated once stays open however quiet it is (watch streams can
//! be silent for hours).

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Per connection: whether it has made an authenticated request.
#[derive(Debug, Default)]
pub struct ConnState {
    authenticated: AtomicBool,
}

impl ConnState {
    pub fn mark_authenticated(&self) {
        self.authenticated.store(true, Ordering::Relaxed);
    }

    pub fn is_authenticated(&self) -> bool {
        self.authenticated.load(Ordering::Relaxed)
    }
}

/// What a request learns about its connection (in the request's extensions, inside tonic's
/// `TlsConnectInfo` when the port serves TLS).
#[derive(Debug, Clone)]
pub struct ClientConnInfo {
    pub remote: Option<SocketAddr>,
    pub state: Arc<ConnState>,
}

/// Counts of connections refused or closed by these limits, and of those open now.
#[derive(Clone)]
pub struct ConnCounters {
    pub over_limit: prometheus::IntCounter,
    pub idle_closed: prometheus::IntCounter,
    pub open: prometheus::IntGauge,
}

/// Holds one of the port's connection slots and counts it as open until the connection ends.
struct Slot {
    _permit: OwnedSemaphorePermit,
    open: prometheus::IntGauge,
}

impl Slot {
    fn new(permit: OwnedSemaphorePermit, open: prometheus::IntGauge) -> Self {
        open.inc();
        Slot {
            _permit: permit,
            open,
        }
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.open.dec();
    }
}

pub struct ClientConn {
    tcp: TcpStream,
    remote: Option<SocketAddr>,
    state: Arc<ConnState>,
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    counters: ConnCounters,
    _slot: Slot,
}

impl tonic::transport::server::Connected for ClientConn {
    type ConnectInfo = ClientConnInfo;
    fn connect_info(&self) -> ClientConnInfo {
        ClientConnInfo {
            remote: self.remote,
            state: self.state.clone(),
        }
    }
}

impl AsyncRead for ClientConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(d) = this.deadline.as_mut() {
            if this.state.is_authenticated() {
                this.deadline = None;
            } else if d.as_mut().poll(cx).is_ready() {
                this.counters.idle_closed.inc();
                return Poll::Ready(Err(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "no authenticated request in time",
                )));
            }
        }
        Pin::new(&mut this.tcp).poll_read(cx, buf)
    }
}

impl AsyncWrite for ClientConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().tcp).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().tcp).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.tcp.is_write_vectored()
    }
}

/// Accepts client connections up to `max` at once (more are closed as they arrive); each gets
/// `unauthenticated_timeout` (zero: none) to make an authenticated request.
pub fn incoming(
    listener: TcpListener,
    max: usize,
    unauthenticated_timeout: Duration,
    counters: ConnCounters,
) -> impl futures::Stream<Item = std::io::Result<ClientConn>> + Send + 'static {
    let slots = Arc::new(Semaphore::new(max.max(1)));
    futures::stream::unfold(
        (listener, slots, counters),
        move |(listener, slots, counters)| async move {
            loop {
                let (tcp, remote) = match listener.accept().await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::debug!(error = %e, "accepting a client connection");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(permit) = slots.clone().try_acquire_owned() else {
                    counters.over_limit.inc();
                    tracing::warn!(%remote, "client connection limit reached; closing a new connection");
                    drop(tcp);
                    continue;
                };
                let _ = tcp.set_nodelay(true);
                let conn = ClientConn {
                    tcp,
                    remote: Some(remote),
                    state: Arc::default(),
                    deadline: (!unauthenticated_timeout.is_zero())
                        .then(|| Box::pin(tokio::time::sleep(unauthenticated_timeout))),
                    counters: counters.clone(),
                    _slot: Slot::new(permit, counters.open.clone()),
                };
                return Some((Ok(conn), (listener, slots, counters)));
            }
        },
    )
}

/// The connection a request arrived on, whether or not the port serves TLS.
pub fn conn_info<B>(req: &http::Request<B>) -> Option<&ClientConnInfo> {
    let ext = req.extensions();
    ext.get::<ClientConnInfo>().or_else(|| {
        ext.get::<tonic::transport::server::TlsConnectInfo<ClientConnInfo>>()
            .map(|t| t.get_ref())
    })
}

/// The client address of a gRPC request (tonic's own `remote_addr` knows only its built-in
/// connection types).
pub fn remote_of<T>(req: &tonic::Request<T>) -> Option<SocketAddr> {
    let ext = req.extensions();
    ext.get::<ClientConnInfo>()
        .or_else(|| {
            ext.get::<tonic::transport::server::TlsConnectInfo<ClientConnInfo>>()
                .map(|t| t.get_ref())
        })
        .and_then(|i| i.remote)
        .or_else(|| req.remote_addr())
}
