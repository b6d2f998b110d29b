//! Authentication: every client request carries a JWT (`authorization: Bearer <jwt>` or etcd's
//! `token` metadata), verified here into the principal that the state machine authorizes.
//! Users with passwords exchange them for tokens through etcd's `Authenticate`.

pub mod jwt;
pub mod logins;
pub mod password;

use crate::model::{Credential, Principal};
use jwt::{JwtConfig, JwtSetupError, TokenError, TokenIssuer, TokenVerifier, Verified};
use std::sync::Arc;

/// Who made a request, as the edge of the client port established it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: Principal,
    /// What proved it; forwarded with proposals so the leader can check it again.
    pub credential: Credential,
    /// When the credential stops being valid (a token's `exp`), seconds since the epoch.
    pub expires_at: Option<u64>,
}

/// Verifies request tokens and issues tokens for password logins.
#[derive(Clone)]
pub struct Authenticator {
    verifier: Arc<TokenVerifier>,
    issuer: Option<Arc<TokenIssuer>>,
    leeway: std::time::Duration,
}

impl Authenticator {
    pub fn new(cfg: &JwtConfig) -> Result<Authenticator, JwtSetupError> {
        Ok(Authenticator {
            verifier: Arc::new(TokenVerifier::new(cfg)?),
            issuer: TokenIssuer::new(cfg)?.map(Arc::new),
            leeway: std::time::Duration::from_secs(cfg.leeway_seconds),
        })
    }

    /// The clock skew allowed on `exp` and `nbf`.
    pub fn leeway(&self) -> std::time::Duration {
        self.leeway
    }

    /// Extracts and verifies the token of a request's metadata.
    pub fn authenticate(&self, headers: &http::HeaderMap) -> Result<Caller, TokenError> {
        let token = token_from(headers).ok_or(TokenError::Missing)?;
        let Verified { principal, exp } = self.verifier.verify(token)?;
        Ok(Caller {
            principal,
            credential: Credential::Token(token.to_string()),
            expires_at: Some(exp),
        })
    }

    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        self.verifier.verify(token)
    }

    /// Issues a token for `subject`, if this node has signing material.
    pub fn issue(&self, subject: &str, roles: &[String]) -> Result<String, String> {
        self.issue_bound(subject, roles, None)
    }

    /// Issues a token bound to a stored user's token revision.
    pub fn issue_bound(
        &self,
        subject: &str,
        roles: &[String],
        user_rev: Option<u64>,
    ) -> Result<String, String> {
        match &self.issuer {
            Some(i) => i.issue_bound(subject, roles, None, user_rev),
            None => Err("this node has no token signing key configured".into()),
        }
    }

    /// A caller acting for this member itself with the root role, for the few changes a member
    /// makes on its own (the initial root user) that may have to travel to the leader.
    pub fn member_caller(&self) -> Result<Caller, String> {
        let roles = vec![crate::storage::auth_state::ROOT.to_string()];
        let token = self.issue("raftkv-member", &roles)?;
        let Verified { principal, exp } = self.verify(&token).map_err(|e| e.to_string())?;
        Ok(Caller {
            principal,
            credential: Credential::Token(token),
            expires_at: Some(exp),
        })
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
