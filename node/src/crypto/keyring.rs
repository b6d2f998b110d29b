//! The encryption keyring: several AES-256 keys with ids, one of them active for sealing new
//! values, loaded from a JSON file (how a Kubernetes Secret is mounted):
//!
//! ```json
//! { "active": 2, "keys": [ { "id": 1, "key": "<base64 of 32 bytes>" }, { "id": 2, "key": "…" } ] }
//! ```
//!
//! Rotation is adding a key and making it active; older keys stay to read older values until
//! they are re-encrypted.

use aes_gcm::{Aes256Gcm, KeyInit};
use base64::Engine;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Debug, thiserror::Error)]
pub enum KeyringError {
    #[error("cannot read keyring file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("keyring file {path} is not valid: {reason}")]
    Invalid { path: String, reason: String },
    #[error("cannot write keyring file {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

#[derive(Serialize, Deserialize)]
struct KeyringFile {
    active: u32,
    keys: Vec<KeyFile>,
}

#[derive(Serialize, Deserialize)]
struct KeyFile {
    id: u32,
    key: String,
}

pub struct Key {
    pub id: u32,
    pub(super) cipher: Aes256Gcm,
    /// A one-way fingerprint of the key, recorded in the cluster to detect a wrong key.
    pub fingerprint: [u8; 16],
    raw: [u8; 32],
}

impl Drop for Key {
    fn drop(&mut self) {
        // Do not leave key bytes around in freed memory.
        zeroize::Zeroize::zeroize(&mut self.raw);
    }
}

pub fn fingerprint(raw: &[u8; 32]) -> [u8; 16] {
    let mut h = Sha256::new();
    h.update(b"raftkv keyring fingerprint v1");
    h.update(raw);
    let d = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&d[..16]);
    out
}

pub struct Keyring {
    keys: BTreeMap<u32, Key>,
    active: u32,
}

impl Keyring {
    pub fn load(path: &Path) -> Result<Keyring, KeyringError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| KeyringError::Read {
            path: p.clone(),
            source,
        })?;
        Self::parse(&text).map_err(|reason| KeyringError::Invalid { path: p, reason })
    }

    pub fn parse(text: &str) -> Result<Keyring, String> {
        let file: KeyringFile =
            serde_json::from_str(text).map_err(|e| format!("not keyring JSON: {e}"))?;
        let mut keys = BTreeMap::new();
        for k in file.keys {
            let bytes = base64::engine::general_purpose::STANDARD
                .decode(k.key.trim())
                .map_err(|e| format!("key {} is not base64: {e}", k.id))?;
            let raw: [u8; 32] = bytes
                .as_slice()
                .try_into()
                .map_err(|_| format!("key {} has {} bytes, AES-256 needs 32", k.id, bytes.len()))?;
            let cipher =
                Aes256Gcm::new_from_slice(&raw).map_err(|e| format!("key {}: {e}", k.id))?;
            let key = Key {
                id: k.id,
                cipher,
                fingerprint: fingerprint(&raw),
                raw,
            };
            if keys.insert(k.id, key).is_some() {
                return Err(format!("key id {} appears twice", k.id));
            }
        }
        if !keys.contains_key(&file.active) {
            return Err(format!(
                "the active key id {} is not among the keys",
                file.active
            ));
        }
        Ok(Keyring {
            keys,
            active: file.active,
        })
    }

    /// A keyring with one fresh random key.
    pub fn generate() -> Keyring {
        let mut k = Keyring {
            keys: BTreeMap::new(),
            active: 1,
        };
        k.add_random(1);
        k
    }

    fn add_random(&mut self, id: u32) {
        let raw: [u8; 32] = rand::random();
        let cipher = Aes256Gcm::new(&raw.into());
        self.keys.insert(
            id,
            Key {
                id,
                cipher,
                fingerprint: fingerprint(&raw),
                raw,
            },
        );
    }

    /// Adds a fresh key and makes it active; returns its id.
    pub fn rotate(&mut self) -> u32 {
        let id = self.keys.keys().next_back().copied().unwrap_or(0) + 1;
        self.add_random(id);
        self.active = id;
        id
    }

    /// Removes a key that is not active.
    pub fn remove(&mut self, id: u32) -> Result<(), String> {
        if id == self.active {
            return Err(format!("key {id} is active; rotate to another key first"));
        }
        self.keys
            .remove(&id)
            .map(|_| ())
            .ok_or_else(|| format!("no key {id} in the keyring"))
    }

    pub fn active(&self) -> &Key {
        // Construction guarantees the active id is present.
        &self.keys[&self.active]
    }

    pub fn get(&self, id: u32) -> Option<&Key> {
        self.keys.get(&id)
    }

    pub fn ids(&self) -> impl Iterator<Item = u32> + '_ {
        self.keys.keys().copied()
    }

    pub fn to_json(&self) -> String {
        let file = KeyringFile {
            active: self.active,
            keys: self
                .keys
                .values()
                .map(|k| KeyFile {
                    id: k.id,
                    key: base64::engine::general_purpose::STANDARD.encode(k.raw),
                })
                .collect(),
        };
        serde_json::to_string_pretty(&file).unwrap_or_default()
    }

    /// Writes the keyring with owner-only permissions.
    pub fn save(&self, path: &Path) -> Result<(), KeyringError> {
        write_secret(path, self.to_json().as_bytes()).map_err(|source| KeyringError::Write {
            path: path.display().to_string(),
            source,
        })
    }
}

/// Writes a secret file readable by its owner only.
pub fn write_secret(path: &Path, data: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_rotate_and_reject_bad_files() {
        let mut k = Keyring::generate();
        let id = k.rotate();
        assert_eq!(id, 2);
        let again = Keyring::parse(&k.to_json()).unwrap();
        assert_eq!(again.active().id, 2);
        assert_eq!(
            again.get(1).unwrap().fingerprint,
            k.get(1).unwrap().fingerprint
        );
        assert!(k.remove(2).is_err());
        k.remove(1).unwrap();
        assert!(Keyring::parse("{}").is_err());
        assert!(
            matches!(Keyring::parse(r#"{"active":1,"keys":[{"id":1,"key":"c2hvcnQ="}]}"#), Err(e) if e.contains("32"))
        );
        assert!(Keyring::parse(r#"{"active":2,"keys":[]}"#).is_err());
    }
}
