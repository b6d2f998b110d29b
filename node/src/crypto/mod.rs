//! Encryption at rest: values are sealed with AES-256-GCM before they are proposed to Raft, so
//! the Raft log, the state machine and snapshots only ever hold ciphertext.
//!
//! Nonces are 96 bits from the operating system's random generator, fresh for every value. With
//! random nonces the probability of a repeat stays negligible (below 2^-32) only while one key
//! seals at most 2^32 values; raftkv counts, cluster-wide and deterministically in the state
//! machine, how many values each key has sealed and refuses writes once the active key reaches
//! its limit (`--encryption-key-usage-limit`, default 2^32) until a new key is made active.
//!
//! The user key is bound as associated data, so a value copied to another key fails to decrypt.

pub mod envelope;
pub mod keyring;

use crate::storage::mvcc::ValueOpener;
use aes_gcm::Nonce;
use aes_gcm::aead::{Aead, Payload};
use envelope::Envelope;
pub use keyring::{Keyring, KeyringError};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

/// The default per-key limit: 2^32 values under random 96-bit nonces (NIST SP 800-38D).
pub const DEFAULT_KEY_USAGE_LIMIT: u64 = 1 << 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CryptoError {
    #[error("{0}")]
    Envelope(#[from] envelope::EnvelopeError),
    #[error("value was sealed with encryption key {0}, which is not in this node's keyring")]
    UnknownKey(u32),
    #[error("value failed authentication: it is corrupt or was moved from another key")]
    Authentication,
    #[error("encryption failed")]
    Seal,
    #[error("value is encrypted but this node has no keyring configured")]
    NoKeyring,
}

fn aad(key: &[u8]) -> Vec<u8> {
    [b"raftkv:v1:".as_slice(), key].concat()
}

/// Associated data of a compare operand: bound to the compared key, and distinct from every
/// value's (no value AAD starts with `raftkv:c`), so an operand cannot pass for a stored value.
fn operand_aad(key: &[u8]) -> Vec<u8> {
    [b"raftkv:cmp:v1:".as_slice(), key].concat()
}

/// Seals and opens stored values with the current keyring (or stores them as plaintext
/// envelopes when encryption is off). The keyring can be swapped at runtime.
#[derive(Clone)]
pub struct Sealer {
    keyring: Arc<RwLock<Option<Arc<Keyring>>>>,
    source: Option<PathBuf>,
    pub usage_limit: u64,
}

impl Sealer {
    pub fn disabled() -> Sealer {
        Sealer {
            keyring: Arc::new(RwLock::new(None)),
            source: None,
            usage_limit: DEFAULT_KEY_USAGE_LIMIT,
        }
    }

    pub fn new(keyring: Keyring, source: Option<PathBuf>, usage_limit: u64) -> Sealer {
        Sealer {
            keyring: Arc::new(RwLock::new(Some(Arc::new(keyring)))),
            source,
            usage_limit,
        }
    }

    pub fn keyring(&self) -> Option<Arc<Keyring>> {
        self.keyring.read().ok().and_then(|k| k.clone())
    }

    pub fn enabled(&self) -> bool {
        self.keyring().is_some()
    }

    /// Re-reads the keyring file; keeps the current keyring if the file is unreadable or
    /// invalid. Returns true if the keyring changed.
    pub fn reload(&self) -> Result<bool, KeyringError> {
        let Some(path) = &self.source else {
            return Ok(false);
        };
        let fresh = Keyring::load(path)?;
        let changed = match self.keyring() {
            Some(old) => {
                old.active().id != fresh.active().id
                    || old.ids().collect::<Vec<_>>() != fresh.ids().collect::<Vec<_>>()
                    || old.ids().any(|id| {
                        old.get(id).map(|k| k.fingerprint) != fresh.get(id).map(|k| k.fingerprint)
                    })
            }
            None => true,
        };
        if changed && let Ok(mut slot) = self.keyring.write() {
            *slot = Some(Arc::new(fresh));
        }
        Ok(changed)
    }

    /// The active key's id and fingerprint.
    pub fn active_key(&self) -> Option<(u32, [u8; 16])> {
        self.keyring()
            .map(|k| (k.active().id, k.active().fingerprint))
    }

    /// Seals `value` for storage under `key`.
    pub fn seal(&self, key: &[u8], value: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.seal_with(&aad(key), value)
    }

    /// Seals the operand of a VALUE compare on `key`: it travels through the Raft log, so it is
    /// encrypted like a value.
    pub fn seal_operand(&self, key: &[u8], operand: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.seal_with(&operand_aad(key), operand)
    }

    fn seal_with(&self, aad: &[u8], value: &[u8]) -> Result<Vec<u8>, CryptoError> {
        let Some(ring) = self.keyring() else {
            return Ok(envelope::plain(value));
        };
        let k = ring.active();
        let nonce: [u8; envelope::NONCE_LEN] = rand::random();
        let ct = k
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: value, aad })
            .map_err(|_| CryptoError::Seal)?;
        Ok(envelope::sealed(k.id, &nonce, &ct))
    }

    /// Opens a stored value of `key`. Never returns garbage: a tampered or moved value is an
    /// error.
    pub fn open(&self, key: &[u8], stored: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.open_with(&aad(key), stored)
    }

    /// Opens a compare operand sealed by `seal_operand` (or a plaintext envelope).
    pub fn open_operand(&self, key: &[u8], operand: &[u8]) -> Result<Vec<u8>, CryptoError> {
        self.open_with(&operand_aad(key), operand)
    }

    fn open_with(&self, aad: &[u8], stored: &[u8]) -> Result<Vec<u8>, CryptoError> {
        match Envelope::parse(stored)? {
            Envelope::Plain(v) => Ok(v.to_vec()),
            Envelope::Sealed {
                key_id,
                nonce,
                sealed,
            } => {
                let ring = self.keyring().ok_or(CryptoError::NoKeyring)?;
                let k = ring.get(key_id).ok_or(CryptoError::UnknownKey(key_id))?;
                k.cipher
                    .decrypt(Nonce::from_slice(nonce), Payload { msg: sealed, aad })
                    .map_err(|_| CryptoError::Authentication)
            }
        }
    }
}

