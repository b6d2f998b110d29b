//! Where requests go: a set of endpoints (expanded from DNS names and from the member list),
//! health marks, the known leader, and the retry policy that tells safe retries from writes whose
//! outcome is unknown.

use crate::{Error, MemberStatus, pb};
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant};
use tonic::transport::{
    Certificate, Channel, ClientTlsConfig, Endpoint as TonicEndpoint, Identity,
};

/// How to reach and talk to the cluster.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// JWT sent with every request (as `authorization: Bearer` and etcd's `token`).
    pub token: Option<String>,
    /// Deadline of one attempt of one request.
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Upper bound on the whole call, retries included.
    pub retry_deadline: Duration,
    pub max_attempts: usize,
    /// Learn the members' client URLs from the cluster and balance over them too.
    pub discover: bool,
    /// TCP connections per endpoint. Behind a single Kubernetes Service address, several
    /// connections let kube-proxy spread them (and the load) over the members.
    pub connections_per_endpoint: usize,
    pub tls: Option<TlsOptions>,
}

#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// CA certificate (PEM) to verify servers with.
    pub ca_pem: Option<Vec<u8>>,
    /// Client certificate and key (PEM) for mutual TLS.
    pub identity_pem: Option<(Vec<u8>, Vec<u8>)>,
    /// Server name to verify, when endpoints are IP addresses.
    pub domain: Option<String>,
}

impl Default for ConnectOptions {
    fn default() -> Self {
        ConnectOptions {
            token: None,
            timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(2),
            retry_deadline: Duration::from_secs(15),
            max_attempts: 8,
            discover: true,
            connections_per_endpoint: 1,
            tls: None,
        }
    }
}

impl ConnectOptions {
    pub fn with_token(mut self, token: impl Into<String>) -> Self {
        self.token = Some(token.into());
        self
    }
    pub fn with_timeout(mut self, t: Duration) -> Self {
        self.timeout = t;
        self
    }
    pub fn with_tls(mut self, tls: TlsOptions) -> Self {
        self.tls = Some(tls);
        self
    }
    pub fn without_discovery(mut self) -> Self {
        self.discover = false;
        self
    }
    pub fn with_connections_per_endpoint(mut self, n: usize) -> Self {
        self.connections_per_endpoint = n.max(1);
        self
    }
}

/// Request metadata: the token and the per-attempt deadline.
#[derive(Clone)]
pub(crate) struct Meta {
    auth: Option<(
        tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
        tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
    )>,
    timeout: Duration,
}

