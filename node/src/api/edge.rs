//! The edge of the client port: every gRPC call passes here first. It authenticates the token
//! (all calls but gRPC health checks and etcd's `Authenticate`), refuses tokens of users that
//! were deleted or changed password since, attaches the caller for the services, and records
//! per-method request counts and latency under labels from a fixed set.

use super::connections::ClientConnInfo;
use super::status;
use crate::auth::jwt::TokenError;
use crate::auth::{Authenticator, Caller};
use crate::metrics::Metrics;
use crate::model::{Credential, Principal};
use crate::storage::auth_state::AuthCache;
use crate::storage::auth_state::TokenStanding;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;
use tower::{Layer, Service};

/// Calls that need no token.
fn is_exempt(path: &str) -> bool {
    path.starts_with("/grpc.health.v1.Health/") || path == "/etcdserverpb.Auth/Authenticate"
}

/// Whether this member can vouch for a leader now.
pub type HasLeader = Arc<dyn Fn() -> bool + Send + Sync>;

#[derive(Clone)]
pub struct EdgeLayer {
    authn: Authenticator,
    metrics: Arc<Metrics>,
    auth: Arc<AuthCache>,
    client_cert_auth: bool,
    has_leader: HasLeader,
}

impl EdgeLayer {
    /// With `client_cert_auth`, a request without a token is authenticated by its verified
    /// client certificate, whose common name must name a stored user (etcd's
    /// `--client-cert-auth`).
    pub fn new(
        authn: Authenticator,
        metrics: Arc<Metrics>,
        auth: Arc<AuthCache>,
        client_cert_auth: bool,
        has_leader: HasLeader,
    ) -> EdgeLayer {
        EdgeLayer {
            authn,
            metrics,
            auth,
            client_cert_auth,
            has_leader,
        }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;
    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            authn: self.authn.clone(),
            metrics: self.metrics.clone(),
            auth: self.auth.clone(),
            client_cert_auth: self.client_cert_auth,
            has_leader: self.has_leader.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    authn: Authenticator,
    metrics: Arc<Metrics>,
    auth: Arc<AuthCache>,
    client_cert_auth: bool,
    has_leader: HasLeader,
}

impl<S> Edge<S> {
    /// Who sent `req`: its token if it has one (a token wins, as in etcd), else with client
    /// certificate authentication the common name of its verified certificate.
    fn identify<B>(&self, req: &http::Request<B>) -> Result<Caller, TokenError> {
        let by_token = self.authn.authenticate(req.headers());
        let caller = match by_token {
            Err(TokenError::Missing) if self.client_cert_auth => {
                let cn = req
                    .extensions()
                    .get::<tonic::transport::server::TlsConnectInfo<ClientConnInfo>>()
                    .and_then(|t| t.peer_certs())
                    .and_then(|certs| certs.first().and_then(crate::tls::common_name))
                    .ok_or(TokenError::Missing)?;
                if self.auth.get().user(&cn).is_none() {
                    return Err(TokenError::UnknownCertificateUser(cn));
                }
                Caller {
                    principal: Principal {
                        name: cn.clone(),
                        roles: Vec::new(),
                        user_rev: None,
                    },
                    credential: Credential::Certificate(cn),
                    expires_at: None,
                }
            }
            other => other?,
        };
        match self.auth.get().token_standing(&caller.principal) {
            TokenStanding::Current => Ok(caller),
            TokenStanding::Revoked => Err(TokenError::Revoked),
            TokenStanding::AheadOfThisMember => Err(TokenError::NotCaughtUp),
        }
    }
}

/// Every method the client port serves, by path: metric labels come from here, so a client
/// cannot mint label values (and series) by calling made-up methods.
const METHODS: &[(&str, &str)] = &[
    ("etcdserverpb.KV", "Range"),
    ("etcdserverpb.KV", "Put"),
    ("etcdserverpb.KV", "DeleteRange"),
    ("etcdserverpb.KV", "Txn"),
    ("etcdserverpb.KV", "Compact"),
    ("etcdserverpb.Watch", "Watch"),
    ("etcdserverpb.Lease", "LeaseGrant"),
    ("etcdserverpb.Lease", "LeaseRevoke"),
    ("etcdserverpb.Lease", "LeaseKeepAlive"),
    ("etcdserverpb.Lease", "LeaseTimeToLive"),
    ("etcdserverpb.Lease", "LeaseLeases"),
    ("etcdserverpb.Cluster", "MemberAdd"),
    ("etcdserverpb.Cluster", "MemberRemove"),
    ("etcdserverpb.Cluster", "MemberUpdate"),
    ("etcdserverpb.Cluster", "MemberList"),
    ("etcdserverpb.Cluster", "MemberPromote"),
    ("etcdserverpb.Maintenance", "Alarm"),
    ("etcdserverpb.Maintenance", "Status"),
    ("etcdserverpb.Maintenance", "Defragment"),
    ("etcdserverpb.Maintenance", "Hash"),
    ("etcdserverpb.Maintenance", "HashKV"),
    ("etcdserverpb.Maintenance", "Snapshot"),
    ("etcdserverpb.Maintenance", "MoveLeader"),
    ("etcdserverpb.Maintenance", "Downgrade"),
    ("etcdserverpb.Auth", "AuthEnable"),
    ("etcdserverpb.Auth", "AuthDisable"),
    ("etcdserverpb.Auth", "AuthStatus"),
    ("etcdserverpb.Auth", "Authenticate"),
    ("etcdserverpb.Auth", "UserAdd"),
    ("etcdserverpb.Auth", "UserGet"),
    ("etcdserverpb.Auth", "UserList"),
    ("etcdserverpb.Auth", "UserDelete"),
    ("etcdserverpb.Auth", "UserChangePassword"),
    ("etcdserverpb.Auth", "UserGrantRole"),
    ("etcdserverpb.Auth", "UserRevokeRole"),
    ("etcdserverpb.Auth", "RoleAdd"),
    ("etcdserverpb.Auth", "RoleGet"),
    ("etcdserverpb.Auth", "RoleList"),
    ("etcdserverpb.Auth", "RoleDelete"),
    ("etcdserverpb.Auth", "RoleGrantPermission"),
    ("etcdserverpb.Auth", "RoleRevokePermission"),
    ("v3lockpb.Lock", "Lock"),
    ("v3lockpb.Lock", "Unlock"),
    ("v3electionpb.Election", "Campaign"),
    ("v3electionpb.Election", "Proclaim"),
    ("v3electionpb.Election", "Leader"),
    ("v3electionpb.Election", "Observe"),
    ("v3electionpb.Election", "Resign"),
    ("grpc.health.v1.Health", "Check"),
    ("grpc.health.v1.Health", "Watch"),
    ("raftkv.admin.v1.Admin", "Reencrypt"),
];

/// Short service and method names for metric labels; `("unknown", "unknown")` for any path
/// that is not a served method.
fn names(path: &str) -> (&'static str, &'static str) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or("");
    let method = parts.next().unwrap_or("");
    METHODS
        .iter()
        .find(|(s, m)| *s == service && *m == method)
        .map(|(s, m)| (s.rsplit('.').next().unwrap_or(s), *m))
        .unwrap_or(("unknown", "unknown"))
}

fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "Canceled",
        Unknown => "Unknown",
        InvalidArgument => "InvalidArgument",
        DeadlineExceeded => "DeadlineExceeded",
        NotFound => "NotFound",
        AlreadyExists => "AlreadyExists",
        PermissionDenied => "PermissionDenied",
        ResourceExhausted => "ResourceExhausted",
        FailedPrecondition => "FailedPrecondition",
        Aborted => "Aborted",
        OutOfRange => "OutOfRange",
        Unimplemented => "Unimplemented",
        Internal => "Internal",
        Unavailable => "Unavailable",
        DataLoss => "DataLoss",
        Unauthenticated => "Unauthenticated",
    }
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// Whether a trailers-only response's `grpc-message` contains `text` (as sent: tonic
/// percent-encodes spaces).
fn grpc_message_has(headers: &http::HeaderMap, text: &str) -> bool {
    headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|m| m.contains(text) || m.contains(&text.replace(' ', "%20")))
}

/// Whether a trailers-only response is tonic's refusal of a message over the decoding limit.
fn is_oversized_message(headers: &http::HeaderMap) -> bool {
    grpc_message_has(headers, "decoded message length too large")
}

/// Whether a trailers-only response is tonic's refusal of bytes that do not decode as the
/// method's request message (tonic says Internal, with the decoder's whole path in the message).
fn is_undecodable_message(headers: &http::HeaderMap) -> bool {
    grpc_message_has(headers, "failed to decode Protobuf message")
}

