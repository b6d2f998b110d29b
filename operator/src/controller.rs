//! The reconciler: observes a KVCluster's objects and Raft group, applies the owned objects with
//! server-side apply, takes the one next step the planner allows, and reports it all in the
//! status, its conditions and Events.

use crate::crd::{JwtAlgorithm, KVCluster, KVClusterBackup, KVClusterStatus, MemberStatus};
use crate::metrics::Metrics;
use crate::plan::{self, MemberView, Observed, PodView, RaftView, Step, id_of, ordinal_of};
use crate::raft::{self, Cluster, Report, SigningKey};
use crate::resources::{
    self, CLIENT_PORT, Names, config, pdb, secrets, servicemonitor, services, statefulset,
};
use crate::{Error, Result};
use futures::StreamExt;
use k8s_openapi::api::apps::v1::StatefulSet;
use k8s_openapi::api::core::v1::{ConfigMap, PersistentVolumeClaim, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, Time};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::events::{Event, EventType, Recorder, Reporter};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Resource, ResourceExt};
use raftkv_client::TlsOptions;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::collections::{BTreeMap, HashMap};
use std::fmt::Debug;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const MANAGER: &str = "raftkv-operator";
const MONITORING_RECHECK: Duration = Duration::from_secs(300);

/// What every reconcile shares.
pub struct Context {
    pub client: kube::Client,
    pub recorder: Recorder,
    pub metrics: Metrics,
    /// Whether the cluster serves `monitoring.coreos.com/v1` ServiceMonitors, and when that was
    /// last checked.
    monitoring: tokio::sync::Mutex<Option<(Instant, bool)>>,
    /// Consecutive failures per cluster, for backoff.
    failures: Mutex<HashMap<String, u32>>,
    /// The image the operator's Jobs run (its own: backups to a claim).
    pub job_image: String,
}

impl Context {
    pub fn new(client: kube::Client, metrics: Metrics, instance: String) -> Context {
        let recorder = Recorder::new(
            client.clone(),
            Reporter {
                controller: MANAGER.into(),
                instance: Some(instance),
            },
        );
        Context {
            client,
            recorder,
            metrics,
            monitoring: tokio::sync::Mutex::new(None),
            failures: Mutex::new(HashMap::new()),
            job_image: format!("raftkv-operator:{}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// Runs the operator's Jobs with `image` (the one the operator's own pod runs).
    pub fn with_job_image(mut self, image: String) -> Context {
        self.job_image = image;
        self
    }

    async fn has_service_monitors(&self) -> bool {
        let mut cached = self.monitoring.lock().await;
        if let Some((at, yes)) = *cached
            && at.elapsed() < MONITORING_RECHECK
        {
            return yes;
        }
        let yes = match self
            .client
            .list_api_group_resources("monitoring.coreos.com/v1")
            .await
        {
            Ok(list) => list.resources.iter().any(|r| r.name == "servicemonitors"),
            Err(_) => false,
        };
        *cached = Some((Instant::now(), yes));
        yes
    }

    fn failure_count(&self, key: &str, bump: bool) -> u32 {
        let Ok(mut f) = self.failures.lock() else {
            return 0;
        };
        if bump {
            let n = f.entry(key.to_string()).or_insert(0);
            *n += 1;
            *n
        } else {
            f.remove(key);
            0
        }
    }
}

/// Runs the controller until `shutdown` resolves.
pub async fn run(
    ctx: Arc<Context>,
    namespace: Option<String>,
    shutdown: impl std::future::Future<Output = ()> + Send + Sync + 'static,
) {
    let client = ctx.client.clone();
    fn api<K>(client: &kube::Client, ns: &Option<String>) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let shutdown = futures::FutureExt::shared(shutdown);
    let backups = crate::backup::run(ctx.clone(), namespace.clone(), shutdown.clone());
    let owned = watcher::Config::default().labels("app.kubernetes.io/managed-by=raftkv-operator");
    let clusters = Controller::new(
        api::<KVCluster>(&client, &namespace),
        watcher::Config::default(),
    )
    .owns(api::<StatefulSet>(&client, &namespace), owned.clone())
    .owns(api::<Service>(&client, &namespace), owned.clone())
    .watches(api::<Pod>(&client, &namespace), owned, |pod: Pod| {
        let cluster = pod.labels().get("app.kubernetes.io/instance")?.clone();
        Some(ObjectRef::<KVCluster>::new(&cluster).within(&pod.namespace()?))
    })
    // A backup that finishes updates the schedule's status and may put an older one past
    // retention.
    .watches(
        api::<KVClusterBackup>(&client, &namespace),
        watcher::Config::default(),
        |b: KVClusterBackup| {
            Some(ObjectRef::<KVCluster>::new(&b.spec.cluster).within(&b.namespace()?))
        },
    )
    .graceful_shutdown_on(shutdown)
    .run(reconcile, error_policy, ctx)
    .for_each(|res| async move {
        match res {
            Ok((obj, action)) => tracing::debug!(cluster = %obj, ?action, "reconciled"),
            Err(e) => tracing::debug!(error = %e, "reconcile loop"),
        }
    });
    futures::join!(clusters, backups);
}

fn key(kvc: &KVCluster) -> String {
    format!("{}/{}", kvc.namespace().unwrap_or_default(), kvc.name_any())
}

pub async fn reconcile(kvc: Arc<KVCluster>, ctx: Arc<Context>) -> Result<Action> {
    let started = Instant::now();
    let result = Reconciler::new(&kvc, &ctx).run().await;
    ctx.metrics
        .duration
        .with_label_values(&[] as &[&str])
        .observe(started.elapsed().as_secs_f64());
    match &result {
        Ok(_) => {
            ctx.metrics.reconciles.with_label_values(&["ok"]).inc();
            ctx.failure_count(&key(&kvc), false);
        }
        Err(e) => {
            ctx.metrics.reconciles.with_label_values(&["error"]).inc();
            ctx.metrics.failures.with_label_values(&[e.kind()]).inc();
        }
    }
    result
}

/// Failed reconciles retry with exponential backoff (2 s doubling to 5 min) and show up in the
/// Degraded condition and as a Warning Event.
pub fn error_policy(kvc: Arc<KVCluster>, err: &Error, ctx: Arc<Context>) -> Action {
    let n = ctx.failure_count(&key(&kvc), true);
    let delay = Duration::from_secs((2u64 << n.min(8)).min(300));
    tracing::warn!(cluster = %key(&kvc), error = %err, retry_in = ?delay, "reconcile failed");
    let message = err.to_string();
    let reason = err.kind();
    tokio::spawn(async move {
        let mut status = kvc.status.clone().unwrap_or_default();
        set_condition(
            &mut status,
            "Degraded",
            true,
            reason,
            &message,
            kvc.meta().generation,
        );
        if let Err(e) = apply_status(&ctx.client, kvc.as_ref(), &status).await {
            tracing::debug!(error = %e, "recording the failure in the status");
        }
        publish(&ctx, &kvc, EventType::Warning, reason, "Reconcile", message).await;
    });
    Action::requeue(delay)
}

async fn publish(
    ctx: &Context,
    kvc: &KVCluster,
    type_: EventType,
    reason: &str,
    action: &str,
    note: String,
) {
    let ev = Event {
        type_,
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: action.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &kvc.object_ref(&())).await {
        tracing::debug!(error = %e, "publishing an event");
    }
}

/// Sets a condition, keeping its transition time when its status does not change.
pub fn set_condition(
    status: &mut KVClusterStatus,
    type_: &str,
    on: bool,
    reason: &str,
    message: &str,
    generation: Option<i64>,
) {
    let value = if on { "True" } else { "False" };
    let now = Time(Timestamp::now());
    let reason = if reason.is_empty() { "Unknown" } else { reason };
    match status.conditions.iter_mut().find(|c| c.type_ == type_) {
        Some(c) => {
            if c.status != value {
                c.last_transition_time = now;
                c.status = value.into();
            }
            c.reason = reason.into();
            c.message = message.into();
            c.observed_generation = generation;
        }
        None => status.conditions.push(Condition {
            type_: type_.into(),
            status: value.into(),
            reason: reason.into(),
            message: message.into(),
            last_transition_time: now,
            observed_generation: generation,
        }),
    }
}

/// Writes `status` as this operator's (server-side apply, forced: the status is ours alone).
pub(crate) async fn apply_status<K>(
    client: &kube::Client,
    obj: &K,
    status: &impl Serialize,
) -> Result<()>
where
    K: Resource<Scope = k8s_openapi::NamespaceResourceScope, DynamicType = ()>
        + DeserializeOwned
        + Clone
        + Debug,
{
    let api: Api<K> = Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default());
    let body = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "status": status,
    });
    api.patch_status(
        &obj.name_any(),
        &PatchParams::apply(MANAGER).force(),
        &Patch::Apply(&body),
    )
    .await?;
    Ok(())
}

