//! The operator's own Prometheus metrics: reconciles by result, their duration, failures by
//! kind, and the steps taken on clusters.

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry};

#[derive(Clone)]
pub struct Metrics {
    pub registry: Registry,
    pub reconciles: IntCounterVec,
    pub failures: IntCounterVec,
    pub duration: HistogramVec,
    pub steps: IntCounterVec,
    pub leader: IntGauge,
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