impl Meta {
    pub(crate) fn wrap<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(self.timeout);
        if let Some((bearer, token)) = &self.auth {
            r.metadata_mut().insert("authorization", bearer.clone());
            r.metadata_mut().insert("token", token.clone());
        }
        r
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Route {
    Read,
    Write,
}

pub(crate) struct Endpoint {
    pub url: String,
    channels: Vec<Channel>,
    next: AtomicUsize,
    member_id: AtomicU64,
    down_since: Mutex<Option<Instant>>,
}

const COOL_DOWN: Duration = Duration::from_secs(2);

impl Endpoint {
    fn channel(&self) -> Channel {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.channels.len();
        self.channels[i].clone()
    }
    fn healthy(&self) -> bool {
        match self.down_since.lock() {
            Ok(g) => g.map(|t| t.elapsed() > COOL_DOWN).unwrap_or(true),
            Err(_) => true,
        }
    }
    fn mark(&self, up: bool) {
        if let Ok(mut g) = self.down_since.lock() {
            *g = if up { None } else { Some(Instant::now()) };
        }
    }
}

pub(crate) struct Balancer {
    opts: ConnectOptions,
    meta: Meta,
    endpoints: RwLock<Vec<Arc<Endpoint>>>,
    seeds: Vec<String>,
    rr: AtomicUsize,
    leader: AtomicU64,
}

/// What a failed attempt means for retrying.
enum Failure {
    /// The request certainly did not take effect: try elsewhere.
    NotApplied(String),
    /// The request may have taken effect.
    Unknown(String),
    /// The server refused it; retrying will not help.
    Refused(Error),
}

fn classify(s: &tonic::Status) -> Failure {
    let msg = s.message();
    match s.code() {
        tonic::Code::Unavailable => {
            if msg.contains("outcome is unknown") {
                Failure::Unknown(msg.to_string())
            } else if msg.starts_with("etcdserver: no leader")
                || msg.contains("error trying to connect")
                || msg.contains("tcp connect error")
                || msg.contains("Connection refused")
                || msg.contains("dns error")
                || msg.contains("server stopped")
            {
                Failure::NotApplied(msg.to_string())
            } else {
                Failure::Unknown(msg.to_string())
            }
        }
        // Statuses the server sends start with "etcdserver:"; these codes without it come from
        // the local transport (a dropped connection, a cancelled stream).
        tonic::Code::Cancelled
        | tonic::Code::Unknown
        | tonic::Code::Internal
        | tonic::Code::DeadlineExceeded
            if !msg.starts_with("etcdserver:") =>
        {
            Failure::Unknown(msg.to_string())
        }
        _ => Failure::Refused(Error::server(s)),
    }
}

fn tls_config(tls: &TlsOptions, host: &str) -> ClientTlsConfig {
    let mut cfg = ClientTlsConfig::new();
    if let Some(ca) = &tls.ca_pem {
        cfg = cfg.ca_certificate(Certificate::from_pem(ca));
    } else {
        cfg = cfg.with_native_roots();
    }
    if let Some((cert, key)) = &tls.identity_pem {
        cfg = cfg.identity(Identity::from_pem(cert, key));
    }
    cfg.domain_name(tls.domain.clone().unwrap_or_else(|| host.to_string()))
}

/// `http(s)://host:port` parts.
fn split_url(url: &str) -> Result<(String, String, u16), Error> {
    let (scheme, rest) = url.split_once("://").ok_or_else(|| {
        Error::Config(format!(
            "endpoint {url:?} needs a scheme (http:// or https://)"
        ))
    })?;
    let rest = rest.trim_end_matches('/');
    let (host, port) = rest
        .rsplit_once(':')
        .ok_or_else(|| Error::Config(format!("endpoint {url:?} needs a port")))?;
    let port: u16 = port
        .parse()
        .map_err(|_| Error::Config(format!("endpoint {url:?} has a bad port")))?;
    Ok((
        scheme.to_string(),
        host.trim_matches(['[', ']']).to_string(),
        port,
    ))
}

/// Adds `http://` to bare `host:port` endpoints.
pub fn normalize(url: &str, tls: bool) -> String {
    if url.contains("://") {
        url.to_string()
    } else if tls {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    }
}

impl Balancer {
    pub(crate) async fn connect(
        urls: Vec<String>,
        opts: ConnectOptions,
    ) -> Result<Balancer, Error> {
        if urls.is_empty() {
            return Err(Error::Config("no endpoints given".into()));
        }
        let auth = match &opts.token {
            Some(t) => {
                let bearer = format!("Bearer {t}").parse().map_err(|_| {
                    Error::Config("the token contains characters not allowed in metadata".into())
                })?;
                let token = t.parse().map_err(|_| {
                    Error::Config("the token contains characters not allowed in metadata".into())
                })?;
                Some((bearer, token))
            }
            None => None,
        };
        let seeds: Vec<String> = urls
            .iter()
            .map(|u| normalize(u, opts.tls.is_some()))
            .collect();
        let lb = Balancer {
            meta: Meta {
                auth,
                timeout: opts.timeout,
            },
            opts,
            endpoints: RwLock::new(Vec::new()),
            seeds,
            rr: AtomicUsize::new(0),
            leader: AtomicU64::new(0),
        };
        lb.resolve().await?;
        if lb.opts.discover {
            // Best effort: a cluster that cannot be reached now is reported by the first call.
            let _ = lb.discover().await;
        }
        let _ = lb.refresh_leader().await;
        Ok(lb)
    }