async fn apply<K>(api: &Api<K>, obj: &K) -> Result<K>
where
    K: Resource + Serialize + DeserializeOwned + Clone + Debug,
{
    Ok(api
        .patch(
            &obj.meta().name.clone().unwrap_or_default(),
            &PatchParams::apply(MANAGER).force(),
            &Patch::Apply(obj),
        )
        .await?)
}

fn is_not_found(e: &kube::Error) -> bool {
    matches!(e, kube::Error::Api(s) if s.code == 404)
}

async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<()>
where
    K: Resource + DeserializeOwned + Clone + Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// A connection to a cluster's running members, as the reconciler makes it (the operator's
/// root token, the client TLS the spec names); `None` when no member runs.
pub(crate) async fn connect_cluster(kvc: &KVCluster, ctx: &Context) -> Result<Option<Cluster>> {
    let r = Reconciler::new(kvc, ctx);
    let pods = r.pods().await?;
    r.connect(&pods).await
}

/// What a Job needs to reach a cluster as the operator does: the members' client URLs, the
/// client TLS Secret to mount, and a root token living `ttl`; `None` when no member runs.
pub(crate) struct JobAccess {
    pub token: String,
    pub job: crate::volume::JobConnection,
}

pub(crate) async fn job_connection(
    kvc: &KVCluster,
    ctx: &Context,
    ttl: Duration,
) -> Result<Option<JobAccess>> {
    let r = Reconciler::new(kvc, ctx);
    let pods = r.pods().await?;
    let tls_secret = kvc
        .spec
        .tls
        .as_ref()
        .and_then(|t| t.client_secret_name.clone());
    let endpoints = r.endpoints(&pods, tls_secret.is_some());
    if endpoints.is_empty() {
        return Ok(None);
    }
    Ok(Some(JobAccess {
        token: raft::root_token_for(&r.signing_key().await?, ttl)?,
        job: crate::volume::JobConnection {
            endpoints,
            tls_secret,
            domain: r.names.pod_host(0),
        },
    }))
}

/// One reconcile of one cluster.
struct Reconciler<'a> {
    kvc: &'a KVCluster,
    ctx: &'a Context,
    names: Names,
    ns: String,
}

