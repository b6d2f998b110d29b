//! The ConfigMap members read their cluster-wide settings from (as environment variables):
//! who the initial members are, whether a starting member forms the cluster or joins it, and
//! Raft tuning.

use super::{Names, owned_meta};
use crate::crd::KVCluster;
use k8s_openapi::api::core::v1::ConfigMap;
use std::collections::BTreeMap;

/// `bootstrapped`: the cluster has formed, so a member starting with empty storage joins the
/// existing cluster (after the operator adds it) instead of forming a new one.
pub fn config_map(kvc: &KVCluster, initial_replicas: i32, bootstrapped: bool) -> ConfigMap {
    let n = Names::of(kvc);
    let initial: Vec<String> = (0..initial_replicas)
        .map(|o| format!("{}={}", o + 1, n.peer_url(o)))
        .collect();
    let mut data = BTreeMap::from([
        ("RAFTKV_INITIAL_CLUSTER".to_string(), initial.join(",")),
        (
            "RAFTKV_INITIAL_CLUSTER_STATE".to_string(),
            if bootstrapped { "existing" } else { "new" }.to_string(),
        ),
        ("RAFTKV_CLUSTER_TOKEN".to_string(), n.cluster_token()),
        (
            "RAFTKV_ELECTION_TIMEOUT_MS".to_string(),
            kvc.spec.raft.election_timeout_ms.to_string(),
        ),
        (
            "RAFTKV_HEARTBEAT_INTERVAL_MS".to_string(),
            kvc.spec.raft.heartbeat_interval_ms.to_string(),
        ),
        (
            "RAFTKV_SNAPSHOT_THRESHOLD".to_string(),
            kvc.spec.raft.snapshot_threshold.to_string(),
        ),
        ("RAFTKV_LOG_FORMAT".to_string(), "json".to_string()),
    ]);
    if let Some(i) = &kvc.spec.auth.issuer {
        data.insert("RAFTKV_JWT_ISSUER".into(), i.clone());
    }
    if let Some(a) = &kvc.spec.auth.audience {
        data.insert("RAFTKV_JWT_AUDIENCE".into(), a.clone());
    }
    ConfigMap {
        metadata: owned_meta(kvc, n.config()),
        data: Some(data),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::cluster;

    #[test]
    fn initial_cluster_lists_stable_peer_urls_and_state_follows_bootstrap() {
        let kvc = cluster(3);
        let cm = config_map(&kvc, 3, false);
        let d = cm.data.unwrap();
        assert_eq!(
            d["RAFTKV_INITIAL_CLUSTER"],
            "1=https://kv-0.kv-peer.prod.svc:2380,2=https://kv-1.kv-peer.prod.svc:2380,3=https://kv-2.kv-peer.prod.svc:2380"
        );
        assert_eq!(d["RAFTKV_INITIAL_CLUSTER_STATE"], "new");
        assert_eq!(d["RAFTKV_CLUSTER_TOKEN"], "prod.kv");
        let later = config_map(&kvc, 3, true).data.unwrap();
        assert_eq!(later["RAFTKV_INITIAL_CLUSTER_STATE"], "existing");
    }
}
