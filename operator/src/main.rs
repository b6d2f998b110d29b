//! `raftkv-operator`: runs the KVCluster controller (`run`, the default), prints the CRD
//! (`crd`), or does a backup Job's work (`backup-save`, `backup-delete`).

use anyhow::Context as _;
use axum::Router;
use axum::routing::get;
use clap::{Parser, Subcommand};
use raftkv_operator::{controller, crd, leader::LeaseLock, metrics::Metrics, telemetry, volume};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;

#[derive(Parser)]
#[command(
    name = "raftkv-operator",
    version,
    about = "Kubernetes operator for raftkv clusters"
)]
#[command(args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Reconcile KVCluster resources (the default).
    Run(RunArgs),
    /// Print a CustomResourceDefinition as YAML (KVCluster, or KVClusterBackup with
    /// `--backup`).
    Crd {
        #[arg(long)]
        backup: bool,
    },
    /// Stream a backup into a file on a mounted claim (what a backup Job runs).
    BackupSave(volume::SaveArgs),
    /// Delete a backup file from a mounted claim (what a retention Job runs).
    BackupDelete(volume::DeleteArgs),
}

#[derive(clap::Args)]
struct RunArgs {
    /// Address of the HTTP port serving /metrics, /healthz and /readyz.
    #[arg(
        long,
        env = "RAFTKV_OPERATOR_METRICS_ADDR",
        default_value = "0.0.0.0:8080"
    )]
    metrics_addr: String,
    /// Watch only this namespace (default: all namespaces).
    #[arg(long, env = "WATCH_NAMESPACE")]
    namespace: Option<String>,
    /// Run without the leader-election lease (only for a single replica).
    #[arg(long, env = "RAFTKV_OPERATOR_NO_LEADER_ELECTION")]
    no_leader_election: bool,
    /// Namespace of the leader-election Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "default")]
    lease_namespace: String,
    #[arg(
        long,
        env = "RAFTKV_OPERATOR_LEASE_NAME",
        default_value = "raftkv-operator"
    )]
    lease_name: String,
    /// This replica's identity in the lease (default: the pod name).
    #[arg(long, env = "POD_NAME")]
    identity: Option<String>,
    /// Log as JSON lines.
    #[arg(long, env = "RAFTKV_OPERATOR_LOG_JSON")]
    log_json: bool,
    /// The image of the Jobs that write backups to PersistentVolumeClaims: this operator's own
    /// (the chart sets it); default `raftkv-operator:<version>`.
    #[arg(long, env = "RAFTKV_OPERATOR_IMAGE")]
    job_image: Option<String>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.cmd {
        Some(Cmd::Crd { backup }) => {
            let yaml = if backup {
                crd::backup_crd_yaml()
            } else {
                crd::crd_yaml()
            };
            print!("{}", yaml.context("rendering the CRD")?);
            Ok(())
        }
        Some(Cmd::BackupSave(args)) => {
            telemetry::init(false);
            if volume::save(args).await {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Some(Cmd::BackupDelete(args)) => {
            telemetry::init(false);
            if volume::delete(args) {
                Ok(())
            } else {
                std::process::exit(1)
            }
        }
        Some(Cmd::Run(args)) => run(args).await,
        None => run(cli.run).await,
    }
}

async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term => {}
    }
}

async fn run(args: RunArgs) -> anyhow::Result<()> {
    telemetry::init(args.log_json);
    let client = kube::Client::try_default()
        .await
        .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
    let metrics = Metrics::new().context("registering metrics")?;
    let identity = args.identity.clone().unwrap_or_else(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
        format!("{}-{}", host.trim(), std::process::id())
    });

    let (stop_tx, stop_rx) = watch::channel(false);
    let http = {
        let m = metrics.clone();
        let app = Router::new()
            .route("/metrics", get(move || async move { m.render() }))
            .route("/healthz", get(|| async { "ok" }))
            .route("/readyz", get(|| async { "ok" }));
        let listener = tokio::net::TcpListener::bind(&args.metrics_addr)
            .await
            .with_context(|| format!("binding {}", args.metrics_addr))?;
        tracing::info!(addr = %args.metrics_addr, "serving /metrics, /healthz and /readyz");
        let mut rx = stop_rx.clone();
        tokio::spawn(async move {
            let stop = async move {
                let _ = rx.wait_for(|s| *s).await;
            };
            if let Err(e) = axum::serve(listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::error!(error = %e, "metrics server");
            }
        })
    };
    tokio::spawn(async move {
        shutdown_signal().await;
        tracing::info!("shutting down");
        let _ = stop_tx.send(true);
    });

    let wait_stop = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let lock = (!args.no_leader_election).then(|| {
        LeaseLock::new(
            client.clone(),
            &args.lease_namespace,
            &args.lease_name,
            &identity,
            Duration::from_secs(15),
        )
    });
    if let Some(lock) = &lock {
        tracing::info!(
            identity = lock.identity(),
            "waiting for the leader-election lease"
        );
        tokio::select! {
            _ = lock.acquire() => {}
            _ = wait_stop(stop_rx.clone()) => return Ok(()),
        }
        tracing::info!(identity = lock.identity(), "leading");
        metrics.leader.set(1);
    }

    let mut ctx = controller::Context::new(client.clone(), metrics.clone(), identity);
    if let Some(image) = args.job_image.clone() {
        ctx = ctx.with_job_image(image);
    }
    let ctx = Arc::new(ctx);
    let lost = Arc::new(tokio::sync::Notify::new());
    let stop = {
        let lost = lost.clone();
        let rx = stop_rx.clone();
        async move {
            tokio::select! {
                _ = wait_stop(rx) => {}
                _ = lost.notified() => {}
            }
        }
    };
    let holder = lock.map(Arc::new);
    let renew = holder.clone().map(|l| {
        let lost = lost.clone();
        tokio::spawn(async move {
            l.hold().await;
            lost.notify_one();
        })
    });
    tracing::info!(namespace = ?args.namespace, "controller started");
    controller::run(ctx, args.namespace.clone(), stop).await;
    let lease_lost = renew.as_ref().is_some_and(|r| r.is_finished());
    if let Some(r) = renew {
        r.abort();
    }
    metrics.leader.set(0);
    if lease_lost {
        anyhow::bail!(
            "lost the leader-election lease; exiting so a fresh start re-joins the election"
        );
    }
    if let Some(l) = holder {
        l.release().await;
    }
    let _ = http.await;
    Ok(())
}