impl<'a> Reconciler<'a> {
    fn new(kvc: &'a KVCluster, ctx: &'a Context) -> Reconciler<'a> {
        let names = Names::of(kvc);
        let ns = names.namespace.clone();
        Reconciler {
            kvc,
            ctx,
            names,
            ns,
        }
    }

    fn api<K>(&self) -> Api<K>
    where
        K: Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        K::DynamicType: Default,
    {
        Api::namespaced(self.ctx.client.clone(), &self.ns)
    }

    async fn run(&self) -> Result<Action> {
        let mut scheduled = false;
        let result = self.converge(&mut scheduled).await;
        if !scheduled && self.kvc.spec.backup.is_some() {
            // Backups matter most while the cluster's own reconcile is failing or refused:
            // the schedule runs on the last status written, and writes only that back.
            let mut status = self.kvc.status.clone().unwrap_or_default();
            match crate::backup::schedule(self.kvc, self.ctx, &mut status).await {
                Ok(_) => {
                    if let Err(e) = apply_status(&self.ctx.client, self.kvc, &status).await {
                        tracing::warn!(cluster = %key(self.kvc), error = %e, "backup schedule status");
                    }
                }
                Err(e) => tracing::warn!(cluster = %key(self.kvc), error = %e, "backup schedule"),
            }
        }
        result
    }

    /// Moves the cluster one step; sets `scheduled` once the backup schedule ran as part of it.
    async fn converge(&self, scheduled: &mut bool) -> Result<Action> {
        let kvc = self.kvc;
        let generation = kvc.meta().generation;
        let mut status = kvc.status.clone().unwrap_or_default();
        status.observed_generation = generation;
        status.selector = Some(resources::selector_string(kvc));

        // An unsafe spec touches nothing.
        if let Err(why) = plan::validate(kvc.spec.replicas) {
            return self.refuse(status, why).await;
        }

        self.ensure_secrets().await?;
        if !status.bootstrapped {
            self.ensure_restore_source().await?;
        }
        self.apply_objects(status.bootstrapped).await?;

        let sts_api: Api<StatefulSet> = self.api();
        let current = sts_api.get_opt(&self.names.statefulset()).await?;
        let pods_wanted = current
            .as_ref()
            .and_then(|s| s.spec.as_ref())
            .and_then(|s| s.replicas);
        let pods = self.pods().await?;
        let volumes = self.volumes().await?;
        let report = self.report(&pods).await;
        let report_only = report.as_ref().map(|(_, r)| r);
        let observed = observe(kvc, &status, pods_wanted, &pods, &volumes, report_only);
        let step = plan::plan(&observed);
        tracing::info!(cluster = %key(kvc), ?step, "planned");

        let replicas = match &step {
            Step::SetPods(n) => *n,
            _ => pods_wanted.unwrap_or(kvc.spec.replicas),
        };
        self.apply_statefulset(current.as_ref(), replicas).await?;
        self.take(&step, report.as_ref().map(|(c, _)| c), &mut status)
            .await?;

        // The status describes the cluster as observed this round, plus the step taken.
        fill_status(
            &mut status,
            kvc,
            &self.names,
            &observed,
            report_only,
            &volumes,
            &step,
        );
        // Backups are the schedule's business: a bucket that is down shows in the
        // BackupScheduled condition, and never stops the cluster's own reconcile.
        let backup_due = match crate::backup::schedule(kvc, self.ctx, &mut status).await {
            Ok(due) => due,
            Err(e) => {
                tracing::warn!(cluster = %key(kvc), error = %e, "backup schedule");
                set_condition(
                    &mut status,
                    "BackupScheduled",
                    false,
                    e.kind(),
                    &e.to_string(),
                    generation,
                );
                Some(Duration::from_secs(30))
            }
        };
        apply_status(&self.ctx.client, kvc, &status).await?;
        *scheduled = true;
        let next = match step {
            Step::Converged => Duration::from_secs(60),
            Step::Degraded(_) => Duration::from_secs(10),
            Step::Refuse(_) => Duration::from_secs(60),
            Step::Wait(_) => Duration::from_secs(3),
            _ => Duration::from_secs(1),
        };
        Ok(Action::requeue(backup_due.map_or(next, |d| d.min(next))))
    }

    async fn refuse(&self, mut status: KVClusterStatus, why: String) -> Result<Action> {
        let already = status
            .conditions
            .iter()
            .any(|c| c.type_ == "Degraded" && c.status == "True" && c.message == why);
        set_condition(
            &mut status,
            "Degraded",
            true,
            "UnsafeSpec",
            &why,
            self.kvc.meta().generation,
        );
        set_condition(
            &mut status,
            "Progressing",
            false,
            "UnsafeSpec",
            "the spec is refused; nothing was changed",
            self.kvc.meta().generation,
        );
        status.phase = Some("Degraded".into());
        apply_status(&self.ctx.client, self.kvc, &status).await?;
        if !already {
            publish(
                self.ctx,
                self.kvc,
                EventType::Warning,
                "UnsafeSpec",
                "Validate",
                why,
            )
            .await;
        }
        Ok(Action::requeue(Duration::from_secs(60)))
    }

    /// Creates the generated Secrets once; an existing Secret is never overwritten (that would
    /// lock every client out, or make stored values unreadable).
    async fn ensure_secrets(&self) -> Result<()> {
        let api: Api<Secret> = self.api();
        let spec = &self.kvc.spec;
        let mut wanted = vec![secrets::root_password(self.kvc)];
        if spec.auth.secret_name.is_none() {
            if spec.auth.algorithm != JwtAlgorithm::HS256 {
                return Err(Error::Secret {
                    name: self.names.jwt_secret(),
                    reason: "RS256 and ES256 need auth.secretName with public.pem and private.pem"
                        .into(),
                });
            }
            wanted.push(secrets::jwt(self.kvc));
        }
        if spec.encryption.enabled && spec.encryption.keyring_secret_name.is_none() {
            wanted.push(secrets::keyring(self.kvc));
        }
        let bad_pki = |name: String| {
            move |e: raftkv_certs::CertError| Error::Secret {
                name,
                reason: e.to_string(),
            }
        };
        let own_peer_pki = spec
            .tls
            .as_ref()
            .and_then(|t| t.peer_secret_name.as_ref())
            .is_none();
        if own_peer_pki && api.get_opt(&self.names.peer_ca_secret()).await?.is_none() {
            wanted.push(secrets::peer_ca(self.kvc).map_err(bad_pki(self.names.peer_ca_secret()))?);
        }
        for s in wanted {
            let name = s.metadata.name.clone().unwrap_or_default();
            if api.get_opt(&name).await?.is_some() {
                continue;
            }
            self.create_secret(&api, &s, "").await?;
        }
        if own_peer_pki {
            let current = api.get_opt(&self.names.peer_tls_secret()).await?;
            let due = current
                .as_ref()
                .map(|s| secrets::peer_tls_due(s, std::time::SystemTime::now()));
            if due != Some(false) {
                // Member certificates from the CA as stored (whoever created it).
                let ca_name = self.names.peer_ca_secret();
                let ca = api.get(&ca_name).await?;
                let field = |k: &str| {
                    secret_field(&ca, k)
                        .and_then(|b| String::from_utf8(b).ok())
                        .ok_or_else(|| Error::Secret {
                            name: ca_name.clone(),
                            reason: format!("has no {k}"),
                        })
                };
                let tls = secrets::peer_tls(
                    self.kvc,
                    &field(secrets::CA_CERT_KEY)?,
                    &field(secrets::CA_KEY_KEY)?,
                )
                .map_err(bad_pki(self.names.peer_tls_secret()))?;
                match current {
                    None => {
                        self.create_secret(&api, &tls, " (member certificates for the peer port)")
                            .await?
                    }
                    Some(old) => {
                        // Members reload renewed certificates without restarting.
                        let mut tls = tls;
                        tls.metadata.resource_version = old.metadata.resource_version.clone();
                        api.replace(&self.names.peer_tls_secret(), &PostParams::default(), &tls)
                            .await?;
                        publish(
                            self.ctx,
                            self.kvc,
                            EventType::Normal,
                            "PeerCertificatesRenewed",
                            "Renew",
                            format!(
                                "renewed the member certificates in Secret {}",
                                self.names.peer_tls_secret()
                            ),
                        )
                        .await;
                    }
                }
            }
        }
        Ok(())
    }

    /// Creates a generated Secret unless someone did first, with an Event saying so.
    /// For `spec.restore`: the Secret with the download the first members make, written once
    /// the backup is known to have succeeded. Until then nothing starts (an error, retried).
    async fn ensure_restore_source(&self) -> Result<()> {
        let Some(restore) = &self.kvc.spec.restore else {
            return Ok(());
        };
        let secrets: Api<Secret> = self.api();
        if secrets
            .get_opt(&self.names.restore_secret())
            .await?
            .is_some()
        {
            return Ok(());
        }
        let backups: Api<KVClusterBackup> = self.api();
        let not_ready =
            |why: String| Error::Backup(format!("restore from {:?}: {why}", restore.backup));
        let b = backups
            .get_opt(&restore.backup)
            .await?
            .ok_or_else(|| not_ready("no such KVClusterBackup in this namespace".into()))?;
        let st = b.status.clone().unwrap_or_default();
        if st.phase.as_deref() != Some("Succeeded") {
            return Err(not_ready(format!(
                "the backup is {}, not Succeeded",
                st.phase.as_deref().unwrap_or("Pending")
            )));
        }
        let sha256 = st
            .sha256
            .clone()
            .ok_or_else(|| not_ready("the backup records no SHA-256".into()))?;
        let key = crate::backup::object_key(
            &b.spec.destination,
            &self.ns,
            &b.spec.cluster,
            &b.name_any(),
        );
        let secret = if let Some(pvc) = &b.spec.destination.pvc {
            // The first members mount the claim read-only and restore from the file there.
            let url = format!("file://{}/{key}", crate::volume::RESTORE_MOUNT);
            secrets::restore(self.kvc, url, sha256, Some(pvc.claim_name.clone()))
        } else {
            let bucket =
                crate::backup::open_bucket(&self.ctx.client, &self.ns, &b.spec.destination)
                    .await
                    .map_err(not_ready)?;
            // S3's longest: a cluster that has not formed within a week needs re-creating.
            let url = bucket.presign_get(&key, Duration::from_secs(7 * 24 * 3600));
            secrets::restore(self.kvc, url, sha256, None)
        };
        self.create_secret(
            &secrets,
            &secret,
            &format!(" to restore from backup {}", restore.backup),
        )
        .await
    }

    async fn create_secret(&self, api: &Api<Secret>, s: &Secret, what: &str) -> Result<()> {
        let name = s.metadata.name.clone().unwrap_or_default();
        match api.create(&PostParams::default(), s).await {
            Ok(_) => {
                publish(
                    self.ctx,
                    self.kvc,
                    EventType::Normal,
                    "SecretCreated",
                    "Create",
                    format!("generated Secret {name}{what}"),
                )
                .await;
                Ok(())
            }
            Err(kube::Error::Api(e)) if e.code == 409 => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn apply_objects(&self, bootstrapped: bool) -> Result<()> {
        let kvc = self.kvc;
        apply(
            &self.api::<ConfigMap>(),
            &config::config_map(kvc, kvc.spec.replicas, bootstrapped),
        )
        .await?;
        let svc: Api<Service> = self.api();
        apply(&svc, &services::peer(kvc)).await?;
        apply(&svc, &services::client(kvc)).await?;
        let pdbs: Api<PodDisruptionBudget> = self.api();
        if kvc.spec.pod_disruption_budget.enabled {
            apply(&pdbs, &pdb::pdb(kvc)).await?;
        } else {
            delete_if_present(&pdbs, &self.names.pdb()).await?;
        }
        if self.ctx.has_service_monitors().await {
            let api: Api<DynamicObject> = Api::namespaced_with(
                self.ctx.client.clone(),
                &self.ns,
                &servicemonitor::api_resource(),
            );
            if kvc.spec.monitoring.service_monitor {
                apply(&api, &servicemonitor::service_monitor(kvc)).await?;
            } else {
                delete_if_present(&api, &self.names.cluster).await?;
            }
        } else if kvc.spec.monitoring.service_monitor {
            tracing::info!(cluster = %key(kvc), "monitoring.serviceMonitor is on but the cluster has no ServiceMonitor API; skipped");
        }
        Ok(())
    }

    async fn apply_statefulset(&self, current: Option<&StatefulSet>, replicas: i32) -> Result<()> {
        let mut sts = statefulset::statefulset(self.kvc, replicas);
        // Volume claim templates cannot change after creation: keep the ones the set has.
        if let (Some(cur), Some(spec)) = (current.and_then(|c| c.spec.as_ref()), sts.spec.as_mut())
            && cur.volume_claim_templates.is_some()
        {
            if let (Some(a), Some(b)) = (&cur.volume_claim_templates, &spec.volume_claim_templates)
                && claim_size(a) != claim_size(b)
            {
                tracing::warn!(cluster = %key(self.kvc), "storage.size changed; existing volumes keep their size");
            }
            spec.volume_claim_templates = cur.volume_claim_templates.clone();
        }
        // A restore from a claim mounts it; the Secret is written once, so the pod template
        // stays the same for the cluster's life.
        if self.kvc.spec.restore.is_some()
            && let Some(s) = self
                .api::<Secret>()
                .get_opt(&self.names.restore_secret())
                .await?
            && let Some(claim) = secret_field(&s, secrets::RESTORE_CLAIM_KEY)
        {
            statefulset::mount_restore_claim(&mut sts, &String::from_utf8_lossy(&claim));
        }
        apply(&self.api::<StatefulSet>(), &sts).await?;
        Ok(())
    }

    async fn pods(&self) -> Result<Vec<Pod>> {
        let lp = ListParams::default().labels(&resources::selector_string(self.kvc));
        Ok(self.api::<Pod>().list(&lp).await?.items)
    }

    /// The UID of each member's volume claim, by ordinal.
    async fn volumes(&self) -> Result<BTreeMap<i32, String>> {
        let lp = ListParams::default().labels(&resources::selector_string(self.kvc));
        let prefix = format!("data-{}-", self.names.statefulset());
        let mut out = BTreeMap::new();
        for pvc in self.api::<PersistentVolumeClaim>().list(&lp).await?.items {
            let name = pvc.name_any();
            let Some(ordinal) = name
                .strip_prefix(&prefix)
                .and_then(|o| o.parse::<i32>().ok())
            else {
                continue;
            };
            if pvc.metadata.deletion_timestamp.is_some() {
                continue;
            }
            if let Some(uid) = pvc.uid() {
                out.insert(ordinal, uid);
            }
        }
        Ok(out)
    }

    async fn signing_key(&self) -> Result<SigningKey> {
        let spec = &self.kvc.spec.auth;
        let name = spec
            .secret_name
            .clone()
            .unwrap_or_else(|| self.names.jwt_secret());
        let secret = self.api::<Secret>().get(&name).await?;
        let field = match spec.algorithm {
            JwtAlgorithm::HS256 => secrets::JWT_KEY,
            _ => secrets::PRIVATE_KEY,
        };
        let material = secret_field(&secret, field).ok_or_else(|| Error::Secret {
            name: name.clone(),
            reason: format!("has no `{field}` key"),
        })?;
        Ok(SigningKey {
            algorithm: spec.algorithm,
            material,
            issuer: spec.issuer.clone(),
            audience: spec.audience.clone(),
        })
    }

    async fn client_tls(&self) -> Result<Option<TlsOptions>> {
        let Some(name) = self
            .kvc
            .spec
            .tls
            .as_ref()
            .and_then(|t| t.client_secret_name.clone())
        else {
            return Ok(None);
        };
        let secret = self.api::<Secret>().get(&name).await?;
        let identity = secret_field(&secret, "tls.crt").zip(secret_field(&secret, "tls.key"));
        Ok(Some(TlsOptions {
            ca_pem: secret_field(&secret, "ca.crt"),
            identity_pem: identity,
            domain: Some(self.names.pod_host(0)),
        }))
    }

    /// The client URLs of the running members.
    fn endpoints(&self, pods: &[Pod], tls: bool) -> Vec<String> {
        let scheme = if tls { "https" } else { "http" };
        pods.iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
            .filter_map(|p| p.status.as_ref()?.pod_ip.clone())
            .map(|ip| format!("{scheme}://{ip}:{CLIENT_PORT}"))
            .collect()
    }

    async fn connect(&self, pods: &[Pod]) -> Result<Option<Cluster>> {
        let tls = self.client_tls().await?;
        let endpoints = self.endpoints(pods, tls.is_some());
        if endpoints.is_empty() {
            return Ok(None);
        }
        let token = raft::root_token(&self.signing_key().await?)?;
        Ok(Some(Cluster::connect(endpoints, token, tls).await?))
    }

    /// What the members report; `None` when none could be asked.
    async fn report(&self, pods: &[Pod]) -> Option<(Cluster, Report)> {
        let cluster = match self.connect(pods).await {
            Ok(Some(c)) => c,
            Ok(None) => return None,
            Err(e) => {
                tracing::info!(cluster = %key(self.kvc), error = %e, "cannot reach the members");
                return None;
            }
        };
        match cluster.report().await {
            Ok(r) => Some((cluster, r)),
            Err(e) => {
                tracing::info!(cluster = %key(self.kvc), error = %e, "members did not report");
                None
            }
        }
    }

    async fn take(
        &self,
        step: &Step,
        cluster: Option<&Cluster>,
        status: &mut KVClusterStatus,
    ) -> Result<()> {
        let kvc = self.kvc;
        let (reason, note) = match step {
            Step::SetPods(n) => ("Scaling", format!("set the StatefulSet to {n} pods")),
            Step::AddLearner(k) => {
                let url = self.names.peer_url(*k);
                members(cluster)?.add_learner(id_of(*k), &url).await?;
                (
                    "MemberAdded",
                    format!("added {} as learner {}", self.names.pod(*k), id_of(*k)),
                )
            }
            Step::Promote(id) => {
                members(cluster)?.promote(*id).await?;
                (
                    "MemberPromoted",
                    format!(
                        "promoted member {id} ({}) to voter",
                        self.names.pod(ordinal_of(*id))
                    ),
                )
            }
            Step::RemoveMember(id, why) => {
                members(cluster)?.remove(*id).await?;
                (
                    "MemberRemoved",
                    format!(
                        "removed member {id} ({}) from Raft: {why:?}",
                        self.names.pod(ordinal_of(*id))
                    ),
                )
            }
            Step::MoveLeader { from, to } => {
                members(cluster)?.move_leader(*to).await?;
                (
                    "LeaderMoved",
                    format!("moved leadership from member {from} to member {to}"),
                )
            }
            Step::RestartPod(k) => {
                let name = self.names.pod(*k);
                delete_if_present(&self.api::<Pod>(), &name).await?;
                (
                    "MemberRestarted",
                    format!("restarting {name} at version {}", kvc.spec.version),
                )
            }
            Step::MarkBootstrapped => {
                status.bootstrapped = true;
                self.apply_objects(true).await?;
                (
                    "ClusterFormed",
                    format!("{} members formed the cluster", kvc.spec.replicas),
                )
            }
            Step::Refuse(why) => {
                publish(
                    self.ctx,
                    kvc,
                    EventType::Warning,
                    "UnsafeSpec",
                    "Validate",
                    why.clone(),
                )
                .await;
                return Ok(());
            }
            Step::Degraded(why) => {
                let seen = status
                    .conditions
                    .iter()
                    .any(|c| c.type_ == "Degraded" && c.status == "True" && &c.message == why);
                if !seen {
                    publish(
                        self.ctx,
                        kvc,
                        EventType::Warning,
                        "Degraded",
                        "Observe",
                        why.clone(),
                    )
                    .await;
                }
                return Ok(());
            }
            Step::Wait(_) | Step::Converged => return Ok(()),
        };
        self.ctx.metrics.steps.with_label_values(&[reason]).inc();
        tracing::info!(cluster = %key(kvc), %note, "step");
        // The action names the member, so each step is its own Event rather than a count on
        // the previous one with the same reason.
        let action = step_action(step, &self.names);
        publish(self.ctx, kvc, EventType::Normal, reason, &action, note).await;
        Ok(())
    }
}

/// The connection the members reported through, for the membership call the plan chose (the
/// planner only chooses one when members reported).
fn members(cluster: Option<&Cluster>) -> Result<&Cluster> {
    cluster.ok_or_else(|| {
        Error::Raft(raftkv_client::Error::Unavailable(
            "no member answered this round".into(),
        ))
    })
}

fn secret_field(s: &Secret, key: &str) -> Option<Vec<u8>> {
    s.data
        .as_ref()
        .and_then(|d| d.get(key))
        .map(|b| b.0.clone())
        .or_else(|| {
            s.string_data
                .as_ref()?
                .get(key)
                .map(|v| v.clone().into_bytes())
        })
}

fn claim_size(claims: &[PersistentVolumeClaim]) -> Option<String> {
    claims
        .first()?
        .spec
        .as_ref()?
        .resources
        .as_ref()?
        .requests
        .as_ref()?
        .get("storage")
        .map(|q| q.0.clone())
}

fn pod_view(p: &Pod, names: &Names) -> Option<PodView> {
    let ordinal = p
        .name_any()
        .strip_prefix(&format!("{}-", names.statefulset()))?
        .parse()
        .ok()?;
    let status = p.status.as_ref();
    let ready = status
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"));
    let terminating = p.metadata.deletion_timestamp.is_some();
    Some(PodView {
        ordinal,
        running: !terminating && status.and_then(|s| s.phase.as_deref()) == Some("Running"),
        ready: ready && !terminating,
        terminating,
        version: p
            .annotations()
            .get(statefulset::VERSION_ANNOTATION)
            .cloned(),
    })
}

/// Everything the planner needs, from the Kubernetes objects and the members' reports.
pub fn observe(
    kvc: &KVCluster,
    status: &KVClusterStatus,
    pods_wanted: Option<i32>,
    pods: &[Pod],
    volumes: &BTreeMap<i32, String>,
    report: Option<&Report>,
) -> Observed {
    let names = Names::of(kvc);
    Observed {
        replicas: kvc.spec.replicas,
        version: kvc.spec.version.clone(),
        pods_wanted,
        pods: pods.iter().filter_map(|p| pod_view(p, &names)).collect(),
        raft: report.and_then(|r| raft_view(r, status, volumes)),
        bootstrapped: status.bootstrapped,
    }
}

/// The Raft group as the planner sees it: `None` without a leader. A member whose volume claim
/// is not the one recorded when it joined has lost its data.
pub fn raft_view(
    r: &Report,
    status: &KVClusterStatus,
    volumes: &BTreeMap<i32, String>,
) -> Option<RaftView> {
    let leader = r.leader?;
    if r.members.is_empty() {
        return None;
    }
    let recorded: BTreeMap<u64, &str> = status
        .members
        .iter()
        .filter_map(|m| Some((u64::try_from(m.id).ok()?, m.volume_uid.as_deref()?)))
        .collect();
    Some(RaftView {
        members: r
            .members
            .iter()
            .map(|m| MemberView {
                id: m.id,
                learner: m.is_learner,
                applied: r.applied.get(&m.id).copied(),
                volume_replaced: match (recorded.get(&m.id), volumes.get(&ordinal_of(m.id))) {
                    (Some(was), Some(now)) => was != now,
                    _ => false,
                },
            })
            .collect(),
        leader,
        commit: r.commit,
    })
}

fn step_action(step: &Step, names: &Names) -> String {
    let pod = |id: u64| names.pod(ordinal_of(id));
    match step {
        Step::SetPods(n) => format!("SetPods {n}"),
        Step::AddLearner(k) => format!("AddLearner {}", names.pod(*k)),
        Step::Promote(id) => format!("Promote {}", pod(*id)),
        Step::RemoveMember(id, why) => format!("RemoveMember {} {why:?}", pod(*id)),
        Step::MoveLeader { from, to } => format!("MoveLeader {} {}", pod(*from), pod(*to)),
        Step::RestartPod(k) => format!("Restart {}", names.pod(*k)),
        other => step_reason(other).to_string(),
    }
}

fn step_reason(step: &Step) -> &'static str {
    match step {
        Step::SetPods(_) => "ScalingPods",
        Step::AddLearner(_) => "AddingMember",
        Step::Promote(_) => "PromotingMember",
        Step::RemoveMember(..) => "RemovingMember",
        Step::MoveLeader { .. } => "MovingLeader",
        Step::RestartPod(_) => "RollingUpgrade",
        Step::MarkBootstrapped => "ClusterFormed",
        Step::Wait(_) => "Waiting",
        Step::Refuse(_) => "UnsafeSpec",
        Step::Degraded(_) => "Degraded",
        Step::Converged => "Converged",
    }
}

