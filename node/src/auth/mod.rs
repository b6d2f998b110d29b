//! Authentication: every client request carries a JWT (`authorization: Bearer <jwt>` or etcd's
//! `token` metadata), verified here into the principal that the state machine authorizes.
//! Users with passwords exchange them for tokens through etcd's `Authenticate`.

pub mod jwt;
pub mod password;

use crate::model::Principal;
use jwt::{JwtConfig, JwtSetupError, TokenError, TokenIssuer, TokenVerifier};
use std::sync::Arc;

/// Verifies request tokens and issues tokens for password logins.
#[derive(Clone)]
pub struct Authenticator {
    verifier: Arc<TokenVerifier>,
    issuer: Option<Arc<TokenIssuer>>,
}

impl Authenticator {
    pub fn new(cfg: &JwtConfig) -> Result<Authenticator, JwtSetupError> {
        Ok(Authenticator {
            verifier: Arc::new(TokenVerifier::new(cfg)?),
            issuer: TokenIssuer::new(cfg)?.map(Arc::new),
        })
    }

    /// Extracts and verifies the token of a request's metadata.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Principal, TokenError> {
        let token = token_from(headers).ok_or(TokenError::Missing)?;
        self.verifier.verify(token)
    }

    pub fn verify(&self, token: &str) -> Result<Principal, TokenError> {
        self.verifier.verify(token)
    }

    /// Issues a token for `subject`, if this node has signing material.
    pub fn issue(&self, subject: &str, roles: &[String]) -> Result<String, String> {
        match &self.issuer {
            Some(i) => i.issue(subject, roles, None),
            None => Err("this node has no token signing key configured".into()),
        }
    }
}

/// The token of a request: `authorization: Bearer …` first, then etcd's `token` key.
pub fn token_from(headers: &http::HeaderMap) -> Option<&str> {
    if let Some(v) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        let v = v.trim();
        if let Some(t) = v
            .strip_prefix("Bearer ")
            .or_else(|| v.strip_prefix("bearer "))
        {
            return Some(t.trim());
        }
    }
    headers
        .get("token")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
}
