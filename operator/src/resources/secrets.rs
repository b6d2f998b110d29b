//! Secrets a cluster needs and the operator generates when the user gave none: the HS256 token
//! secret, the AES-256 keyring, the initial root password, and the peer PKI (a CA, and a member
//! certificate for every ordinal a cluster can have, so that scaling never waits for one).
//! Generated once and never overwritten (the reconciler only creates them when absent).

use super::{Names, owned_meta};
use crate::crd::KVCluster;
use base64::Engine;
use k8s_openapi::api::core::v1::Secret;
use std::collections::BTreeMap;

fn random_text(n: usize) -> String {
    const ALPHABET: &[u8] = b"abcdefghijkmnopqrstuvwxyzABCDEFGHJKLMNPQRSTUVWXYZ23456789";
    (0..n)
        .map(|_| ALPHABET[rand::random_range(0..ALPHABET.len())] as char)
        .collect()
}

fn secret(kvc: &KVCluster, name: String, data: BTreeMap<String, String>) -> Secret {
    Secret {
        metadata: owned_meta(kvc, name),
        type_: Some("Opaque".into()),
        string_data: Some(data),
        ..Default::default()
    }
}

/// Key in the JWT secret holding the HS256 shared secret.
pub const JWT_KEY: &str = "secret";
/// Keys of a user-provided RS256/ES256 secret.
pub const PUBLIC_KEY: &str = "public.pem";
pub const PRIVATE_KEY: &str = "private.pem";
pub const KEYRING_KEY: &str = "keyring.json";
pub const ROOT_PASSWORD_KEY: &str = "password";
/// Keys of the peer CA Secret, and the CA certificate in the member certificates' Secret.
pub const CA_CERT_KEY: &str = "ca.crt";
pub const CA_KEY_KEY: &str = "ca.key";
/// Ordinals a cluster can have (replicas are at most 9).
pub const MAX_MEMBERS: i32 = 9;
/// Lifetime of generated member certificates, and of the CA.
pub const MEMBER_CERT_DAYS: u64 = 3 * 365;
pub const CA_DAYS: u64 = 10 * 365;
/// Member certificates are renewed once less than this is left (members reload them).
pub const RENEW_BEFORE_DAYS: u64 = 365;
/// When the member certificates in the Secret expire, in seconds since the epoch.
pub const NOT_AFTER_ANNOTATION: &str = "raftkv.io/certificates-not-after";
const CA_NAME: &str = "raftkv peer CA";

/// File names of a member's certificate and key in the member certificates' Secret (the pod
/// picks its own with `$(POD_NAME)`).
pub fn member_cert_key(pod: &str) -> (String, String) {
    (format!("{pod}.crt"), format!("{pod}.key"))
}

/// A new peer CA for the cluster.
pub fn peer_ca(kvc: &KVCluster) -> Result<Secret, raftkv_certs::CertError> {
    let ca = raftkv_certs::Authority::generate(
        CA_NAME,
        std::time::Duration::from_secs(CA_DAYS * 86_400),
    )?;
    Ok(secret(
        kvc,
        Names::of(kvc).peer_ca_secret(),
        BTreeMap::from([
            (CA_CERT_KEY.to_string(), ca.cert_pem.clone()),
            (CA_KEY_KEY.to_string(), ca.key_pem()),
        ]),
    ))
}

/// Member certificates for every ordinal, signed by the CA in `ca_cert`/`ca_key` (PEM): each
/// valid for its pod's DNS name under the peer service, as server and client.
pub fn peer_tls(
    kvc: &KVCluster,
    ca_cert: &str,
    ca_key: &str,
) -> Result<Secret, raftkv_certs::CertError> {
    peer_tls_at(kvc, ca_cert, ca_key, std::time::SystemTime::now())
}

/// Whether the member certificates of `s` should be renewed at `now`.
pub fn peer_tls_due(s: &Secret, now: std::time::SystemTime) -> bool {
    let not_after = s
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(NOT_AFTER_ANNOTATION))
        .and_then(|v| v.parse::<u64>().ok());
    let now = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    match not_after {
        Some(t) => now + RENEW_BEFORE_DAYS * 86_400 >= t,
        None => true,
    }
}

fn peer_tls_at(
    kvc: &KVCluster,
    ca_cert: &str,
    ca_key: &str,
    now: std::time::SystemTime,
) -> Result<Secret, raftkv_certs::CertError> {
    let n = Names::of(kvc);
    let ca = raftkv_certs::Authority::from_pem(ca_cert, ca_key)?;
    let mut data = BTreeMap::from([(CA_CERT_KEY.to_string(), ca_cert.to_string())]);
    for ordinal in 0..MAX_MEMBERS {
        let pod = n.pod(ordinal);
        let host = n.pod_host(ordinal);
        let issued = ca.member(
            &pod,
            &[host.clone(), format!("{host}.cluster.local")],
            std::time::Duration::from_secs(MEMBER_CERT_DAYS * 86_400),
        )?;
        let (crt, key) = member_cert_key(&pod);
        data.insert(crt, issued.cert_pem);
        data.insert(key, issued.key_pem);
    }
    let mut s = secret(kvc, n.peer_tls_secret(), data);
    // The issuer backdates by minutes and sets the lifetime from now: this is the earliest
    // of the certificates' ends, to the second.
    let not_after = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
        + MEMBER_CERT_DAYS * 86_400;
    s.metadata
        .annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(NOT_AFTER_ANNOTATION.into(), not_after.to_string());
    Ok(s)
}

