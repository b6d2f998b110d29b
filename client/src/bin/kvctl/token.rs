//! `kvctl token create`: signs a JWT for a subject and roles with the cluster's HS256 secret or a
//! private key, so people and applications get tokens without a password round trip.

use raftkv_client::token::{SigningKey, TokenClaims, sign};
use std::path::PathBuf;
use std::time::Duration;

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
    let key = match (secret_file, private_key) {
        (Some(f), None) => {
            let raw = std::fs::read(f).map_err(|e| format!("reading {}: {e}", f.display()))?;
            SigningKey::hs256(&raw)
        }
        (None, Some(f)) => {
            let pem = std::fs::read(f).map_err(|e| format!("reading {}: {e}", f.display()))?;
            SigningKey::private_pem(&pem).map_err(|e| format!("{}: {e}", f.display()))?
        }
        _ => return Err("give --secret-file (HS256) or --private-key (RS256/ES256)".into()),
    };
    let claims = TokenClaims {
        subject,
        roles,
        ttl: *ttl,
        issuer: issuer.as_deref(),
        audience: audience.as_deref(),
    };
    let token = sign(&key, &claims).map_err(|e| e.to_string())?;
    println!("{token}");
    Ok(())
}
