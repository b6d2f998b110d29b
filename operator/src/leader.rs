//! Leader election on a `coordination.k8s.io/v1` Lease, so several operator replicas can run and
//! exactly one reconciles. The holder renews the lease well within its duration; another
//! replica takes it over only after it has expired. Writes use the lease's resourceVersion, so
//! two candidates racing for it cannot both win.

use crate::Result;
use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, PostParams};
use std::time::Duration;

pub struct LeaseLock {
    api: Api<Lease>,
    name: String,
    identity: String,
    duration: Duration,
}

fn is_conflict(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 409)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

impl LeaseLock {
    pub fn new(
        client: kube::Client,
        namespace: &str,
        name: &str,
        identity: &str,
        duration: Duration,
    ) -> LeaseLock {
        LeaseLock {
            api: Api::namespaced(client, namespace),
            name: name.into(),
            identity: identity.into(),
            duration,
        }
    }

    pub fn identity(&self) -> &str {
        &self.identity
    }

    fn spec(&self, transitions: i32, acquired: Option<MicroTime>) -> LeaseSpec {
        let now = MicroTime(Timestamp::now());
        LeaseSpec {
            holder_identity: Some(self.identity.clone()),
            lease_duration_seconds: Some(self.duration.as_secs().try_into().unwrap_or(i32::MAX)),
            acquire_time: Some(acquired.unwrap_or_else(|| now.clone())),
            renew_time: Some(now),
            lease_transitions: Some(transitions),
            ..Default::default()
        }
    }

    /// Takes or renews the lease. `Ok(true)` while this replica holds it.
    pub async fn try_acquire_or_renew(&self) -> Result<bool> {
        let current = match self.api.get(&self.name).await {
            Ok(l) => l,
            Err(e) if is_not_found(&e) => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(self.spec(0, None)),
                };
                return match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(e) if is_conflict(&e) => Ok(false),
                    Err(e) => Err(e.into()),
                };
            }
            Err(e) => return Err(e.into()),
        };
        let spec = current.spec.clone().unwrap_or_default();
        let holder = spec.holder_identity.clone().unwrap_or_default();
        let transitions = spec.lease_transitions.unwrap_or(0);
        let next = if holder == self.identity {
            self.spec(transitions, spec.acquire_time.clone())
        } else {
            let duration = spec
                .lease_duration_seconds
                .map_or(self.duration, |s| Duration::from_secs(s.max(0) as u64));
            let expired = match &spec.renew_time {
                Some(MicroTime(t)) => {
                    let age = Timestamp::now().duration_since(*t);
                    holder.is_empty()
                        || age > SignedDuration::try_from(duration).unwrap_or(SignedDuration::MAX)
                }
                None => true,
            };
            if !expired {
                return Ok(false);
            }
            tracing::info!(previous = %holder, "taking over the expired operator lease");
            self.spec(transitions + 1, None)
        };
        let mut lease = current;
        lease.spec = Some(next);
        match self
            .api
            .replace(&self.name, &PostParams::default(), &lease)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) {
        loop {
            match self.try_acquire_or_renew().await {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election"),
            }
            tokio::time::sleep(self.duration / 4).await;
        }
    }

    /// Renews the lease until it cannot be renewed within its duration; returns then (the
    /// caller must stop reconciling: someone else may hold it now).
    pub async fn hold(&self) {
        let mut last = tokio::time::Instant::now();
        loop {
            tokio::time::sleep(self.duration / 3).await;
            match self.try_acquire_or_renew().await {
                Ok(true) => last = tokio::time::Instant::now(),
                Ok(false) => {
                    tracing::error!("the operator lease was taken by another replica");
                    return;
                }
                Err(e) => tracing::warn!(error = %e, "renewing the operator lease"),
            }
            if last.elapsed() >= self.duration {
                tracing::error!("could not renew the operator lease in time");
                return;
            }
        }
    }

    /// Gives the lease up so another replica can take over at once.
    pub async fn release(&self) {
        let Ok(mut lease) = self.api.get(&self.name).await else {
            return;
        };
        if let Some(spec) = lease.spec.as_mut()
            && spec.holder_identity.as_deref() == Some(self.identity.as_str())
        {
            spec.holder_identity = None;
            if let Err(e) = self
                .api
                .replace(&self.name, &PostParams::default(), &lease)
                .await
            {
                tracing::warn!(error = %e, "releasing the operator lease");
            }
        }
    }
}
