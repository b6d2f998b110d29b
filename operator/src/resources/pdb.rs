//! The PodDisruptionBudget: voluntary disruptions (drains, evictions) may take down at most the
//! members the cluster can lose without losing its quorum.

use super::{Names, owned_meta, quorum, selector_labels};
use crate::crd::KVCluster;
use k8s_openapi::api::policy::v1::{PodDisruptionBudget, PodDisruptionBudgetSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

/// Members that may be disrupted at once: `replicas - quorum` (0 for a single member).
pub fn max_unavailable(replicas: i32) -> i32 {
    replicas - quorum(replicas)
}

pub fn pdb(kvc: &KVCluster) -> PodDisruptionBudget {
    PodDisruptionBudget {
        metadata: owned_meta(kvc, Names::of(kvc).pdb()),
        spec: Some(PodDisruptionBudgetSpec {
            max_unavailable: Some(IntOrString::Int(max_unavailable(kvc.spec.replicas))),
            selector: Some(LabelSelector {
                match_labels: Some(selector_labels(kvc)),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::cluster;

    #[test]
    fn disruptions_never_cost_the_quorum() {
        for (replicas, allowed) in [(1, 0), (3, 1), (5, 2), (7, 3), (9, 4)] {
            assert_eq!(max_unavailable(replicas), allowed, "{replicas} members");
            // What remains after the allowed disruptions is still a majority.
            assert!(replicas - allowed >= quorum(replicas));
        }
        let p = pdb(&cluster(5)).spec.unwrap();
        assert_eq!(p.max_unavailable, Some(IntOrString::Int(2)));
        assert!(
            p.selector
                .unwrap()
                .match_labels
                .unwrap()
                .contains_key("app.kubernetes.io/instance")
        );
    }
}
