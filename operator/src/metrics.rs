//! The operator's own Prometheus metrics: reconciles by result, their duration, failures by
//! kind, and the steps taken on clusters.

use prometheus::{
    GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry,
};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub failures: IntCounterVec,
    pub duration: HistogramVec,
    pub steps: IntCounterVec,
    pub leader: IntGauge,
    pub backups: IntCounterVec,
    pub backup_duration: Histogram,
    pub backup_last_success: GaugeVec,
    pub backup_last_size: GaugeVec,
    pub backup_interval: GaugeVec,
}

impl Metrics {
    pub fn new() -> Result<Metrics, prometheus::Error> {
        let registry = Registry::new();
        let reconciles = IntCounterVec::new(
            Opts::new(
                "raftkv_operator_reconciliations_total",
                "Reconciliations of KVCluster resources, by result.",
            ),
            &["result"],
        )?;
        let failures = IntCounterVec::new(
            Opts::new(
                "raftkv_operator_reconcile_failures_total",
                "Failed reconciliations, by error kind.",
            ),
            &["error"],
        )?;
        let duration = HistogramVec::new(
            HistogramOpts::new(
                "raftkv_operator_reconcile_duration_seconds",
                "How long a reconciliation took.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
            &[],
        )?;
        let steps = IntCounterVec::new(
            Opts::new(
                "raftkv_operator_cluster_steps_total",
                "Changes the operator made to clusters, by step.",
            ),
            &["step"],
        )?;
        let leader = IntGauge::new(
            "raftkv_operator_is_leader",
            "1 while this replica holds the leader-election lease.",
        )?;
        let backups = IntCounterVec::new(
            Opts::new(
                "raftkv_operator_backups_total",
                "Backup attempts, by result (succeeded or failed).",
            ),
            &["result"],
        )?;
        let backup_duration = Histogram::with_opts(
            HistogramOpts::new(
                "raftkv_operator_backup_duration_seconds",
                "How long a successful backup took, from the first byte to the completed object.",
            )
            .buckets(vec![1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 10800.0]),
        )?;
        let backup_last_success = GaugeVec::new(
            Opts::new(
                "raftkv_operator_backup_last_success_timestamp_seconds",
                "When a cluster's newest successful backup completed (Unix time).",
            ),
            &["namespace", "cluster"],
        )?;
        let backup_last_size = GaugeVec::new(
            Opts::new(
                "raftkv_operator_backup_last_size_bytes",
                "Size of a cluster's newest successful backup.",
            ),
            &["namespace", "cluster"],
        )?;
        let backup_interval = GaugeVec::new(
            Opts::new(
                "raftkv_operator_backup_interval_seconds",
                "Time between a cluster's scheduled backups (for alerting on stale ones).",
            ),
            &["namespace", "cluster"],
        )?;
        registry.register(Box::new(backups.clone()))?;
        registry.register(Box::new(backup_duration.clone()))?;
        registry.register(Box::new(backup_last_success.clone()))?;
        registry.register(Box::new(backup_last_size.clone()))?;
        registry.register(Box::new(backup_interval.clone()))?;
        registry.register(Box::new(reconciles.clone()))?;
        registry.register(Box::new(failures.clone()))?;
        registry.register(Box::new(duration.clone()))?;
        registry.register(Box::new(steps.clone()))?;
        registry.register(Box::new(leader.clone()))?;
        #[cfg(target_os = "linux")]
        registry.register(Box::new(
            prometheus::process_collector::ProcessCollector::for_self(),
        ))?;
        Ok(Metrics {
            registry,
            reconciles,
            failures,
            duration,
            steps,
            leader,
            backups,
            backup_duration,
            backup_last_success,
            backup_last_size,
            backup_interval,
        })
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Err(e) =
            prometheus::TextEncoder::new().encode_utf8(&self.registry.gather(), &mut out)
        {
            tracing::warn!(error = %e, "encoding metrics");
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_render_with_conventional_names() {
        let m = Metrics::new().unwrap();
        m.reconciles.with_label_values(&["ok"]).inc();
        m.failures.with_label_values(&["KubernetesApiError"]).inc();
        m.duration.with_label_values(&[] as &[&str]).observe(0.2);
        let text = m.render();
        assert!(text.contains("raftkv_operator_reconciliations_total{result=\"ok\"} 1"));
        assert!(text.contains("raftkv_operator_reconcile_duration_seconds_bucket"));
        assert!(
            text.contains(
                "raftkv_operator_reconcile_failures_total{error=\"KubernetesApiError\"} 1"
            )
        );
    }
}
