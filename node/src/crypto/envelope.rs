//! The stored form of a value: `[version][key id][nonce][ciphertext + tag]`.
//!
//! Version 1 is AES-256-GCM with a 96-bit random nonce, the user key bound as associated data.
//! Version 0 is a plaintext value (a cluster running without encryption), kept so that turning
//! encryption on later and re-encrypting works without a format change.

/// Envelope format versions.
pub const PLAINTEXT: u8 = 0;
pub const AES256_GCM: u8 = 1;

pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;
const HEADER_LEN: usize = 1 + 4 + NONCE_LEN;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EnvelopeError {
    #[error("stored value is empty (no envelope)")]
    Empty,
    #[error("stored value has unknown envelope version {0}")]
    UnknownVersion(u8),
    #[error("stored value is truncated ({0} bytes, an encrypted envelope needs at least {min})", min = HEADER_LEN + TAG_LEN)]
    Truncated(usize),
}

/// A parsed envelope borrowing from the stored bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Envelope<'a> {
    Plain(&'a [u8]),
    Sealed {
        key_id: u32,
        nonce: &'a [u8; NONCE_LEN],
        /// Ciphertext followed by the 16-byte tag.
        sealed: &'a [u8],
    },
}

impl<'a> Envelope<'a> {
    /// Parses stored bytes. Never panics, whatever the input.
    pub fn parse(b: &'a [u8]) -> Result<Envelope<'a>, EnvelopeError> {
        let (&version, rest) = b.split_first().ok_or(EnvelopeError::Empty)?;
        match version {
            PLAINTEXT => Ok(Envelope::Plain(rest)),
            AES256_GCM => {
                if b.len() < HEADER_LEN + TAG_LEN {
                    return Err(EnvelopeError::Truncated(b.len()));
                }
                let mut id = [0u8; 4];
                id.copy_from_slice(&b[1..5]);
                let nonce: &[u8; NONCE_LEN] = b[5..HEADER_LEN]
                    .try_into()
                    .map_err(|_| EnvelopeError::Truncated(b.len()))?;
                Ok(Envelope::Sealed {
                    key_id: u32::from_be_bytes(id),
                    nonce,
                    sealed: &b[HEADER_LEN..],
                })
            }
            v => Err(EnvelopeError::UnknownVersion(v)),
        }
    }

    /// The key id a stored value was sealed with, if any.
    pub fn key_id(&self) -> Option<u32> {
        match self {
            Envelope::Plain(_) => None,
            Envelope::Sealed { key_id, .. } => Some(*key_id),
        }
    }
}

pub fn plain(value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 1);
    out.push(PLAINTEXT);
    out.extend_from_slice(value);
    out
}

/// Lays out a sealed envelope around ciphertext+tag.
pub fn sealed(key_id: u32, nonce: &[u8; NONCE_LEN], ciphertext: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + ciphertext.len());
    out.push(AES256_GCM);
    out.extend_from_slice(&key_id.to_be_bytes());
    out.extend_from_slice(nonce);
    out.extend_from_slice(ciphertext);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_short_input_without_panicking() {
        for len in 0..64 {
            for first in [0u8, 1, 2, 255] {
                let mut b = vec![7u8; len];
                if let Some(f) = b.first_mut() {
                    *f = first;
                }
                let _ = Envelope::parse(&b);
            }
        }
        assert_eq!(Envelope::parse(&[]), Err(EnvelopeError::Empty));
        assert_eq!(Envelope::parse(&[9]), Err(EnvelopeError::UnknownVersion(9)));
        assert_eq!(
            Envelope::parse(&[1, 0, 0]),
            Err(EnvelopeError::Truncated(3))
        );
        assert_eq!(Envelope::parse(&plain(b"x")), Ok(Envelope::Plain(b"x")));
    }
}