pub fn jwt(kvc: &KVCluster) -> Secret {
    secret(
        kvc,
        Names::of(kvc).jwt_secret(),
        BTreeMap::from([(JWT_KEY.to_string(), random_text(48))]),
    )
}

/// A keyring in raftkv's format with one random AES-256 key, active.
pub fn keyring_json() -> String {
    let key: [u8; 32] = rand::random();
    serde_json::json!({
        "active": 1,
        "keys": [{ "id": 1, "key": base64::engine::general_purpose::STANDARD.encode(key) }],
    })
    .to_string()
}

pub fn keyring(kvc: &KVCluster) -> Secret {
    secret(
        kvc,
        Names::of(kvc).keyring_secret(),
        BTreeMap::from([(KEYRING_KEY.to_string(), keyring_json())]),
    )
}

pub fn root_password(kvc: &KVCluster) -> Secret {
    let mut s = secret(
        kvc,
        Names::of(kvc).root_secret(),
        BTreeMap::from([
            (ROOT_PASSWORD_KEY.to_string(), random_text(24)),
            ("username".to_string(), "root".to_string()),
        ]),
    );
    s.type_ = Some("kubernetes.io/basic-auth".into());
    s
}

/// Keys of the restore Secret: where the backup is (a presigned URL, or a `file://` path on
/// a claim the first members mount), its SHA-256, and that claim's name.
pub const RESTORE_URL_KEY: &str = "url";
pub const RESTORE_SHA256_KEY: &str = "sha256";
pub const RESTORE_CLAIM_KEY: &str = "claim";

/// Where the first members of a restored cluster take the backup from.
pub fn restore(kvc: &KVCluster, url: String, sha256: String, claim: Option<String>) -> Secret {
    let mut data = BTreeMap::from([
        (RESTORE_URL_KEY.to_string(), url),
        (RESTORE_SHA256_KEY.to_string(), sha256),
    ]);
    if let Some(c) = claim {
        data.insert(RESTORE_CLAIM_KEY.to_string(), c);
    }
    secret(kvc, Names::of(kvc).restore_secret(), data)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::resources::testing::cluster;

    #[test]
    fn generated_secrets_are_owned_random_and_well_formed() {
        let kvc = cluster(3);
        let a = jwt(&kvc);
        let b = jwt(&kvc);
        let sa = &a.string_data.as_ref().unwrap()[JWT_KEY];
        assert_eq!(sa.len(), 48);
        assert_ne!(
            sa,
            &b.string_data.unwrap()[JWT_KEY],
            "fresh randomness each time"
        );
        assert_eq!(a.metadata.name.as_deref(), Some("kv-jwt"));
        assert!(a.metadata.owner_references.is_some());
        let ring: serde_json::Value =
            serde_json::from_str(&keyring(&kvc).string_data.unwrap()[KEYRING_KEY]).unwrap();
        let key = base64::engine::general_purpose::STANDARD
            .decode(ring["keys"][0]["key"].as_str().unwrap())
            .unwrap();
        assert_eq!(key.len(), 32);
        assert_eq!(ring["active"], 1);
        let root = root_password(&kvc);
        assert_eq!(root.type_.as_deref(), Some("kubernetes.io/basic-auth"));
        assert_eq!(root.string_data.unwrap()[ROOT_PASSWORD_KEY].len(), 24);
    }

    #[test]
    fn peer_pki_has_a_member_certificate_for_every_ordinal() {
        let kvc = cluster(3);
        let ca = peer_ca(&kvc).unwrap();
        let ca_data = ca.string_data.unwrap();
        assert_eq!(ca.metadata.name.as_deref(), Some("kv-peer-ca"));
        let tls = peer_tls(&kvc, &ca_data[CA_CERT_KEY], &ca_data[CA_KEY_KEY]).unwrap();
        assert_eq!(tls.metadata.name.as_deref(), Some("kv-peer-tls"));
        let data = tls.string_data.clone().unwrap();
        assert_eq!(data[CA_CERT_KEY], ca_data[CA_CERT_KEY]);
        assert!(
            !data.contains_key(CA_KEY_KEY),
            "the CA key is never mounted in pods"
        );
        for o in 0..MAX_MEMBERS {
            let (crt, key) = member_cert_key(&format!("kv-{o}"));
            assert!(data[&crt].starts_with("-----BEGIN CERTIFICATE-----"));
            assert!(data[&key].contains("PRIVATE KEY"));
        }
        assert_eq!(data.len(), 1 + 2 * MAX_MEMBERS as usize);
        // Renewal is due once less than RENEW_BEFORE_DAYS is left, not before.
        let now = std::time::SystemTime::now();
        assert!(!peer_tls_due(&tls, now));
        let day = std::time::Duration::from_secs(86_400);
        let later = now + day * (MEMBER_CERT_DAYS - RENEW_BEFORE_DAYS) as u32 + day;
        assert!(peer_tls_due(&tls, later));
        let mut bare = tls.clone();
        bare.metadata.annotations = None;
        assert!(peer_tls_due(&bare, now), "unknown expiry: renew");
    }
}
