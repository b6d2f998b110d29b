//! The two Services of a cluster: a headless one that gives every member a stable DNS name
//! (published before members are ready, so they can find each other while forming), and the
//! client Service applications connect through.

use super::{CLIENT_PORT, METRICS_PORT, Names, PEER_PORT, owned_meta, selector_labels};
use crate::crd::KVCluster;
use k8s_openapi::api::core::v1::{Service, ServicePort, ServiceSpec};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

fn port(name: &str, p: i32) -> ServicePort {
    ServicePort {
        name: Some(name.into()),
        port: p,
        target_port: Some(IntOrString::String(name.into())),
        protocol: Some("TCP".into()),
        ..Default::default()
    }
}

pub fn peer(kvc: &KVCluster) -> Service {
    Service {
        metadata: owned_meta(kvc, Names::of(kvc).peer_service()),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            publish_not_ready_addresses: Some(true),
            selector: Some(selector_labels(kvc)),
            ports: Some(vec![port("peer", PEER_PORT), port("client", CLIENT_PORT)]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn client(kvc: &KVCluster) -> Service {
    Service {
        metadata: owned_meta(kvc, Names::of(kvc).client_service()),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".into()),
            selector: Some(selector_labels(kvc)),
            ports: Some(vec![
                port("client", CLIENT_PORT),
                port("metrics", METRICS_PORT),
            ]),
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
    fn peer_service_is_headless_and_publishes_unready_members() {
        let kvc = cluster(3);
        let p = peer(&kvc);
        let spec = p.spec.unwrap();
        assert_eq!(p.metadata.name.as_deref(), Some("kv-peer"));
        assert_eq!(spec.cluster_ip.as_deref(), Some("None"));
        assert_eq!(spec.publish_not_ready_addresses, Some(true));
        let c = client(&kvc).spec.unwrap();
        assert_eq!(c.cluster_ip, None);
        assert_eq!(
            c.ports.unwrap().iter().map(|p| p.port).collect::<Vec<_>>(),
            vec![2379, 9379]
        );
        assert_eq!(c.selector, spec.selector);
    }
}
