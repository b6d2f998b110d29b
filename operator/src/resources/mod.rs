//! Builders of the Kubernetes objects a KVCluster owns: pure functions from the cluster to the
//! objects, one module per kind, so each is unit-tested on its own.

pub mod config;
pub mod pdb;
pub mod secrets;
pub mod servicemonitor;
pub mod services;
pub mod statefulset;

use crate::crd::KVCluster;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::ResourceExt;
use std::collections::BTreeMap;

pub const CLIENT_PORT: i32 = 2379;
pub const PEER_PORT: i32 = 2380;
pub const METRICS_PORT: i32 = 9379;
/// The unprivileged user members run as.
pub const RUN_AS: i64 = 65532;

/// Names of everything a cluster owns, derived from its name.
pub struct Names {
    pub cluster: String,
    pub namespace: String,
}

impl Names {
    pub fn of(kvc: &KVCluster) -> Names {
        Names {
            cluster: kvc.name_any(),
            namespace: kvc.namespace().unwrap_or_else(|| "default".into()),
        }
    }
    pub fn statefulset(&self) -> String {
        self.cluster.clone()
    }
    pub fn peer_service(&self) -> String {
        format!("{}-peer", self.cluster)
    }
    pub fn client_service(&self) -> String {
        self.cluster.clone()
    }
    pub fn config(&self) -> String {
        format!("{}-config", self.cluster)
    }
    pub fn jwt_secret(&self) -> String {
        format!("{}-jwt", self.cluster)
    }
    pub fn keyring_secret(&self) -> String {
        format!("{}-keyring", self.cluster)
    }
    pub fn root_secret(&self) -> String {
        format!("{}-root", self.cluster)
    }
    /// Where the first members download the backup they restore (`spec.restore`).
    pub fn restore_secret(&self) -> String {
        format!("{}-restore", self.cluster)
    }
    /// The generated peer CA (certificate and key; mounted nowhere).
    pub fn peer_ca_secret(&self) -> String {
        format!("{}-peer-ca", self.cluster)
    }
    /// The generated member certificates, one pair per ordinal, and the CA certificate.
    pub fn peer_tls_secret(&self) -> String {
        format!("{}-peer-tls", self.cluster)
    }
    /// Host names a member certificate of this cluster may carry: any pod of the peer service.
    pub fn peer_host_pattern(&self) -> String {
        format!("*.{}.{}.svc", self.peer_service(), self.namespace)
    }
    pub fn pdb(&self) -> String {
        self.cluster.clone()
    }
    pub fn pod(&self, ordinal: i32) -> String {
        format!("{}-{ordinal}", self.cluster)
    }
    /// The stable DNS name of a member pod (through the headless peer service).
    pub fn pod_host(&self, ordinal: i32) -> String {
        format!(
            "{}.{}.{}.svc",
            self.pod(ordinal),
            self.peer_service(),
            self.namespace
        )
    }
    /// A member's peer URL: always TLS.
    pub fn peer_url(&self, ordinal: i32) -> String {
        format!("https://{}:{PEER_PORT}", self.pod_host(ordinal))
    }
    pub fn client_url(&self, ordinal: i32, tls: bool) -> String {
        format!(
            "{}://{}:{CLIENT_PORT}",
            if tls { "https" } else { "http" },
            self.pod_host(ordinal)
        )
    }
    /// The cluster token members share: same namespace and name, same cluster (so a re-created
    /// cluster finds its retained volumes), anything else refused.
    pub fn cluster_token(&self) -> String {
        format!("{}.{}", self.namespace, self.cluster)
    }
}

/// Labels that select a cluster's member pods.
pub fn selector_labels(kvc: &KVCluster) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), "raftkv".to_string()),
        ("app.kubernetes.io/instance".to_string(), kvc.name_any()),
    ])
}

/// Labels on everything the operator creates for a cluster.
pub fn labels(kvc: &KVCluster) -> BTreeMap<String, String> {
    let mut l = selector_labels(kvc);
    l.insert(
        "app.kubernetes.io/managed-by".into(),
        "raftkv-operator".into(),
    );
    l.insert("app.kubernetes.io/part-of".into(), "raftkv".into());
    l
}

pub fn selector_string(kvc: &KVCluster) -> String {
    selector_labels(kvc)
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join(",")
}

/// Metadata for an owned object: name, namespace, labels and the owner reference that lets the
/// garbage collector remove it with the cluster.
pub fn owned_meta(kvc: &KVCluster, name: String) -> ObjectMeta {
    ObjectMeta {
        name: Some(name),
        namespace: kvc.namespace(),
        labels: Some(labels(kvc)),
        owner_references: owner_ref(kvc).map(|o| vec![o]),
        ..Default::default()
    }
}

pub fn owner_ref(kvc: &KVCluster) -> Option<OwnerReference> {
    Some(OwnerReference {
        api_version: "raftkv.io/v1alpha1".into(),
        kind: "KVCluster".into(),
        name: kvc.name_any(),
        uid: kvc.uid()?,
        controller: Some(true),
        block_owner_deletion: Some(true),
    })
}

/// Members needed for a majority of `replicas`.
pub fn quorum(replicas: i32) -> i32 {
    replicas / 2 + 1
}

#[cfg(test)]
pub(crate) mod testing {
    use crate::crd::{KVCluster, KVClusterSpec};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

    pub fn cluster(replicas: i32) -> KVCluster {
        let spec: KVClusterSpec = serde_json::from_value(serde_json::json!({
            "replicas": replicas,
            "version": "0.1.0",
        }))
        .expect("spec with defaults");
        KVCluster {
            metadata: ObjectMeta {
                name: Some("kv".into()),
                namespace: Some("prod".into()),
                uid: Some("1234".into()),
                generation: Some(1),
                ..Default::default()
            },
            spec,
            status: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_quorum() {
        let kvc = testing::cluster(3);
        let n = Names::of(&kvc);
        assert_eq!(n.pod_host(2), "kv-2.kv-peer.prod.svc");
        assert_eq!(n.peer_url(0), "https://kv-0.kv-peer.prod.svc:2380");
        assert_eq!(n.peer_host_pattern(), "*.kv-peer.prod.svc");
        assert_eq!(n.cluster_token(), "prod.kv");
        assert_eq!(quorum(1), 1);
        assert_eq!(quorum(3), 2);
        assert_eq!(quorum(5), 3);
        let o = owner_ref(&kvc).unwrap();
        assert_eq!((o.kind.as_str(), o.controller), ("KVCluster", Some(true)));
    }
}
