//! `kvctl token create`: signs a JWT for a subject and roles with the cluster's HS256 secret or a
//! private key, so people and applications get tokens without a password round trip.

use jsonwebtoken::{Algorithm, EncodingKey, Header};
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

#[derive(clap::Subcommand)]
pub enum TokenCmd {
    /// Sign a token and print it.
    Create {
        /// Who the token speaks for (`sub`).
        #[arg(long)]
        subject: String,
        /// Roles the token carries (repeat or comma-separate); `root` is the administrator.
        #[arg(long = "role", value_delimiter = ',')]
        roles: Vec<String>,
        /// Lifetime, e.g. 1h, 30m, 7d.
        #[arg(long, default_value = "1h", value_parser = humantime::parse_duration)]
        ttl: Duration,
        /// HS256 shared secret file (the cluster's --jwt-secret-file).
        #[arg(long, env = "RAFTKV_JWT_SECRET_FILE", conflicts_with = "private_key")]
        secret_file: Option<PathBuf>,
        /// RS256 or ES256 private key (PEM).
        #[arg(long)]
        private_key: Option<PathBuf>,
        #[arg(long)]
        issuer: Option<String>,
        #[arg(long)]
        audience: Option<String>,
    },
}

pub fn run(cmd: &TokenCmd) -> Result<(), String> {
    let TokenCmd::Create {
        subject,
        roles,
        ttl,
        secret_file,
        private_key,
        issuer,
        audience,
    } = cmd;
    if subject.is_empty() {
        return Err("--subject must not be empty".into());
    }
    let (alg, key) = match (secret_file, private_key) {
        (Some(f), None) => {
            let raw = std::fs::read(f).map_err(|e| format!("reading {}: {e}", f.display()))?;
            (Algorithm::HS256, EncodingKey::from_secret(raw.trim_ascii()))
        }
        (None, Some(f)) => {
            let pem = std::fs::read(f).map_err(|e| format!("reading {}: {e}", f.display()))?;
            match EncodingKey::from_rsa_pem(&pem) {
                Ok(k) => (Algorithm::RS256, k),
                Err(_) => (
                    Algorithm::ES256,
                    EncodingKey::from_ec_pem(&pem).map_err(|e| {
                        format!(
                            "{} is neither an RSA nor an EC private key: {e}",
                            f.display()
                        )
                    })?,
                ),
            }
        }
        _ => return Err("give --secret-file (HS256) or --private-key (RS256/ES256)".into()),
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut claims = serde_json::json!({
        "sub": subject,
        "roles": roles,
        "iat": now,
        "exp": now + ttl.as_secs().max(1),
    });
    if let Some(i) = issuer {
        claims["iss"] = i.clone().into();
    }
    if let Some(a) = audience {
        claims["aud"] = a.clone().into();
    }
    let token = jsonwebtoken::encode(&Header::new(alg), &claims, &key)
        .map_err(|e| format!("signing: {e}"))?;
    println!("{token}");
    Ok(())
}