/// The status after a reconcile: members and leader as observed, phase and conditions from the
/// step taken.
pub fn fill_status(
    status: &mut KVClusterStatus,
    kvc: &KVCluster,
    names: &Names,
    o: &Observed,
    report: Option<&Report>,
    volumes: &BTreeMap<i32, String>,
    step: &Step,
) {
    let generation = kvc.meta().generation;
    status.replicas = o.pods.iter().filter(|p| !p.terminating).count() as i32;
    status.ready_replicas = o.pods.iter().filter(|p| p.ready).count() as i32;
    if let Some(r) = &o.raft {
        let recorded: BTreeMap<u64, Option<String>> = status
            .members
            .iter()
            .filter_map(|m| Some((u64::try_from(m.id).ok()?, m.volume_uid.clone())))
            .collect();
        status.members = r
            .members
            .iter()
            .map(|m| MemberStatus {
                id: i64::try_from(m.id).unwrap_or(i64::MAX),
                pod: names.pod(m.ordinal()),
                role: if m.id == r.leader {
                    "leader"
                } else if m.learner {
                    "learner"
                } else {
                    "follower"
                }
                .into(),
                healthy: r.caught_up(m),
                applied_index: m
                    .applied
                    .map_or(0, |a| i64::try_from(a).unwrap_or(i64::MAX)),
                // A member keeps the volume it was first seen on until it is replaced.
                volume_uid: match recorded.get(&m.id) {
                    Some(Some(uid)) if !m.volume_replaced => Some(uid.clone()),
                    _ => volumes.get(&m.ordinal()).cloned(),
                },
            })
            .collect();
        status.leader = Some(names.pod(ordinal_of(r.leader)));
    } else if report.is_none() {
        status.leader = None;
    }
    let all_current = (0..kvc.spec.replicas).all(|k| {
        o.pods
            .iter()
            .any(|p| p.ordinal == k && p.version.as_deref() == Some(kvc.spec.version.as_str()))
    });
    status.current_version = all_current.then(|| kvc.spec.version.clone());

    let available = o.raft.as_ref().is_some_and(RaftView::has_healthy_quorum);
    set_condition(
        status,
        "Available",
        available,
        if available {
            "QuorumHealthy"
        } else {
            "NoQuorum"
        },
        if available {
            "a leader is elected and a quorum of members is caught up"
        } else {
            "no leader with a caught-up quorum"
        },
        generation,
    );
    let (progressing, degraded, phase, message) = match step {
        Step::Converged => (
            false,
            None,
            "Running",
            "the cluster matches the spec".to_string(),
        ),
        Step::Refuse(w) => (false, Some("UnsafeSpec"), "Degraded", w.clone()),
        Step::Degraded(w) => (
            true,
            Some(if o.raft.is_none() {
                "NoQuorum"
            } else {
                "MemberUnhealthy"
            }),
            "Degraded",
            w.clone(),
        ),
        Step::Wait(w) => (true, None, phase_of(o, status), w.clone()),
        other => (true, None, phase_of(o, status), format!("{other:?}")),
    };
    set_condition(
        status,
        "Progressing",
        progressing,
        step_reason(step),
        &message,
        generation,
    );
    match degraded {
        Some(reason) => set_condition(status, "Degraded", true, reason, &message, generation),
        None => set_condition(status, "Degraded", false, "Healthy", "", generation),
    }
    status.phase = Some(phase.into());
}

