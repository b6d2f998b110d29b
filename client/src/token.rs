//! Signing tokens raftkv verifies: the claims it reads (`sub`, `roles`, `iat`, `exp`, and `iss`
//! / `aud` when the cluster requires them), signed with the cluster's HS256 secret or an RS256 /
//! ES256 private key. Used by `kvctl token create` and by the operator for its own token.

use crate::Error;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A key that signs tokens.
pub struct SigningKey {
    alg: Algorithm,
    key: EncodingKey,
}

impl SigningKey {
    /// The HS256 shared secret (surrounding whitespace, e.g. a file's newline, is ignored).
    pub fn hs256(secret: &[u8]) -> SigningKey {
        SigningKey {
            alg: Algorithm::HS256,
            key: EncodingKey::from_secret(secret.trim_ascii()),
        }
    }

    pub fn rs256(pem: &[u8]) -> Result<SigningKey, Error> {
        let key = EncodingKey::from_rsa_pem(pem)
            .map_err(|e| Error::Config(format!("not an RSA private key: {e}")))?;
        Ok(SigningKey {
            alg: Algorithm::RS256,
            key,
        })
    }

    pub fn es256(pem: &[u8]) -> Result<SigningKey, Error> {
        let key = EncodingKey::from_ec_pem(pem)
            .map_err(|e| Error::Config(format!("not an EC private key: {e}")))?;
        Ok(SigningKey {
            alg: Algorithm::ES256,
            key,
        })
    }

    /// An RSA (RS256) or EC (ES256) private key, whichever the PEM holds.
    pub fn private_pem(pem: &[u8]) -> Result<SigningKey, Error> {
        Self::rs256(pem).or_else(|_| {
            Self::es256(pem)
                .map_err(|e| Error::Config(format!("neither an RSA nor an EC private key: {e}")))
        })
    }
}

/// What a token says about its bearer.
pub struct TokenClaims<'a> {
    pub subject: &'a str,
    pub roles: &'a [String],
    pub ttl: Duration,
    pub issuer: Option<&'a str>,
    pub audience: Option<&'a str>,
}

pub fn sign(key: &SigningKey, claims: &TokenClaims) -> Result<String, Error> {
    if claims.subject.is_empty() {
        return Err(Error::Config("the token subject must not be empty".into()));
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut body = serde_json::json!({
        "sub": claims.subject,
        "roles": claims.roles,
        "iat": now,
        "exp": now + claims.ttl.as_secs().max(1),
    });
    if let Some(i) = claims.issuer {
        body["iss"] = i.into();
    }
    if let Some(a) = claims.audience {
        body["aud"] = a.into();
    }
    jsonwebtoken::encode(&Header::new(key.alg), &body, &key.key)
        .map_err(|e| Error::Config(format!("signing: {e}")))
}
