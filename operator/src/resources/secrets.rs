//! Secrets a cluster needs and the operator generates when the user gave none: the HS256 token
//! secret, the AES-256 keyring and the initial root password. Generated once and never
//! overwritten (the reconciler only creates them when absent).

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
}
