//! JSON Web Tokens: verification of every request's token, and issuance of tokens for users who
//! authenticate with a password.
//!
//! The accepted algorithms are exactly those for which a key is configured (HS256 shared secret,
//! RS256 or ES256 public key); the token header only selects among them and can never name one
//! that is not configured, `none` included. `exp` is required, `nbf` checked, `iss`/`aud`
//! checked when configured, all with a small leeway.

use crate::model::Principal;
use base64::Engine;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation, errors::ErrorKind};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Where keys come from and what tokens must say.
#[derive(Debug, Clone, Default)]
pub struct JwtConfig {
    /// HS256 shared secret file (raw bytes; surrounding whitespace trimmed).
    pub hs256_secret_file: Option<PathBuf>,
    /// RS256 public key (PEM) for tokens from an external issuer.
    pub rs256_public_key_file: Option<PathBuf>,
    /// ES256 public key (PEM) for tokens from an external issuer.
    pub es256_public_key_file: Option<PathBuf>,
    /// Private key (PEM, RS256 or ES256) used instead of the HS256 secret to sign tokens this
    /// node issues.
    pub signing_key_file: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_seconds: u64,
    /// Lifetime of tokens issued by `Authenticate`.
    pub token_ttl: Duration,
    /// Longest lifetime a token may have left when presented (`exp` − now); tokens minted to
    /// last longer are refused. Zero means the default (24 hours).
    pub max_lifetime: Duration,
}

/// The longest token lifetime accepted unless configured otherwise.
pub const DEFAULT_MAX_TOKEN_LIFETIME: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum JwtSetupError {
    #[error("cannot read {what} from {path}: {source}")]
    Read {
        what: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("{what} in {path} is not usable: {reason}")]
    BadKey {
        what: &'static str,
        path: String,
        reason: String,
    },
    #[error(
        "no token verification key configured: give an HS256 secret file or an RS256/ES256 public key file"
    )]
    NoKeys,
}

/// Why a token was refused. `reason()` is the stable label used in metrics.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    #[error("missing auth token: send 'authorization: Bearer <jwt>' or etcd's 'token' metadata")]
    Missing,
    #[error("token is not a well-formed JWT: {0}")]
    Malformed(String),
    #[error("token algorithm '{0}' is not accepted by this cluster")]
    AlgorithmNotAllowed(String),
    #[error("token signature is invalid")]
    BadSignature,
    #[error("token has expired")]
    Expired,
    #[error("token is not valid yet (nbf is in the future)")]
    NotYetValid,
    #[error("token issuer does not match the cluster's configured issuer")]
    WrongIssuer,
    #[error("token audience does not include this cluster's audience")]
    WrongAudience,
    #[error("token claims are invalid: {0}")]
    InvalidClaims(String),
    #[error("token lives too long: it expires in {0} s, more than the {1} s this cluster accepts")]
    LifetimeTooLong(u64, u64),
    #[error("token is too large ({0} bytes; at most {1})")]
    TooLarge(usize, usize),
    #[error(
        "token was issued to a user that has since been deleted, re-created or changed password"
    )]
    Revoked,
    #[error("the client certificate's common name {0:?} names no user")]
    UnknownCertificateUser(String),
    #[error(
        "the token was issued after an auth change this member has not applied yet: it is catching up; retry, or ask another member"
    )]
    NotCaughtUp,
}

impl TokenError {
    pub fn reason(&self) -> &'static str {
        match self {
            TokenError::Missing => "missing",
            TokenError::Malformed(_) => "malformed",
            TokenError::AlgorithmNotAllowed(_) => "algorithm",
            TokenError::BadSignature => "signature",
            TokenError::Expired => "expired",
            TokenError::NotYetValid => "not_yet_valid",
            TokenError::WrongIssuer => "issuer",
            TokenError::WrongAudience => "audience",
            TokenError::InvalidClaims(_) => "claims",
            TokenError::LifetimeTooLong(..) => "lifetime",
            TokenError::TooLarge(..) => "too_large",
            TokenError::Revoked => "revoked",
            TokenError::UnknownCertificateUser(_) => "certificate_user",
            TokenError::NotCaughtUp => "not_caught_up",
        }
    }
}