    /// Starts the background refresh (membership, leader, DNS) for as long as `lb` lives.
    pub(crate) fn spawn_refresh(lb: &Arc<Balancer>) {
        let weak: Weak<Balancer> = Arc::downgrade(lb);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(5)).await;
                let Some(lb) = weak.upgrade() else { return };
                let _ = lb.resolve().await;
                if lb.opts.discover {
                    let _ = lb.discover().await;
                }
                let _ = lb.refresh_leader().await;
            }
        });
    }

    fn make_endpoint(&self, url: &str, host_for_tls: &str) -> Result<Endpoint, Error> {
        let mut channels = Vec::new();
        for _ in 0..self.opts.connections_per_endpoint.max(1) {
            let mut ep = TonicEndpoint::from_shared(url.to_string())
                .map_err(|e| Error::Config(format!("endpoint {url:?}: {e}")))?
                .connect_timeout(self.opts.connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_while_idle(true);
            if url.starts_with("https://") {
                let tls = self.opts.tls.clone().unwrap_or_default();
                ep = ep
                    .tls_config(tls_config(&tls, host_for_tls))
                    .map_err(|e| Error::Config(format!("TLS for {url}: {e}")))?;
            }
            channels.push(ep.connect_lazy());
        }
        Ok(Endpoint {
            url: url.to_string(),
            channels,
            next: AtomicUsize::new(0),
            member_id: AtomicU64::new(0),
            down_since: Mutex::new(None),
        })
    }

    fn add_endpoints(&self, urls: Vec<(String, String)>) -> Result<(), Error> {
        let mut eps = self
            .endpoints
            .write()
            .map_err(|_| Error::Config("endpoint table poisoned".into()))?;
        let known: HashSet<String> = eps.iter().map(|e| e.url.clone()).collect();
        for (url, host) in urls {
            if !known.contains(&url) {
                eps.push(Arc::new(self.make_endpoint(&url, &host)?));
            }
        }
        Ok(())
    }

    /// Expands seed URLs whose host names resolve to several addresses (a headless Service)
    /// into one endpoint per address.
    async fn resolve(&self) -> Result<(), Error> {
        let mut out = Vec::new();
        for seed in &self.seeds {
            let (scheme, host, port) = split_url(seed)?;
            if host.parse::<std::net::IpAddr>().is_ok() {
                out.push((seed.clone(), host));
                continue;
            }
            let looked_up = tokio::net::lookup_host((host.as_str(), port))
                .await
                .map(|addrs| addrs.collect::<Vec<_>>());
            match looked_up {
                Ok(addrs) => {
                    if addrs.len() > 1 {
                        for a in addrs {
                            let ip = match a.ip() {
                                std::net::IpAddr::V6(v6) => format!("[{v6}]"),
                                v4 => v4.to_string(),
                            };
                            out.push((format!("{scheme}://{ip}:{port}"), host.clone()));
                        }
                    } else {
                        out.push((seed.clone(), host));
                    }
                }
                // Unresolvable now: keep the name; connecting will report the error.
                Err(_) => out.push((seed.clone(), host)),
            }
        }
        self.add_endpoints(out)
    }

    /// Adds the members' advertised client URLs.
    async fn discover(&self) -> Result<(), Error> {
        let resp = self
            .call(Route::Read, |ch, meta| async move {
                pb::cluster_client::ClusterClient::new(ch)
                    .member_list(meta.wrap(pb::MemberListRequest {
                        linearizable: false,
                    }))
                    .await
            })
            .await?;
        let mut urls = Vec::new();
        for m in resp.members {
            for u in m.client_ur_ls {
                if let Ok((_, host, _)) = split_url(&u) {
                    urls.push((u, host));
                }
            }
        }
        self.add_endpoints(urls)
    }

    pub(crate) fn endpoint_urls(&self) -> Vec<String> {
        self.endpoints
            .read()
            .map(|e| e.iter().map(|e| e.url.clone()).collect())
            .unwrap_or_default()
    }

    fn snapshot(&self) -> Vec<Arc<Endpoint>> {
        self.endpoints.read().map(|e| e.clone()).unwrap_or_default()
    }

    fn pick(&self, route: Route, tried: &HashSet<String>) -> Option<Arc<Endpoint>> {
        let eps = self.snapshot();
        if eps.is_empty() {
            return None;
        }
        if route == Route::Write {
            let leader = self.leader.load(Ordering::Relaxed);
            if leader != 0
                && let Some(e) = eps.iter().find(|e| {
                    e.member_id.load(Ordering::Relaxed) == leader
                        && e.healthy()
                        && !tried.contains(&e.url)
                })
            {
                return Some(e.clone());
            }
        }
        let start = self.rr.fetch_add(1, Ordering::Relaxed);
        let n = eps.len();
        // Healthy and untried first, then anything untried, then anything.
        for pass in 0..3 {
            for k in 0..n {
                let e = &eps[(start + k) % n];
                let ok = match pass {
                    0 => e.healthy() && !tried.contains(&e.url),
                    1 => !tried.contains(&e.url),
                    _ => true,
                };
                if ok {
                    return Some(e.clone());
                }
            }
        }
        None
    }

    /// Runs `f` against an endpoint chosen for `route`, retrying as the failure allows.
    pub(crate) async fn call<T, F, Fut>(&self, route: Route, f: F) -> Result<T, Error>
    where
        F: Fn(Channel, Meta) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        self.call_with_timeout(route, self.opts.timeout, f).await
    }

    /// `call` with a per-attempt timeout other than the configured one (long operations).
    pub(crate) async fn call_with_timeout<T, F, Fut>(
        &self,
        route: Route,
        timeout: Duration,
        f: F,
    ) -> Result<T, Error>
    where
        F: Fn(Channel, Meta) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let meta = Meta {
            auth: self.meta.auth.clone(),
            timeout,
        };
        let deadline = Instant::now() + self.opts.retry_deadline;
        let mut tried: HashSet<String> = HashSet::new();
        let mut last = String::from("no endpoints");
        let mut backoff = Duration::from_millis(25);
        for attempt in 0..self.opts.max_attempts.max(1) {
            let Some(ep) = self.pick(route, &tried) else {
                break;
            };
            let res = tokio::time::timeout(
                timeout + Duration::from_millis(200),
                f(ep.channel(), meta.clone()),
            )
            .await;
            let failure = match res {
                Ok(Ok(resp)) => {
                    ep.mark(true);
                    return Ok(resp.into_inner());
                }
                Ok(Err(status)) => classify(&status),
                Err(_) => Failure::Unknown(format!("no answer from {} within {timeout:?}", ep.url)),
            };
            match failure {
                Failure::Refused(e) => return Err(e),
                Failure::Unknown(msg) if route == Route::Write => {
                    return Err(Error::OutcomeUnknown(format!("{}: {msg}", ep.url)));
                }
                Failure::Unknown(msg) | Failure::NotApplied(msg) => {
                    last = format!("{}: {msg}", ep.url);
                    if !msg.starts_with("etcdserver: no leader") {
                        ep.mark(false);
                    }
                    tried.insert(ep.url.clone());
                    if route == Route::Write {
                        // Leadership may have moved: forget it, learn it again.
                        self.leader.store(0, Ordering::Relaxed);
                    }
                }
            }
            if Instant::now() + backoff > deadline {
                break;
            }
            if tried.len() >= self.snapshot().len() {
                // Every endpoint failed once: wait before going round again.
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
                tried.clear();
            }
            if attempt + 1 == self.opts.max_attempts {
                break;
            }
        }
        Err(Error::Unavailable(last))
    }

    async fn status_of(&self, ep: &Endpoint) -> Result<MemberStatus, Error> {
        let resp = tokio::time::timeout(
            self.opts.timeout,
            pb::maintenance_client::MaintenanceClient::new(ep.channel())
                .status(self.meta.wrap(pb::StatusRequest {})),
        )
        .await
        .map_err(|_| Error::Timeout(self.opts.timeout))?
        .map_err(|s| match classify(&s) {
            Failure::Refused(e) => e,
            Failure::Unknown(m) | Failure::NotApplied(m) => Error::Unavailable(m),
        })?
        .into_inner();
        let id = resp.header.as_ref().map(|h| h.member_id).unwrap_or(0);
        ep.member_id.store(id, Ordering::Relaxed);
        ep.mark(true);
        Ok(MemberStatus {
            endpoint: ep.url.clone(),
            id,
            leader: resp.leader,
            term: resp.raft_term,
            committed_index: resp.raft_index,
            applied_index: resp.raft_applied_index,
            db_size: resp.db_size,
            db_size_in_use: resp.db_size_in_use,
            is_learner: resp.is_learner,
            version: resp.version,
            errors: resp.errors,
        })
    }

    pub(crate) async fn status_all(&self) -> Vec<(String, Result<MemberStatus, Error>)> {
        let eps = self.snapshot();
        let futs = eps
            .iter()
            .map(|e| async move { (e.url.clone(), self.status_of(e).await) });
        futures::future::join_all(futs).await
    }

    /// Asks the endpoints who leads; remembers which endpoint is which member.
    pub(crate) async fn refresh_leader(&self) -> Result<u64, Error> {
        let mut last_err = Error::Unavailable("no endpoints".into());
        let mut leader = 0;
        for (_, st) in self.status_all().await {
            match st {
                Ok(s) if s.leader != 0 => leader = s.leader,
                Ok(_) => {}
                Err(e) => last_err = e,
            }
        }
        if leader != 0 {
            self.leader.store(leader, Ordering::Relaxed);
            Ok(leader)
        } else {
            Err(last_err)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_classified_for_retry_safety() {
        let refused = tonic::Status::unavailable(
            "error trying to connect: tcp connect error: Connection refused",
        );
        assert!(matches!(classify(&refused), Failure::NotApplied(_)));
        let no_leader = tonic::Status::unavailable("etcdserver: no leader");
        assert!(matches!(classify(&no_leader), Failure::NotApplied(_)));
        let unknown =
            tonic::Status::unavailable("etcdserver: request timed out, the outcome is unknown: x");
        assert!(matches!(classify(&unknown), Failure::Unknown(_)));
        let reset = tonic::Status::unavailable("connection reset");
        assert!(matches!(classify(&reset), Failure::Unknown(_)));
        let cancelled = tonic::Status::cancelled("operation was canceled");
        assert!(matches!(classify(&cancelled), Failure::Unknown(_)));
        let storage = tonic::Status::internal("etcdserver: storage failure: x");
        assert!(matches!(classify(&storage), Failure::Refused(_)));
        let bad = tonic::Status::invalid_argument("etcdserver: key is not provided");
        assert!(matches!(classify(&bad), Failure::Refused(_)));
    }

    #[test]
    fn urls() {
        assert_eq!(
            split_url("http://a:1").unwrap(),
            ("http".into(), "a".into(), 1)
        );
        assert!(split_url("a:1").is_err());
        assert_eq!(normalize("10.0.0.1:2379", false), "http://10.0.0.1:2379");
        assert_eq!(normalize("h:2379", true), "https://h:2379");
    }
}
