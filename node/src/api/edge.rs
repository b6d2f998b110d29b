//! The edge of the client port: every gRPC call passes here first. It authenticates the token
//! (all calls but gRPC health checks and etcd's `Authenticate`), attaches the principal for the
//! services, and records per-method request counts and latency.

use super::status;
use crate::auth::Authenticator;
use crate::metrics::Metrics;
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

#[derive(Clone)]
pub struct EdgeLayer {
    authn: Authenticator,
    metrics: Arc<Metrics>,
}

impl EdgeLayer {
    pub fn new(authn: Authenticator, metrics: Arc<Metrics>) -> EdgeLayer {
        EdgeLayer { authn, metrics }
    }
}

impl<S> Layer<S> for EdgeLayer {
    type Service = Edge<S>;
    fn layer(&self, inner: S) -> Edge<S> {
        Edge {
            inner,
            authn: self.authn.clone(),
            metrics: self.metrics.clone(),
        }
    }
}

#[derive(Clone)]
pub struct Edge<S> {
    inner: S,
    authn: Authenticator,
    metrics: Arc<Metrics>,
}

/// Splits `/package.Service/Method` into short service and method names.
fn names(path: &str) -> (String, String) {
    let mut parts = path.trim_start_matches('/').splitn(2, '/');
    let service = parts.next().unwrap_or("");
    let method = parts.next().unwrap_or("");
    let service = service.rsplit('.').next().unwrap_or(service);
    (service.to_string(), method.to_string())
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
                .with_label_values(&[&service, &method, code_name(code)])
                .inc();
            metrics
                .grpc_latency
                .with_label_values(&[&service, &method])
                .observe(started.elapsed().as_secs_f64());
        };
        if !is_exempt(&path) {
            match self.authn.authenticate(req.headers()) {
                Ok(principal) => {
                    req.extensions_mut().insert(principal);
                }
                Err(e) => {
                    self.metrics
                        .auth_failures
                        .with_label_values(&[e.reason()])
                        .inc();
                    tracing::info!(%path, reason = %e, "refused a request without a valid token");
                    let status = status::unauthenticated(&e);
                    record(status.code());
                    return Box::pin(async move { Ok(status.into_http()) });
                }
            }
        }
        // Take the service that was polled ready; leave a fresh clone in its place.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        Box::pin(async move {
            let resp = inner.call(req).await?;
            // Unary errors are "trailers-only": the status is in the headers. Otherwise the
            // call started fine; streaming errors later are the client's to see.
            let code = resp
                .headers()
                .get("grpc-status")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<i32>().ok())
                .map(tonic::Code::from_i32)
                .unwrap_or(tonic::Code::Ok);
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
        assert_eq!(
            names("/etcdserverpb.KV/Range"),
            ("KV".into(), "Range".into())
        );
        assert!(is_exempt("/grpc.health.v1.Health/Check"));
        assert!(is_exempt("/etcdserverpb.Auth/Authenticate"));
        assert!(!is_exempt("/etcdserverpb.Auth/UserAdd"));
        assert!(!is_exempt("/etcdserverpb.KV/Put"));
    }
}
