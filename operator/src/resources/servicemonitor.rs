//! The Prometheus Operator ServiceMonitor, built as a dynamic object: the operator has no
//! compile-time dependency on that API and only creates it when the cluster serves
//! `monitoring.coreos.com/v1`.

use super::{Names, owned_meta, selector_labels};
use crate::crd::KVCluster;
use kube::api::{ApiResource, DynamicObject, GroupVersionKind};

pub fn api_resource() -> ApiResource {
    ApiResource::from_gvk_with_plural(
        &GroupVersionKind::gvk("monitoring.coreos.com", "v1", "ServiceMonitor"),
        "servicemonitors",
    )
}

pub fn service_monitor(kvc: &KVCluster) -> DynamicObject {
    let n = Names::of(kvc);
    let mut meta = owned_meta(kvc, n.cluster.clone());
    if let Some(labels) = meta.labels.as_mut() {
        labels.extend(kvc.spec.monitoring.labels.clone());
    }
    let mut obj = DynamicObject::new(&n.cluster, &api_resource());
    obj.metadata = meta;
    obj.data = serde_json::json!({
        "spec": {
            "selector": { "matchLabels": selector_labels(kvc) },
            "namespaceSelector": { "matchNames": [n.namespace] },
            "endpoints": [{ "port": "metrics", "path": "/metrics", "interval": kvc.spec.monitoring.interval }],
        }
    });
    obj
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::cluster;

    #[test]
    fn scrapes_the_metrics_port_with_the_users_labels() {
        let mut kvc = cluster(3);
        kvc.spec
            .monitoring
            .labels
            .insert("release".into(), "prom".into());
        let sm = service_monitor(&kvc);
        assert_eq!(sm.metadata.labels.as_ref().unwrap()["release"], "prom");
        assert_eq!(sm.data["spec"]["endpoints"][0]["port"], "metrics");
        assert_eq!(sm.data["spec"]["endpoints"][0]["interval"], "30s");
    }
}