impl<S, B> Service<http::Request<B>> for Edge<S>
where
    S: Service<http::Request<B>, Response = http::Response<tonic::body::Body>>
        + Clone
        + Send
        + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = BoxFuture<Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let started = Instant::now();
        let path = req.uri().path().to_string();
        let (service, method) = names(&path);
        let metrics = self.metrics.clone();
        let record = move |code: tonic::Code| {
            metrics
                .grpc_requests
                .with_label_values(&[service, method, code_name(code)])
                .inc();
            metrics
                .grpc_latency
                .with_label_values(&[service, method])
                .observe(started.elapsed().as_secs_f64());
        };
        if !is_exempt(&path) {
            match self.identify(&req) {
                Ok(caller) => {
                    if let Some(conn) = super::connections::conn_info(&req) {
                        conn.state.mark_authenticated();
                    }
                    req.extensions_mut().insert(caller);
                }
                Err(e) => {
                    self.metrics
                        .auth_failures
                        .with_label_values(&[e.reason()])
                        .inc();
                    tracing::info!(path = %path.chars().take(128).collect::<String>(), reason = %e, "refused a request without a valid token");
                    // A member that is catching up cannot judge the token yet: the client
                    // should retry (etcd clients do so elsewhere on Unavailable), not log in.
                    let status = if e == TokenError::NotCaughtUp {
                        tonic::Status::unavailable(e.to_string())
                    } else {
                        status::unauthenticated(&e)
                    };
                    record(status.code());
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        // etcd's `hasleader`: a request that needs a leader fails at once on a member that has
        // none, so the client tries another member instead of waiting here.
        let wants_leader = req
            .headers()
            .get(super::REQUIRE_LEADER_KEY)
            .is_some_and(|v| v.as_bytes() == b"true");
        if wants_leader && !(self.has_leader)() {
            let status = tonic::Status::unavailable(status::NO_LEADER);
            record(status.code());
            return Box::pin(async move { Ok(status.into_http()) });
        }
        // Take the service that was polled ready; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let mut resp = inner.call(req).await?;
            // Unary errors are "trailers-only": the status is in the headers. Otherwise the
            // call started fine; streaming errors later are the client's to see.
            let mut code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(tonic::Code::from_i32)
                .unwrap_or(tonic::Code::Ok);
            if code == tonic::Code::OutOfRange && is_oversized_message(resp.headers()) {
                // A message over the gRPC limit is refused while decoding, before any service
                // sees it; say so the way etcd does for a request over its size limit.
                let headers = resp.headers_mut();
                headers.insert("grpc-status", http::HeaderValue::from_static("3"));
                headers.insert(
                    "grpc-message",
                    http::HeaderValue::from_static("etcdserver:%20request%20is%20too%20large"),
                );
                code = tonic::Code::InvalidArgument;
            } else if code == tonic::Code::Internal && is_undecodable_message(resp.headers()) {
                // Malformed bytes, or transactions nested past the decoder's depth limit, are the
                // caller's mistake: not an internal error, and not worth echoing back at length.
                let headers = resp.headers_mut();
                headers.insert("grpc-status", http::HeaderValue::from_static("3"));
                headers.insert(
                    "grpc-message",
                    http::HeaderValue::from_static(
                        "malformed%20request:%20not%20a%20valid%20message%20for%20this%20method,%20or%20transactions%20nested%20too%20deeply",
                    ),
                );
                code = tonic::Code::InvalidArgument;
            }
            record(code);
            Ok(resp)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn method_names_and_exemptions() {
        assert_eq!(names("/etcdserverpb.KV/Range"), ("KV", "Range"));
        assert_eq!(names("/etcdserverpb.KV/Nope"), ("unknown", "unknown"));
        assert_eq!(names("/x.Y/Z"), ("unknown", "unknown"));
        assert_eq!(names("garbage"), ("unknown", "unknown"));
        assert!(is_exempt("/grpc.health.v1.Health/Check"));
        assert!(is_exempt("/etcdserverpb.Auth/Authenticate"));
        assert!(!is_exempt("/etcdserverpb.Auth/UserAdd"));
        assert!(!is_exempt("/etcdserverpb.KV/Put"));
    }
}
