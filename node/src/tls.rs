//! TLS for the client and peer ports (rustls through tonic). The peer port always verifies the
//! other member's certificate (mutual TLS); the client port does when given a client CA.

use std::path::Path;
use tonic::transport::{Certificate, ClientTlsConfig, Identity, ServerTlsConfig};

#[derive(Debug, thiserror::Error)]
#[error("cannot read TLS {what} from {path}: {source}")]
pub struct TlsError {
    what: &'static str,
    path: String,
    source: std::io::Error,
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError {
        what,
        path: path.display().to_string(),
        source,
    })
}

/// Server-side TLS; with `client_ca`, clients must present a certificate it signed.
pub fn server(
    cert: &Path,
    key: &Path,
    client_ca: Option<&Path>,
) -> Result<ServerTlsConfig, TlsError> {
    let identity = Identity::from_pem(read("certificate", cert)?, read("private key", key)?);
    let mut cfg = ServerTlsConfig::new().identity(identity);
    if let Some(ca) = client_ca {
        cfg = cfg
            .client_ca_root(Certificate::from_pem(read("client CA", ca)?))
            .client_auth_optional(false);
    }
    Ok(cfg)
}

/// Client-side TLS for peer connections: verifies the peer against `ca` and presents this
/// member's certificate.
pub fn peer_client(cert: &Path, key: &Path, ca: &Path) -> Result<ClientTlsConfig, TlsError> {
    Ok(ClientTlsConfig::new()
        .ca_certificate(Certificate::from_pem(read("peer CA", ca)?))
        .identity(Identity::from_pem(
            read("certificate", cert)?,
            read("private key", key)?,
        )))
}