/// An `aud` claim: RFC 7519 allows one string or an array of strings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Audience {
    One(String),
    Many(Vec<String>),
}

/// The claims raftkv reads; `iss`, `aud`, `nbf` are checked by the validator from the raw JSON.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub sub: String,
    pub exp: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iat: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Audience>,
    #[serde(default)]
    pub roles: Vec<String>,
    /// Set in tokens a member issues to a stored user: that user's token revision.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urev: Option<u64>,
}

/// A verified token: who it speaks for and until when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    pub principal: Principal,
    /// `exp`, seconds since the epoch.
    pub exp: u64,
}

struct CachedToken {
    principal: Principal,
    exp: u64,
    nbf: Option<u64>,
}

const CACHE_LIMIT: usize = 16_384;

/// Tokens longer than this are refused before any parsing (HTTP/2 header limits are set above
/// it, so such a token gets an answer instead of a dropped connection).
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Verifies tokens. Verified tokens are cached until they expire, so a client reusing its token
/// costs a hash lookup rather than a signature check.
pub struct TokenVerifier {
    keys: Vec<(Algorithm, DecodingKey)>,
    issuer: Option<String>,
    audience: Option<String>,
    leeway: u64,
    max_lifetime: u64,
    cache: Mutex<HashMap<String, CachedToken>>,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, JwtSetupError> {
    std::fs::read(path).map_err(|source| JwtSetupError::Read {
        what,
        path: path.display().to_string(),
        source,
    })
}

fn bad_key(what: &'static str, path: &Path, e: impl std::fmt::Display) -> JwtSetupError {
    JwtSetupError::BadKey {
        what,
        path: path.display().to_string(),
        reason: e.to_string(),
    }
}

/// Reads a shared secret file: trailing newlines from editors and Secret tooling are dropped.
pub fn read_secret(path: &Path) -> Result<Vec<u8>, JwtSetupError> {
    let raw = read("HS256 secret", path)?;
    let trimmed = raw.trim_ascii().to_vec();
    if trimmed.len() < 32 {
        return Err(bad_key(
            "HS256 secret",
            path,
            format!("{} bytes; use at least 32 random bytes", trimmed.len()),
        ));
    }
    Ok(trimmed)
}

impl TokenVerifier {
    pub fn new(cfg: &JwtConfig) -> Result<TokenVerifier, JwtSetupError> {
        let mut keys = Vec::new();
        if let Some(p) = &cfg.hs256_secret_file {
            keys.push((Algorithm::HS256, DecodingKey::from_secret(&read_secret(p)?)));
        }
        if let Some(p) = &cfg.rs256_public_key_file {
            let pem = read("RS256 public key", p)?;
            let k =
                DecodingKey::from_rsa_pem(&pem).map_err(|e| bad_key("RS256 public key", p, e))?;
            keys.push((Algorithm::RS256, k));
        }
        if let Some(p) = &cfg.es256_public_key_file {
            let pem = read("ES256 public key", p)?;
            let k =
                DecodingKey::from_ec_pem(&pem).map_err(|e| bad_key("ES256 public key", p, e))?;
            keys.push((Algorithm::ES256, k));
        }
        if keys.is_empty() {
            return Err(JwtSetupError::NoKeys);
        }
        Ok(TokenVerifier {
            keys,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            leeway: cfg.leeway_seconds,
            max_lifetime: if cfg.max_lifetime.is_zero() {
                DEFAULT_MAX_TOKEN_LIFETIME.as_secs()
            } else {
                cfg.max_lifetime.as_secs()
            },
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// The algorithms this cluster accepts.
    pub fn algorithms(&self) -> Vec<Algorithm> {
        self.keys.iter().map(|(a, _)| *a).collect()
    }

    /// Verifies a token and returns who it speaks for.
    pub fn verify(&self, token: &str) -> Result<Verified, TokenError> {
        if token.len() > MAX_TOKEN_BYTES {
            return Err(TokenError::TooLarge(token.len(), MAX_TOKEN_BYTES));
        }
        let now = now_secs();
        if let Ok(cache) = self.cache.lock()
            && let Some(c) = cache.get(token)
        {
            if now > c.exp.saturating_add(self.leeway) {
                return Err(TokenError::Expired);
            }
            if c.nbf
                .map(|n| n > now.saturating_add(self.leeway))
                .unwrap_or(false)
            {
                return Err(TokenError::NotYetValid);
            }
            return Ok(Verified {
                principal: c.principal.clone(),
                exp: c.exp,
            });
        }
        let claims = self.verify_uncached(token)?;
        let left = claims.exp.saturating_sub(now);
        if left > self.max_lifetime.saturating_add(self.leeway) {
            return Err(TokenError::LifetimeTooLong(left, self.max_lifetime));
        }
        let principal = Principal {
            name: claims.sub.clone(),
            roles: claims.roles.clone(),
            user_rev: claims.urev,
        };
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= CACHE_LIMIT {
                cache.retain(|_, c| c.exp.saturating_add(self.leeway) >= now);
                if cache.len() >= CACHE_LIMIT {
                    cache.clear();
                }
            }
            cache.insert(
                token.to_string(),
                CachedToken {
                    principal: principal.clone(),
                    exp: claims.exp,
                    nbf: claims.nbf,
                },
            );
        }
        Ok(Verified {
            principal,
            exp: claims.exp,
        })
    }

    fn verify_uncached(&self, token: &str) -> Result<Claims, TokenError> {
        let alg_name = header_alg(token)?;
        let Some((alg, key)) = self.keys.iter().find(|(a, _)| format!("{a:?}") == alg_name) else {
            return Err(TokenError::AlgorithmNotAllowed(alg_name));
        };
        let mut v = Validation::new(*alg);
        v.leeway = self.leeway;
        v.validate_exp = true;
        v.validate_nbf = true;
        // A configured issuer or audience is required, not merely checked when present.
        let mut required = vec!["exp", "sub"];
        if self.issuer.is_some() {
            required.push("iss");
        }
        if self.audience.is_some() {
            required.push("aud");
        }
        v.set_required_spec_claims(&required);
        match &self.audience {
            Some(a) => v.set_audience(&[a]),
            None => v.validate_aud = false,
        }
        if let Some(i) = &self.issuer {
            v.set_issuer(&[i]);
        }
        jsonwebtoken::decode::<Claims>(token, key, &v)
            .map(|d| d.claims)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => TokenError::Expired,
                ErrorKind::ImmatureSignature => TokenError::NotYetValid,
                ErrorKind::InvalidSignature => TokenError::BadSignature,
                ErrorKind::InvalidIssuer => TokenError::WrongIssuer,
                ErrorKind::InvalidAudience => TokenError::WrongAudience,
                ErrorKind::InvalidAlgorithm
                | ErrorKind::InvalidAlgorithmName
                | ErrorKind::UnsupportedAlgorithm => {
                    TokenError::AlgorithmNotAllowed(alg_name.clone())
                }
                ErrorKind::MissingRequiredClaim(c) => {
                    TokenError::InvalidClaims(format!("required claim '{c}' is missing"))
                }
                ErrorKind::InvalidClaimFormat(c) => {
                    TokenError::InvalidClaims(format!("claim '{c}' has the wrong type"))
                }
                ErrorKind::Json(e) => TokenError::InvalidClaims(e.to_string()),
                other => TokenError::Malformed(format!("{other:?}")),
            })
    }
}

/// Reads the `alg` of a token header without trusting anything else in it. Never panics.
pub fn header_alg(token: &str) -> Result<String, TokenError> {
    let mut parts = token.split('.');
    let (Some(h), Some(_), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(TokenError::Malformed(
            "a JWT has three dot-separated parts".into(),
        ));
    };
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(h.trim_end_matches('='))
        .map_err(|_| TokenError::Malformed("header is not base64url".into()))?;
    let v: serde_json::Value = serde_json::from_slice(&bytes)
        .map_err(|_| TokenError::Malformed("header is not JSON".into()))?;
    match v.get("alg").and_then(|a| a.as_str()) {
        Some(a) => Ok(a.to_string()),
        None => Err(TokenError::Malformed("header has no 'alg'".into())),
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Signs tokens with the cluster's HS256 secret or a private key.
pub struct TokenIssuer {
    alg: Algorithm,
    key: EncodingKey,
    issuer: Option<String>,
    audience: Option<String>,
    pub ttl: Duration,
}

impl TokenIssuer {
    /// The issuer for `cfg`, if it has signing material (a private key, else the HS256 secret).
    pub fn new(cfg: &JwtConfig) -> Result<Option<TokenIssuer>, JwtSetupError> {
        let (alg, key) = if let Some(p) = &cfg.signing_key_file {
            let pem = read("signing key", p)?;
            match EncodingKey::from_rsa_pem(&pem) {
                Ok(k) => (Algorithm::RS256, k),
                Err(_) => (
                    Algorithm::ES256,
                    EncodingKey::from_ec_pem(&pem).map_err(|e| bad_key("signing key", p, e))?,
                ),
            }
        } else if let Some(p) = &cfg.hs256_secret_file {
            (Algorithm::HS256, EncodingKey::from_secret(&read_secret(p)?))
        } else {
            return Ok(None);
        };
        Ok(Some(TokenIssuer {
            alg,
            key,
            issuer: cfg.issuer.clone(),
            audience: cfg.audience.clone(),
            ttl: cfg.token_ttl,
        }))
    }

    /// An issuer from raw material, for tools that sign tokens (`kvctl token create`).
    pub fn from_parts(
        alg: Algorithm,
        key: EncodingKey,
        issuer: Option<String>,
        audience: Option<String>,
        ttl: Duration,
    ) -> TokenIssuer {
        TokenIssuer {
            alg,
            key,
            issuer,
            audience,
            ttl,
        }
    }

    pub fn issue(
        &self,
        subject: &str,
        roles: &[String],
        ttl: Option<Duration>,
    ) -> Result<String, String> {
        self.issue_bound(subject, roles, ttl, None)
    }

    /// Issues a token bound to a stored user's token revision (see `Principal::user_rev`).
    pub fn issue_bound(
        &self,
        subject: &str,
        roles: &[String],
        ttl: Option<Duration>,
        user_rev: Option<u64>,
    ) -> Result<String, String> {
        let now = now_secs();
        let claims = Claims {
            sub: subject.to_string(),
            exp: now + ttl.unwrap_or(self.ttl).as_secs().max(1),
            nbf: None,
            iat: Some(now),
            iss: self.issuer.clone(),
            aud: self.audience.clone().map(Audience::One),
            roles: roles.to_vec(),
            urev: user_rev,
        };
        jsonwebtoken::encode(&Header::new(self.alg), &claims, &self.key).map_err(|e| e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn setup(dir: &std::path::Path) -> (JwtConfig, TokenIssuer) {
        let secret = dir.join("secret");
        std::fs::write(&secret, "0123456789abcdef0123456789abcdef\n").unwrap();
        let cfg = JwtConfig {
            hs256_secret_file: Some(secret),
            leeway_seconds: 5,
            token_ttl: Duration::from_secs(60),
            ..Default::default()
        };
        let issuer = TokenIssuer::new(&cfg).unwrap().unwrap();
        (cfg, issuer)
    }

    #[test]
    fn random_and_mutated_tokens_never_panic_or_verify() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, issuer) = setup(dir.path());
        let v = TokenVerifier::new(&cfg).unwrap();
        let good = issuer.issue("alice", &[], None).unwrap();
        let alphabet = b"abcXYZ019-_.=+/{}\":,";
        for i in 0..5_000u32 {
            let s: String = if i % 2 == 0 {
                (0..(i % 120))
                    .map(|_| alphabet[rand::random_range(0..alphabet.len())] as char)
                    .collect()
            } else {
                let mut b = good.clone().into_bytes();
                let at = rand::random_range(0..b.len());
                b[at] = alphabet[rand::random_range(0..alphabet.len())];
                String::from_utf8(b).unwrap()
            };
            let _ = header_alg(&s);
            if s != good && v.verify(&s).is_ok() {
                // A mutation that still verifies must decode to the same claims (base64 slack).
                assert_eq!(v.verify(&s).unwrap().principal.name, "alice");
            }
        }
    }

    #[test]
    fn issued_tokens_verify_and_bad_ones_are_refused_with_reasons() {
        let dir = tempfile::tempdir().unwrap();
        let (cfg, issuer) = setup(dir.path());
        let v = TokenVerifier::new(&cfg).unwrap();
        let t = issuer.issue("alice", &["reader".into()], None).unwrap();
        let p = v.verify(&t).unwrap();
        assert_eq!(p.principal.name, "alice");
        assert_eq!(p.principal.roles, vec!["reader".to_string()]);
        // Cached path gives the same answer.
        assert_eq!(v.verify(&t).unwrap(), p);

        assert!(matches!(v.verify("garbage"), Err(TokenError::Malformed(_))));
        // Flip the signature's first character: every bit of it is significant, whereas the
        // last one carries padding bits and a swap there can make the base64 itself invalid.
        let sig_at = t.rfind('.').unwrap() + 1;
        let mut tampered = t.clone();
        let first = if t[sig_at..].starts_with('A') {
            "B"
        } else {
            "A"
        };
        tampered.replace_range(sig_at..sig_at + 1, first);
        assert_eq!(v.verify(&tampered), Err(TokenError::BadSignature));

        let none_header = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(r#"{"alg":"none","typ":"JWT"}"#);
        let payload = t.split('.').nth(1).unwrap();
        assert_eq!(
            v.verify(&format!("{none_header}.{payload}.")),
            Err(TokenError::AlgorithmNotAllowed("none".into()))
        );

        let expired = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "a", "exp": now_secs() - 3600}),
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert_eq!(v.verify(&expired), Err(TokenError::Expired));
        let string_exp = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "a", "exp": "tomorrow"}),
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert!(matches!(
            v.verify(&string_exp),
            Err(TokenError::InvalidClaims(_))
        ));
        let forever = jsonwebtoken::encode(
            &Header::new(Algorithm::HS256),
            &serde_json::json!({"sub": "a", "exp": u64::MAX}),
            &EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef"),
        )
        .unwrap();
        assert!(matches!(
            v.verify(&forever),
            Err(TokenError::LifetimeTooLong(..))
        ));
        assert!(matches!(
            v.verify(&"a".repeat(MAX_TOKEN_BYTES + 1)),
            Err(TokenError::TooLarge(..))
        ));
    }

