//! The operator's side of a cluster's Raft group: what the members report and the membership
//! changes the planner asks for, all through the public raftkv (etcd v3) API with a short-lived
//! root token the operator signs with the cluster's own key — never through node internals.

use crate::crd::JwtAlgorithm;
use crate::{Error, Result};
use raftkv_client::token::{self, TokenClaims};
use raftkv_client::{Client, ConnectOptions, Member, TlsOptions};
use std::collections::BTreeMap;
use std::time::Duration;

/// How long the operator's tokens live: one reconcile's worth, so a leaked one is soon useless.
const TOKEN_TTL: Duration = Duration::from_secs(300);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// The key the operator signs with, read from the cluster's JWT Secret.
pub struct SigningKey {
    pub algorithm: JwtAlgorithm,
    /// HS256: the shared secret; RS256/ES256: the private key PEM.
    pub material: Vec<u8>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
}

/// Signs a token for the `root` role (membership changes need it).
pub fn root_token(key: &SigningKey) -> Result<String> {
    root_token_for(key, TOKEN_TTL)
}

/// A root token living `ttl` (a backup Job's, for as long as the Job may run).
pub fn root_token_for(key: &SigningKey, ttl: Duration) -> Result<String> {
    let signer = match key.algorithm {
        JwtAlgorithm::HS256 => Ok(token::SigningKey::hs256(&key.material)),
        JwtAlgorithm::RS256 => token::SigningKey::rs256(&key.material),
        JwtAlgorithm::ES256 => token::SigningKey::es256(&key.material),
    }
    .map_err(|e| Error::Token(e.to_string()))?;
    let claims = TokenClaims {
        subject: "raftkv-operator",
        roles: &["root".to_string()],
        ttl,
        issuer: key.issuer.as_deref(),
        audience: key.audience.as_deref(),
    };
    token::sign(&signer, &claims).map_err(|e| Error::Token(e.to_string()))
}

/// What the members said.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub members: Vec<Member>,
    /// Applied index by member id, for members that answered.
    pub applied: BTreeMap<u64, u64>,
    pub leader: Option<u64>,
    /// The leader's commit index (or the highest any member reported).
    pub commit: u64,
}

/// A connection to one cluster's members (by pod address: the operator does not depend on
/// cluster DNS to reach them).
pub struct Cluster {
    client: Client,
}

impl Cluster {
    pub async fn connect(
        endpoints: Vec<String>,
        token: String,
        tls: Option<TlsOptions>,
    ) -> Result<Cluster> {
        let mut opts = ConnectOptions::default()
            .with_token(token)
            .with_timeout(REQUEST_TIMEOUT)
            .without_discovery();
        opts.connect_timeout = Duration::from_secs(2);
        opts.retry_deadline = Duration::from_secs(10);
        if let Some(t) = tls {
            opts = opts.with_tls(t);
        }
        Ok(Cluster {
            client: Client::connect(endpoints, opts).await?,
        })
    }

    /// The client, for what the operator does beyond membership (backups).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Asks every member for its status and the leader for the membership.
    pub async fn report(&self) -> Result<Report> {
        let mut report = Report::default();
        let mut leaders: BTreeMap<u64, usize> = BTreeMap::new();
        let mut leader_commit = None;
        for (_, st) in self.client.status().await {
            let Ok(s) = st else { continue };
            report.applied.insert(s.id, s.applied_index);
            report.commit = report.commit.max(s.committed_index);
            if s.leader != 0 {
                *leaders.entry(s.leader).or_default() += 1;
            }
            if s.leader == s.id && s.id != 0 {
                leader_commit = Some(s.committed_index);
            }
        }
        report.leader = leaders
            .into_iter()
            .max_by_key(|(_, votes)| *votes)
            .map(|(id, _)| id);
        if let Some(c) = leader_commit {
            report.commit = c;
        }
        if report.leader.is_some() {
            report.members = self.client.members().await?;
        }
        Ok(report)
    }

    pub async fn add_learner(&self, id: u64, peer_url: &str) -> Result<()> {
        self.client.add_learner(id, peer_url).await?;
        Ok(())
    }

    pub async fn promote(&self, id: u64) -> Result<()> {
        self.client.promote(id).await?;
        Ok(())
    }

    pub async fn remove(&self, id: u64) -> Result<()> {
        self.client.remove_member(id).await?;
        Ok(())
    }

    pub async fn move_leader(&self, to: u64) -> Result<()> {
        self.client.move_leader(to).await?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn root_tokens_carry_the_root_role_and_a_short_expiry() {
        let key = SigningKey {
            algorithm: JwtAlgorithm::HS256,
            material: b"0123456789abcdef0123456789abcdef\n".to_vec(),
            issuer: Some("me".into()),
            audience: None,
        };
        let t = root_token(&key).unwrap();
        let mut v = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::HS256);
        v.set_issuer(&["me"]);
        let data = jsonwebtoken::decode::<serde_json::Value>(
            &t,
            &jsonwebtoken::DecodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
            &v,
        )
        .unwrap();
        assert_eq!(data.claims["roles"][0], "root");
        let ttl = data.claims["exp"].as_u64().unwrap() - data.claims["iat"].as_u64().unwrap();
        assert_eq!(ttl, TOKEN_TTL.as_secs());
    }

    #[test]
    fn a_bad_private_key_is_a_clear_error() {
        let key = SigningKey {
            algorithm: JwtAlgorithm::RS256,
            material: b"not a pem".to_vec(),
            issuer: None,
            audience: None,
        };
        assert!(matches!(root_token(&key), Err(Error::Token(_))));
    }
}