impl ValueOpener for Sealer {
    fn open(&self, key: &[u8], stored: &[u8]) -> Result<Vec<u8>, String> {
        Sealer::open(self, key, stored).map_err(|e| e.to_string())
    }
    fn open_operand(&self, key: &[u8], operand: &[u8]) -> Result<Vec<u8>, String> {
        Sealer::open_operand(self, key, operand).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_open_binds_key_and_detects_tampering() {
        let s = Sealer::new(Keyring::generate(), None, DEFAULT_KEY_USAGE_LIMIT);
        let sealed = s.seal(b"k", b"secret value").unwrap();
        assert!(!sealed.windows(6).any(|w| w == b"secret"));
        assert_eq!(s.open(b"k", &sealed).unwrap(), b"secret value");
        assert_eq!(s.open(b"other", &sealed), Err(CryptoError::Authentication));
        let mut bad = sealed.clone();
        let last = bad.len() - 1;
        bad[last] ^= 1;
        assert_eq!(s.open(b"k", &bad), Err(CryptoError::Authentication));
        // A compare operand is sealed apart from values: neither opens as the other.
        let operand = s.seal_operand(b"k", b"secret value").unwrap();
        assert!(!operand.windows(6).any(|w| w == b"secret"));
        assert_eq!(s.open_operand(b"k", &operand).unwrap(), b"secret value");
        assert_eq!(s.open(b"k", &operand), Err(CryptoError::Authentication));
        assert_eq!(
            s.open_operand(b"k", &sealed),
            Err(CryptoError::Authentication)
        );
        assert_eq!(
            s.open_operand(b"other", &operand),
            Err(CryptoError::Authentication)
        );
        // Two seals of the same value differ (fresh nonces).
        assert_ne!(s.seal(b"k", b"v").unwrap(), s.seal(b"k", b"v").unwrap());
        // Plaintext envelopes from an unencrypted cluster still read.
        assert_eq!(s.open(b"k", &envelope::plain(b"old")).unwrap(), b"old");
        let other = Sealer::new(Keyring::generate(), None, DEFAULT_KEY_USAGE_LIMIT);
        assert_eq!(other.open(b"k", &sealed), Err(CryptoError::Authentication));
        assert_eq!(
            Sealer::disabled().open(b"k", &sealed),
            Err(CryptoError::NoKeyring)
        );
    }

    #[test]
    fn random_and_mutated_envelopes_never_panic_or_open() {
        let s = Sealer::new(Keyring::generate(), None, DEFAULT_KEY_USAGE_LIMIT);
        let good = s.seal(b"k", b"value").unwrap();
        for i in 0..20_000u32 {
            let mut b: Vec<u8> = if i % 2 == 0 {
                (0..(i % 97)).map(|_| rand::random()).collect()
            } else {
                good.clone()
            };
            if !b.is_empty() {
                let at = rand::random_range(0..b.len());
                b[at] ^= rand::random_range(1..=255u8);
            }
            let _ = Envelope::parse(&b);
            if let Ok(plain) = s.open(b"k", &b) {
                assert!(
                    matches!(Envelope::parse(&b), Ok(Envelope::Plain(_))),
                    "forged value opened: {plain:?}"
                );
            }
        }
    }

    #[test]
    fn rotation_keeps_old_values_readable() {
        let mut ring = Keyring::generate();
        let s1 = Sealer::new(Keyring::parse(&ring.to_json()).unwrap(), None, 10);
        let old = s1.seal(b"k", b"v1").unwrap();
        ring.rotate();
        let s2 = Sealer::new(Keyring::parse(&ring.to_json()).unwrap(), None, 10);
        let new = s2.seal(b"k", b"v2").unwrap();
        assert_eq!(Envelope::parse(&new).unwrap().key_id(), Some(2));
        assert_eq!(s2.open(b"k", &old).unwrap(), b"v1");
        ring.remove(1).unwrap();
        let s3 = Sealer::new(Keyring::parse(&ring.to_json()).unwrap(), None, 10);
        assert_eq!(s3.open(b"k", &old), Err(CryptoError::UnknownKey(1)));
    }
}