    #[test]
    fn configured_issuer_and_audience_are_required_and_audience_arrays_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let (mut cfg, _) = setup(dir.path());
        cfg.issuer = Some("https://issuer".into());
        cfg.audience = Some("raftkv".into());
        let v = TokenVerifier::new(&cfg).unwrap();
        let key = EncodingKey::from_secret(b"0123456789abcdef0123456789abcdef");
        let sign = |c: serde_json::Value| {
            jsonwebtoken::encode(&Header::new(Algorithm::HS256), &c, &key).unwrap()
        };
        let exp = now_secs() + 60;
        let full = sign(
            serde_json::json!({"sub": "a", "exp": exp, "iss": "https://issuer", "aud": "raftkv"}),
        );
        assert!(v.verify(&full).is_ok());
        let array = sign(
            serde_json::json!({"sub": "a", "exp": exp, "iss": "https://issuer", "aud": ["other", "raftkv"]}),
        );
        assert!(v.verify(&array).is_ok(), "{:?}", v.verify(&array));
        let wrong = sign(
            serde_json::json!({"sub": "a", "exp": exp, "iss": "https://issuer", "aud": ["other"]}),
        );
        assert_eq!(v.verify(&wrong), Err(TokenError::WrongAudience));
        let no_iss = sign(serde_json::json!({"sub": "a", "exp": exp, "aud": "raftkv"}));
        assert!(matches!(
            v.verify(&no_iss),
            Err(TokenError::InvalidClaims(_))
        ));
        let no_aud = sign(serde_json::json!({"sub": "a", "exp": exp, "iss": "https://issuer"}));
        assert!(matches!(
            v.verify(&no_aud),
            Err(TokenError::InvalidClaims(_))
        ));
    }
}
