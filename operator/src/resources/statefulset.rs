//! The StatefulSet of members: one pod and one volume per member, started in parallel so a new
//! cluster can form, restarted only when the operator deletes a pod (it orders rollouts itself),
//! probed on `/healthz` and `/readyz`, and locked down to the restricted pod security profile.

use super::secrets::{JWT_KEY, KEYRING_KEY, PUBLIC_KEY, ROOT_PASSWORD_KEY};
use super::{
    CLIENT_PORT, METRICS_PORT, Names, PEER_PORT, RUN_AS, labels, owned_meta, selector_labels,
};
use crate::crd::{JwtAlgorithm, KVCluster, RetentionPolicy};
use k8s_openapi::api::apps::v1::{
    StatefulSet, StatefulSetPersistentVolumeClaimRetentionPolicy, StatefulSetSpec,
    StatefulSetUpdateStrategy,
};
use k8s_openapi::api::core::v1::*;
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use std::collections::BTreeMap;

/// Annotation on pods recording the version they run, for ordered rollouts.
pub const VERSION_ANNOTATION: &str = "raftkv.io/version";
pub const DATA_DIR: &str = "/var/lib/raftkv";

fn env_field(name: &str, path: &str) -> EnvVar {
    EnvVar {
        name: name.into(),
        value_from: Some(EnvVarSource {
            field_ref: Some(ObjectFieldSelector {
                field_path: path.into(),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn secret_volume(name: &str, secret: &str) -> Volume {
    Volume {
        name: name.into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret.into()),
            default_mode: Some(0o400),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn mount(name: &str, path: &str, read_only: bool) -> VolumeMount {
    VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: Some(read_only),
        ..Default::default()
    }
}

fn http_probe(path: &str, period: i32, failures: i32, initial: i32) -> Probe {
    Probe {
        http_get: Some(HTTPGetAction {
            path: Some(path.into()),
            port: IntOrString::String("metrics".into()),
            ..Default::default()
        }),
        period_seconds: Some(period),
        failure_threshold: Some(failures),
        initial_delay_seconds: Some(initial),
        timeout_seconds: Some(2),
        ..Default::default()
    }
}

/// The container's security context of the restricted profile.
/// The restricted profile's pod half: a non-root user whose group owns the volumes.
pub fn pod_security() -> PodSecurityContext {
    PodSecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        fs_group: Some(RUN_AS),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

pub fn container_security() -> SecurityContext {
    SecurityContext {
        run_as_non_root: Some(true),
        run_as_user: Some(RUN_AS),
        run_as_group: Some(RUN_AS),
        allow_privilege_escalation: Some(false),
        read_only_root_filesystem: Some(true),
        privileged: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            ..Default::default()
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn default_affinity(kvc: &KVCluster) -> Affinity {
    Affinity {
        pod_anti_affinity: Some(PodAntiAffinity {
            preferred_during_scheduling_ignored_during_execution: Some(vec![
                WeightedPodAffinityTerm {
                    weight: 100,
                    pod_affinity_term: PodAffinityTerm {
                        label_selector: Some(LabelSelector {
                            match_labels: Some(selector_labels(kvc)),
                            ..Default::default()
                        }),
                        topology_key: "kubernetes.io/hostname".into(),
                        ..Default::default()
                    },
                },
            ]),
            ..Default::default()
        }),
        ..Default::default()
    }
}

fn retention(p: RetentionPolicy) -> String {
    match p {
        RetentionPolicy::Retain => "Retain".into(),
        RetentionPolicy::Delete => "Delete".into(),
    }
}

pub fn image(kvc: &KVCluster) -> String {
    format!("{}:{}", kvc.spec.image, kvc.spec.version)
}

pub fn claim_volume(name: &str, claim: &str, read_only: bool) -> Volume {
    Volume {
        name: name.into(),
        persistent_volume_claim: Some(PersistentVolumeClaimVolumeSource {
            claim_name: claim.into(),
            read_only: Some(read_only),
        }),
        ..Default::default()
    }
}

/// Mounts the claim a restore reads its backup from, read-only, into every member (only the
/// first ones use it: later members ignore the restore).
pub fn mount_restore_claim(sts: &mut StatefulSet, claim: &str) {
    let Some(pod) = sts.spec.as_mut().and_then(|s| s.template.spec.as_mut()) else {
        return;
    };
    pod.volumes
        .get_or_insert_with(Vec::new)
        .push(claim_volume("restore", claim, true));
    for c in &mut pod.containers {
        c.volume_mounts.get_or_insert_with(Vec::new).push(mount(
            "restore",
            crate::volume::RESTORE_MOUNT,
            true,
        ));
    }
}

/// The StatefulSet with `replicas` pods.
pub fn statefulset(kvc: &KVCluster, replicas: i32) -> StatefulSet {
    let n = Names::of(kvc);
    let tls = kvc.spec.tls.clone().unwrap_or_default();
    let client_tls = tls.client_secret_name.is_some();
    let scheme = |on: bool| if on { "https" } else { "http" };
    let jwt_secret = kvc
        .spec
        .auth
        .secret_name
        .clone()
        .unwrap_or_else(|| n.jwt_secret());
    let mut args = vec![
        "serve".to_string(),
        "--data-dir".into(),
        format!("{DATA_DIR}/data"),
        "--listen-client".into(),
        format!("$(POD_IP):{CLIENT_PORT}"),
        "--advertise-client".into(),
        format!(
            "{}://$(POD_NAME).{}.$(POD_NAMESPACE).svc:{CLIENT_PORT}",
            scheme(client_tls),
            n.peer_service()
        ),
        "--listen-peer".into(),
        format!("$(POD_IP):{PEER_PORT}"),
        "--advertise-peer".into(),
        format!(
            "https://$(POD_NAME).{}.$(POD_NAMESPACE).svc:{PEER_PORT}",
            n.peer_service()
        ),
        // Members that join later present certificates for their own pod names.
        "--peer-cert-allowed-hostname".into(),
        format!("*.{}.$(POD_NAMESPACE).svc", n.peer_service()),
        "--listen-metrics".into(),
        format!("$(POD_IP):{METRICS_PORT}"),
        "--initial-root-password-file".into(),
        format!("/etc/raftkv/root/{ROOT_PASSWORD_KEY}"),
    ];
    let mut volumes = vec![
        secret_volume("jwt", &jwt_secret),
        secret_volume("root", &n.root_secret()),
    ];
    let mut mounts = vec![
        mount("data", DATA_DIR, false),
        mount("jwt", "/etc/raftkv/jwt", true),
        mount("root", "/etc/raftkv/root", true),
    ];
    match kvc.spec.auth.algorithm {
        JwtAlgorithm::HS256 => {
            args.extend([
                "--jwt-secret-file".into(),
                format!("/etc/raftkv/jwt/{JWT_KEY}"),
            ]);
        }
        JwtAlgorithm::RS256 | JwtAlgorithm::ES256 => {
            let flag = if kvc.spec.auth.algorithm == JwtAlgorithm::RS256 {
                "--jwt-rs256-public-key-file"
            } else {
                "--jwt-es256-public-key-file"
            };
            args.extend([flag.into(), format!("/etc/raftkv/jwt/{PUBLIC_KEY}")]);
            args.extend([
                "--jwt-signing-key-file".into(),
                format!("/etc/raftkv/jwt/{}", super::secrets::PRIVATE_KEY),
            ]);
        }
    }
    if kvc.spec.encryption.enabled {
        let secret = kvc
            .spec
            .encryption
            .keyring_secret_name
            .clone()
            .unwrap_or_else(|| n.keyring_secret());
        volumes.push(secret_volume("keyring", &secret));
        mounts.push(mount("keyring", "/etc/raftkv/keyring", true));
        args.extend([
            "--encryption-keyring-file".into(),
            format!("/etc/raftkv/keyring/{KEYRING_KEY}"),
        ]);
    }
    if let Some(s) = &tls.client_secret_name {
        volumes.push(secret_volume("client-tls", s));
        mounts.push(mount("client-tls", "/etc/raftkv/client-tls", true));
        args.extend([
            "--client-cert-file".into(),
            "/etc/raftkv/client-tls/tls.crt".into(),
            "--client-key-file".into(),
            "/etc/raftkv/client-tls/tls.key".into(),
        ]);
        if tls.client_cert_auth {
            args.extend([
                "--client-trusted-ca-file".into(),
                "/etc/raftkv/client-tls/ca.crt".into(),
                "--client-cert-auth".into(),
            ]);
        }
    }
    // The peer port always runs mutual TLS: with the user's certificate (cert-manager or their
    // own CA; one certificate valid for every pod), or with the operator's per-member ones.
    let (peer_secret, cert_file, key_file) = match &tls.peer_secret_name {
        Some(s) => (
            s.clone(),
            "/etc/raftkv/peer-tls/tls.crt".to_string(),
            "/etc/raftkv/peer-tls/tls.key".to_string(),
        ),
        None => {
            let (crt, key) = super::secrets::member_cert_key("$(POD_NAME)");
            (
                n.peer_tls_secret(),
                format!("/etc/raftkv/peer-tls/{crt}"),
                format!("/etc/raftkv/peer-tls/{key}"),
            )
        }
    };
    volumes.push(secret_volume("peer-tls", &peer_secret));
    mounts.push(mount("peer-tls", "/etc/raftkv/peer-tls", true));
    args.extend([
        "--peer-cert-file".into(),
        cert_file,
        "--peer-key-file".into(),
        key_file,
        "--peer-trusted-ca-file".into(),
        format!("/etc/raftkv/peer-tls/{}", super::secrets::CA_CERT_KEY),
    ]);
    let mut env = vec![
        env_field("POD_NAME", "metadata.name"),
        env_field("POD_NAMESPACE", "metadata.namespace"),
        env_field("POD_IP", "status.podIP"),
        env_field("RAFTKV_POD_NAME", "metadata.name"),
    ];
    // Members forming the cluster seed themselves from the backup; later ones ignore it.
    if kvc.spec.restore.is_some() {
        for (var, key) in [
            ("RAFTKV_RESTORE_FROM_URL", super::secrets::RESTORE_URL_KEY),
            ("RAFTKV_RESTORE_SHA256", super::secrets::RESTORE_SHA256_KEY),
        ] {
            env.push(EnvVar {
                name: var.into(),
                value_from: Some(EnvVarSource {
                    secret_key_ref: Some(SecretKeySelector {
                        name: n.restore_secret(),
                        key: key.into(),
                        optional: Some(false),
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            });
        }
    }
    let container = Container {
        name: "raftkv".into(),
        image: Some(image(kvc)),
        image_pull_policy: Some("IfNotPresent".into()),
        args: Some(args),
        env: Some(env),
        env_from: Some(vec![EnvFromSource {
            config_map_ref: Some(ConfigMapEnvSource {
                name: n.config(),
                optional: Some(false),
            }),
            ..Default::default()
        }]),
        ports: Some(vec![
            ContainerPort {
                name: Some("client".into()),
                container_port: CLIENT_PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some("peer".into()),
                container_port: PEER_PORT,
                ..Default::default()
            },
            ContainerPort {
                name: Some("metrics".into()),
                container_port: METRICS_PORT,
                ..Default::default()
            },
        ]),
        readiness_probe: Some(http_probe("/readyz", 2, 3, 1)),
        liveness_probe: Some(http_probe("/healthz", 10, 6, 10)),
        resources: kvc.spec.resources.clone(),
        security_context: Some(container_security()),
        volume_mounts: Some(mounts),
        ..Default::default()
    };
    let mut pod_labels = labels(kvc);
    pod_labels.insert("app.kubernetes.io/component".into(), "member".into());
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(pod_labels),
            annotations: Some(BTreeMap::from([(
                VERSION_ANNOTATION.to_string(),
                kvc.spec.version.clone(),
            )])),
            ..Default::default()
        }),
        spec: Some(PodSpec {
            containers: vec![container],
            volumes: Some(volumes),
            security_context: Some(pod_security()),
            automount_service_account_token: Some(false),
            enable_service_links: Some(false),
            termination_grace_period_seconds: Some(30),
            affinity: Some(
                kvc.spec
                    .affinity
                    .clone()
                    .unwrap_or_else(|| default_affinity(kvc)),
            ),
            tolerations: kvc.spec.tolerations.clone(),
            node_selector: kvc.spec.node_selector.clone(),
            topology_spread_constraints: kvc.spec.topology_spread_constraints.clone(),
            ..Default::default()
        }),
    };
    let storage = &kvc.spec.storage;
    let claim = PersistentVolumeClaim {
        metadata: ObjectMeta {
            name: Some("data".into()),
            labels: Some(selector_labels(kvc)),
            ..Default::default()
        },
        spec: Some(PersistentVolumeClaimSpec {
            access_modes: Some(vec!["ReadWriteOnce".into()]),
            storage_class_name: storage.storage_class_name.clone(),
            resources: Some(VolumeResourceRequirements {
                requests: Some(BTreeMap::from([(
                    "storage".to_string(),
                    Quantity(storage.size.clone()),
                )])),
                ..Default::default()
            }),
            ..Default::default()
        }),
        ..Default::default()
    };
    StatefulSet {
        metadata: owned_meta(kvc, n.statefulset()),
        spec: Some(StatefulSetSpec {
            replicas: Some(replicas),
            service_name: Some(n.peer_service()),
            pod_management_policy: Some("Parallel".into()),
            selector: LabelSelector {
                match_labels: Some(selector_labels(kvc)),
                ..Default::default()
            },
            // The operator restarts members itself, one at a time, followers first.
            update_strategy: Some(StatefulSetUpdateStrategy {
                type_: Some("OnDelete".into()),
                ..Default::default()
            }),
            persistent_volume_claim_retention_policy: Some(
                StatefulSetPersistentVolumeClaimRetentionPolicy {
                    when_deleted: Some(retention(storage.when_deleted)),
                    when_scaled: Some(retention(storage.when_scaled)),
                },
            ),
            template,
            volume_claim_templates: Some(vec![claim]),
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
    fn a_restore_from_a_claim_mounts_it_read_only() {
        let mut sts = statefulset(&cluster(3), 3);
        mount_restore_claim(&mut sts, "backups");
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let v = pod
            .volumes
            .unwrap()
            .into_iter()
            .find(|v| v.name == "restore")
            .unwrap();
        let claim = v.persistent_volume_claim.unwrap();
        assert_eq!(
            (claim.claim_name.as_str(), claim.read_only),
            ("backups", Some(true))
        );
        let m = pod.containers[0]
            .volume_mounts
            .clone()
            .unwrap()
            .into_iter()
            .find(|m| m.name == "restore")
            .unwrap();
        assert_eq!(m.mount_path, crate::volume::RESTORE_MOUNT);
        assert_eq!(m.read_only, Some(true));
    }

    #[test]
    fn members_run_restricted_and_probed() {
        let kvc = cluster(3);
        let sts = statefulset(&kvc, 3);
        let spec = sts.spec.unwrap();
        assert_eq!(spec.replicas, Some(3));
        assert_eq!(spec.pod_management_policy.as_deref(), Some("Parallel"));
        assert_eq!(spec.service_name.as_deref(), Some("kv-peer"));
        assert_eq!(
            spec.update_strategy.unwrap().type_.as_deref(),
            Some("OnDelete")
        );
        let pod = spec.template.spec.unwrap();
        let c = &pod.containers[0];
        let sc = c.security_context.as_ref().unwrap();
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().unwrap().drop.as_ref().unwrap(),
            &vec!["ALL".to_string()]
        );
        assert_eq!(sc.seccomp_profile.as_ref().unwrap().type_, "RuntimeDefault");
        let psc = pod.security_context.unwrap();
        assert_eq!(psc.run_as_non_root, Some(true));
        assert_eq!(psc.seccomp_profile.unwrap().type_, "RuntimeDefault");
        assert_eq!(pod.automount_service_account_token, Some(false));
        let ready = c
            .readiness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(ready.path.as_deref(), Some("/readyz"));
        let live = c
            .liveness_probe
            .as_ref()
            .unwrap()
            .http_get
            .as_ref()
            .unwrap();
        assert_eq!(live.path.as_deref(), Some("/healthz"));
        assert_eq!(c.image.as_deref(), Some("raftkv:0.1.0"));
        let args = c.args.as_ref().unwrap().join(" ");
        assert!(
            args.contains("--advertise-peer https://$(POD_NAME).kv-peer.$(POD_NAMESPACE).svc:2380"),
            "{args}"
        );
        assert!(args.contains("--jwt-secret-file /etc/raftkv/jwt/secret"));
        assert!(args.contains("--encryption-keyring-file /etc/raftkv/keyring/keyring.json"));
        // Peer mutual TLS by default, each pod with its own member certificate.
        assert!(
            args.contains("--peer-cert-file /etc/raftkv/peer-tls/$(POD_NAME).crt"),
            "{args}"
        );
        assert!(args.contains("--peer-key-file /etc/raftkv/peer-tls/$(POD_NAME).key"));
        assert!(args.contains("--peer-trusted-ca-file /etc/raftkv/peer-tls/ca.crt"));
        assert!(args.contains("--peer-cert-allowed-hostname *.kv-peer.$(POD_NAMESPACE).svc"));
        assert!(!args.contains("insecure"));
        // Members prefer distinct nodes by default.
        let anti = pod.affinity.unwrap().pod_anti_affinity.unwrap();
        assert_eq!(
            anti.preferred_during_scheduling_ignored_during_execution
                .unwrap()[0]
                .pod_affinity_term
                .topology_key,
            "kubernetes.io/hostname"
        );
        let claim = &spec.volume_claim_templates.unwrap()[0];
        assert_eq!(
            claim
                .spec
                .as_ref()
                .unwrap()
                .resources
                .as_ref()
                .unwrap()
                .requests
                .as_ref()
                .unwrap()["storage"],
            Quantity("1Gi".into())
        );
        let retention = spec.persistent_volume_claim_retention_policy.unwrap();
        assert_eq!(retention.when_deleted.as_deref(), Some("Retain"));
        assert_eq!(retention.when_scaled.as_deref(), Some("Delete"));
    }

    #[test]
    fn options_change_flags_and_volumes() {
        let mut kvc = cluster(3);
        kvc.spec.encryption.enabled = false;
        kvc.spec.auth.algorithm = JwtAlgorithm::RS256;
        kvc.spec.auth.secret_name = Some("issuer-keys".into());
        kvc.spec.tls = Some(crate::crd::TlsSpec {
            client_secret_name: None,
            peer_secret_name: Some("peer-certs".into()),
            client_cert_auth: true,
        });
        let sts = statefulset(&kvc, 3);
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let args = pod.containers[0].args.as_ref().unwrap().join(" ");
        assert!(!args.contains("--encryption-keyring-file"));
        assert!(args.contains("--jwt-rs256-public-key-file /etc/raftkv/jwt/public.pem"));
        assert!(args.contains("--peer-trusted-ca-file /etc/raftkv/peer-tls/ca.crt"));
        assert!(args.contains("--advertise-peer https://"));
        let vols: Vec<String> = pod.volumes.unwrap().into_iter().map(|v| v.name).collect();
        assert!(vols.contains(&"peer-tls".to_string()) && !vols.contains(&"keyring".to_string()));
        // Client-certificate identity needs client TLS: without a client Secret it is not set.
        assert!(!args.contains("--client-cert-auth"));
    }

    #[test]
    fn client_certificate_identity_requires_and_trusts_the_client_ca() {
        let mut kvc = cluster(3);
        kvc.spec.tls = Some(crate::crd::TlsSpec {
            client_secret_name: Some("client-certs".into()),
            peer_secret_name: None,
            client_cert_auth: true,
        });
        let sts = statefulset(&kvc, 3);
        let pod = sts.spec.unwrap().template.spec.unwrap();
        let args = pod.containers[0].args.as_ref().unwrap().join(" ");
        assert!(args.contains("--client-cert-file /etc/raftkv/client-tls/tls.crt"));
        assert!(args.contains("--client-trusted-ca-file /etc/raftkv/client-tls/ca.crt"));
        assert!(args.contains("--client-cert-auth"));
    }
}