fn phase_of(o: &Observed, status: &KVClusterStatus) -> &'static str {
    if !status.bootstrapped {
        return "Creating";
    }
    let voters = o
        .raft
        .as_ref()
        .map_or(0, |r| r.members.iter().filter(|m| !m.learner).count());
    if voters != o.replicas as usize || o.pods_wanted != Some(o.replicas) {
        "Scaling"
    } else {
        "Upgrading"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::cluster;

    fn observed(step_raft: bool) -> Observed {
        Observed {
            replicas: 3,
            version: "0.1.0".into(),
            pods_wanted: Some(3),
            pods: (0..3)
                .map(|k| PodView {
                    ordinal: k,
                    running: true,
                    ready: true,
                    terminating: false,
                    version: Some("0.1.0".into()),
                })
                .collect(),
            raft: step_raft.then(|| RaftView {
                members: (1..=3)
                    .map(|id| MemberView {
                        id,
                        learner: false,
                        applied: Some(100),
                        volume_replaced: false,
                    })
                    .collect(),
                leader: 2,
                commit: 100,
            }),
            bootstrapped: true,
        }
    }

    #[test]
    fn a_converged_cluster_is_available_and_running() {
        let kvc = cluster(3);
        let mut st = KVClusterStatus {
            bootstrapped: true,
            ..Default::default()
        };
        let o = observed(true);
        let vols = BTreeMap::from([(0, "a".to_string()), (1, "b".into()), (2, "c".into())]);
        fill_status(
            &mut st,
            &kvc,
            &Names::of(&kvc),
            &o,
            None,
            &vols,
            &Step::Converged,
        );
        assert_eq!(st.phase.as_deref(), Some("Running"));
        assert_eq!(st.leader.as_deref(), Some("kv-1"));
        assert_eq!(st.members.len(), 3);
        assert_eq!(st.members[1].role, "leader");
        assert_eq!(st.members[0].volume_uid.as_deref(), Some("a"));
        assert_eq!(st.current_version.as_deref(), Some("0.1.0"));
        let cond = |t: &str| {
            st.conditions
                .iter()
                .find(|c| c.type_ == t)
                .unwrap()
                .status
                .clone()
        };
        assert_eq!(cond("Available"), "True");
        assert_eq!(cond("Progressing"), "False");
        assert_eq!(cond("Degraded"), "False");
    }

    #[test]
    fn no_quorum_is_degraded_and_unavailable() {
        let kvc = cluster(3);
        let mut st = KVClusterStatus {
            bootstrapped: true,
            ..Default::default()
        };
        let o = observed(false);
        let step = plan::plan(&o);
        fill_status(
            &mut st,
            &kvc,
            &Names::of(&kvc),
            &o,
            None,
            &BTreeMap::new(),
            &step,
        );
        let c = |t: &str| st.conditions.iter().find(|c| c.type_ == t).unwrap().clone();
        assert_eq!(c("Available").status, "False");
        assert_eq!(c("Degraded").status, "True");
        assert_eq!(c("Degraded").reason, "NoQuorum");
        assert_eq!(st.phase.as_deref(), Some("Degraded"));
    }

    #[test]
    fn conditions_keep_their_transition_time_while_unchanged() {
        let mut st = KVClusterStatus::default();
        set_condition(&mut st, "Available", true, "QuorumHealthy", "", Some(1));
        let first = st.conditions[0].last_transition_time.clone();
        std::thread::sleep(Duration::from_millis(5));
        set_condition(
            &mut st,
            "Available",
            true,
            "QuorumHealthy",
            "still",
            Some(2),
        );
        assert_eq!(st.conditions[0].last_transition_time, first);
        set_condition(&mut st, "Available", false, "NoQuorum", "", Some(3));
        assert_ne!(st.conditions[0].last_transition_time, first);
        assert_eq!(st.conditions.len(), 1);
    }

    #[test]
    fn a_new_volume_under_a_member_is_seen_as_data_loss() {
        let status = KVClusterStatus {
            bootstrapped: true,
            members: vec![MemberStatus {
                id: 2,
                volume_uid: Some("old".into()),
                ..Default::default()
            }],
            ..Default::default()
        };
        let report = Report {
            members: (1..=3)
                .map(|id| raftkv_client::Member {
                    id,
                    name: String::new(),
                    peer_urls: vec![],
                    client_urls: vec![],
                    is_learner: false,
                })
                .collect(),
            applied: BTreeMap::from([(1, 10), (2, 10), (3, 10)]),
            leader: Some(1),
            commit: 10,
        };
        let vols = BTreeMap::from([(1, "new".to_string())]);
        let r = raft_view(&report, &status, &vols).unwrap();
        let m2 = r.members.iter().find(|m| m.id == 2).unwrap();
        assert!(m2.volume_replaced);
        assert!(
            !r.members[0].volume_replaced,
            "no volume recorded: nothing to compare"
        );
    }
}
