//! TLS for the client and peer ports (rustls through tonic), and who a certificate says its
//! holder is.
//!
//! The peer port always requires mutual TLS, and a verified chain is not enough: the presented
//! certificate must be a *member* certificate (usable as both TLS server and client, so a
//! client certificate from the same CA never opens the peer port) and must name a member of
//! this cluster (a host of one of its peer URLs, or a configured allowed host name). On the
//! client port a verified client certificate's common name can identify the user.

use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName, TrustAnchor, UnixTime};
use sha2::Digest;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
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

/// Trust anchors from a PEM bundle of CA certificates.
pub fn anchors_from_pem(pem: &[u8]) -> Result<Vec<TrustAnchor<'static>>, String> {
    let mut out = Vec::new();
    for der in CertificateDer::pem_slice_iter(pem) {
        let der = der.map_err(|e| format!("not a PEM certificate: {e}"))?;
        let anchor = webpki::anchor_from_trusted_cert(&der)
            .map_err(|e| format!("not a usable CA certificate: {e}"))?;
        out.push(anchor.to_owned());
    }
    if out.is_empty() {
        return Err("no CA certificate found".into());
    }
    Ok(out)
}

/// The first certificate of a PEM file.
pub fn first_der(pem: &[u8]) -> Option<CertificateDer<'static>> {
    CertificateDer::pem_slice_iter(pem).next()?.ok()
}

static ALGORITHMS: &[&dyn rustls_pki_types::SignatureVerificationAlgorithm] = &[
    webpki::ring::ECDSA_P256_SHA256,
    webpki::ring::ECDSA_P256_SHA384,
    webpki::ring::ECDSA_P384_SHA256,
    webpki::ring::ECDSA_P384_SHA384,
    webpki::ring::ED25519,
    webpki::ring::RSA_PKCS1_2048_8192_SHA256,
    webpki::ring::RSA_PKCS1_2048_8192_SHA384,
    webpki::ring::RSA_PKCS1_2048_8192_SHA512,
    webpki::ring::RSA_PSS_2048_8192_SHA256_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA384_LEGACY_KEY,
    webpki::ring::RSA_PSS_2048_8192_SHA512_LEGACY_KEY,
];

/// id-kp-serverAuth (1.3.6.1.5.5.7.3.1) and id-kp-clientAuth (1.3.6.1.5.5.7.3.2), DER content.
const EKU_SERVER_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x01];
const EKU_CLIENT_AUTH: &[u8] = &[0x2b, 0x06, 0x01, 0x05, 0x05, 0x07, 0x03, 0x02];

/// Checks that `leaf` chains to `anchors` and explicitly allows both TLS server and TLS client
/// use: what a member certificate must do, and what a client certificate cannot.
pub fn verify_peer_usage(
    anchors: &[TrustAnchor<'_>],
    leaf: &CertificateDer<'_>,
    intermediates: &[CertificateDer<'_>],
) -> Result<(), String> {
    let cert = webpki::EndEntityCert::try_from(leaf)
        .map_err(|e| format!("unparseable certificate: {e}"))?;
    let now = UnixTime::now();
    for (usage, what) in [
        (webpki::KeyUsage::required(EKU_SERVER_AUTH), "serverAuth"),
        (webpki::KeyUsage::required(EKU_CLIENT_AUTH), "clientAuth"),
    ] {
        cert.verify_for_usage(ALGORITHMS, anchors, intermediates, now, usage, None, None)
            .map_err(|e| {
                format!("not a member certificate (it must be a valid {what} certificate): {e}")
            })?;
    }
    Ok(())
}

/// Whether `leaf` is valid for `host` (a DNS name or an IP address).
fn valid_for_host(leaf: &CertificateDer<'_>, host: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return false;
    };
    let Ok(name) = ServerName::try_from(host.to_string()) else {
        return false;
    };
    cert.verify_is_valid_for_subject_name(&name).is_ok()
}

/// Whether some DNS name of `leaf` matches `pattern` (exact, or `*.suffix` for any single label).
fn matches_pattern(leaf: &CertificateDer<'_>, pattern: &str) -> bool {
    let Ok(cert) = webpki::EndEntityCert::try_from(leaf) else {
        return false;
    };
    let pattern = pattern.to_ascii_lowercase();
    cert.valid_dns_names().any(|n| {
        let n = n.to_ascii_lowercase();
        match pattern.strip_prefix("*.") {
            Some(suffix) => n
                .strip_suffix(suffix)
                .and_then(|head| head.strip_suffix('.'))
                .is_some_and(|label| !label.is_empty() && !label.contains('.')),
            None => n == pattern,
        }
    })
}

/// The host part of a URL (`https://host:port/...`), without brackets around IPv6 addresses.
pub fn url_host(url: &str) -> Option<String> {
    let rest = url.split_once("://").map(|(_, r)| r).unwrap_or(url);
    let authority = rest.split('/').next()?;
    let authority = authority
        .rsplit_once('@')
        .map(|(_, a)| a)
        .unwrap_or(authority);
    if let Some(v6) = authority.strip_prefix('[') {
        return v6.split_once(']').map(|(h, _)| h.to_string());
    }
    let host = match authority.rsplit_once(':') {
        Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    };
    (!host.is_empty()).then(|| host.to_string())
}

/// The subject common name of a certificate, if it has exactly one readable CN.
pub fn common_name(der: &CertificateDer<'_>) -> Option<String> {
    raftkv_certs::subject_common_name(der)
}

/// What the peer port requires of the certificate a connecting member presents.
pub struct PeerIdentity {
    anchors: Vec<TrustAnchor<'static>>,
    /// Extra DNS names (or `*.suffix` patterns) accepted besides the members' hosts.
    allowed_hostnames: Vec<String>,
    /// Verdicts per (certificate, member hosts), re-checked after a minute so expiry counts.
    cache: Mutex<HashMap<[u8; 32], Instant>>,
}

impl std::fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PeerIdentity")
            .field("anchors", &self.anchors.len())
            .field("allowed_hostnames", &self.allowed_hostnames)
            .finish()
    }
}

const IDENTITY_CACHE_LIMIT: usize = 1024;
const IDENTITY_CACHE_TTL: Duration = Duration::from_secs(60);

impl PeerIdentity {
    pub fn load(ca: &Path, allowed_hostnames: Vec<String>) -> Result<PeerIdentity, TlsError> {
        let pem = read("peer CA", ca)?;
        let anchors = anchors_from_pem(&pem).map_err(|e| TlsError {
            what: "peer CA",
            path: ca.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        Ok(PeerIdentity {
            anchors,
            allowed_hostnames,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Accepts `chain` (leaf first, as presented) if it is a member certificate naming one of
    /// `member_hosts` or an allowed host name.
    pub fn check(
        &self,
        chain: &[CertificateDer<'_>],
        member_hosts: &[String],
    ) -> Result<(), String> {
        let Some((leaf, intermediates)) = chain.split_first() else {
            return Err("the peer presented no certificate".into());
        };
        let mut h = sha2::Sha256::new();
        h.update(leaf.as_ref());
        for host in member_hosts {
            h.update([0]);
            h.update(host.as_bytes());
        }
        let fingerprint: [u8; 32] = h.finalize().into();
        if let Ok(cache) = self.cache.lock()
            && let Some(at) = cache.get(&fingerprint)
            && at.elapsed() < IDENTITY_CACHE_TTL
        {
            return Ok(());
        }
        verify_peer_usage(&self.anchors, leaf, intermediates)?;
        let named = member_hosts.iter().any(|h| valid_for_host(leaf, h))
            || self
                .allowed_hostnames
                .iter()
                .any(|p| matches_pattern(leaf, p));
        if !named {
            return Err(format!(
                "the peer certificate names no member of this cluster (members: {}); \
                 add its host with --peer-cert-allowed-hostname if it is one",
                member_hosts.join(", ")
            ));
        }
        if let Ok(mut cache) = self.cache.lock() {
            if cache.len() >= IDENTITY_CACHE_LIMIT {
                cache.clear();
            }
            cache.insert(fingerprint, Instant::now());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::certs::Authority;

    #[test]
    fn peer_identity_requires_a_member_certificate_naming_a_member() {
        let dir = tempfile::tempdir().unwrap();
        let ca = Authority::load_or_create(dir.path(), "ca").unwrap();
        let other = Authority::generate("other", Duration::from_secs(60)).unwrap();
        let id = PeerIdentity::load(
            &dir.path().join(crate::certs::CA_CERT),
            vec!["*.kv-peer.ns.svc".into()],
        )
        .unwrap();
        let der = |pem: &str| first_der(pem.as_bytes()).unwrap();
        let life = Duration::from_secs(600);
        let member = der(&ca
            .member("m", &["127.0.0.1".into()], life)
            .unwrap()
            .cert_pem);
        let hosts = vec!["127.0.0.1".to_string()];
        assert!(id.check(std::slice::from_ref(&member), &hosts).is_ok());
        // Cached verdicts still depend on the host list.
        assert!(
            id.check(std::slice::from_ref(&member), &["10.0.0.9".to_string()])
                .is_err()
        );
        let client = der(&ca.client("mallory", life).unwrap().cert_pem);
        let e = id.check(&[client], &hosts).unwrap_err();
        assert!(e.contains("serverAuth"), "{e}");
        let stranger = der(&ca.member("x", &["10.9.9.9".into()], life).unwrap().cert_pem);
        assert!(id.check(&[stranger], &hosts).is_err());
        let foreign = der(&other
            .member("f", &["127.0.0.1".into()], life)
            .unwrap()
            .cert_pem);
        assert!(id.check(&[foreign], &hosts).is_err());
        let pod = der(&ca
            .member("kv-3", &["kv-3.kv-peer.ns.svc".into()], life)
            .unwrap()
            .cert_pem);
        assert!(id.check(&[pod], &hosts).is_ok());
        let deep = der(&ca
            .member("x", &["a.b.kv-peer.ns.svc".into()], life)
            .unwrap()
            .cert_pem);
        assert!(id.check(&[deep], &hosts).is_err());
        assert!(id.check(&[], &hosts).is_err());
    }

    #[test]
    fn issued_certificates_carry_their_usages_and_names() {
        let ca = Authority::generate("test CA", Duration::from_secs(3600)).unwrap();
        let anchors = anchors_from_pem(ca.cert_pem.as_bytes()).unwrap();
        let member = ca
            .member("node-1", &["127.0.0.1".into()], Duration::from_secs(3600))
            .unwrap();
        let m = first_der(member.cert_pem.as_bytes()).unwrap();
        assert!(verify_peer_usage(&anchors, &m, &[]).is_ok());
        let client = ca.client("alice", Duration::from_secs(3600)).unwrap();
        let c = first_der(client.cert_pem.as_bytes()).unwrap();
        assert!(
            verify_peer_usage(&anchors, &c, &[]).is_err(),
            "a client certificate must not pass as a member"
        );
        assert_eq!(common_name(&c).as_deref(), Some("alice"));
    }

    #[test]
    fn url_hosts_and_common_names() {
        assert_eq!(
            url_host("https://127.0.0.1:2380").as_deref(),
            Some("127.0.0.1")
        );
        assert_eq!(url_host("http://[::1]:2380").as_deref(), Some("::1"));
        assert_eq!(
            url_host("kv-0.kv-peer.ns.svc:2380").as_deref(),
            Some("kv-0.kv-peer.ns.svc")
        );
        assert_eq!(url_host("https://h/x").as_deref(), Some("h"));
        assert_eq!(url_host("https://:1"), None);
        for i in 0..2000u32 {
            let b: Vec<u8> = (0..(i % 80)).map(|_| rand::random()).collect();
            let _ = common_name(&CertificateDer::from(b));
        }
    }
}

/// Member hosts as the consensus layer knows them now; set once it has started.
pub type HostsFn = Arc<dyn Fn() -> Vec<String> + Send + Sync>;

/// The peer port's client-certificate check, run inside the TLS handshake: a connection whose
/// certificate is not a member certificate naming a member never completes the handshake, so
/// it cannot send a single request (or a single large message) to the peer port.
pub struct PeerCertVerifier {
    inner: Arc<dyn rustls::server::danger::ClientCertVerifier>,
    identity: Arc<PeerIdentity>,
    hosts: Arc<std::sync::RwLock<Option<HostsFn>>>,
    refused: prometheus::IntCounter,
}

impl std::fmt::Debug for PeerCertVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PeerCertVerifier")
    }
}

impl rustls::server::danger::ClientCertVerifier for PeerCertVerifier {
    fn root_hint_subjects(&self) -> &[rustls::DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<rustls::server::danger::ClientCertVerified, rustls::Error> {
        let verified = self
            .inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| {
                self.refused.inc();
                tracing::warn!(error = %e, "refused a peer connection: certificate not trusted");
            })?;
        let hosts = self
            .hosts
            .read()
            .ok()
            .and_then(|h| h.as_ref().map(|f| f()))
            .unwrap_or_default();
        let mut chain = vec![end_entity.clone()];
        chain.extend(intermediates.iter().cloned());
        match self.identity.check(&chain, &hosts) {
            Ok(()) => Ok(verified),
            Err(reason) => {
                self.refused.inc();
                tracing::warn!(%reason, "refused a peer connection");
                Err(rustls::Error::General(reason))
            }
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The peer port's TLS configuration as it is now; replaced when certificate files change.
pub type SharedServerConfig = Arc<std::sync::RwLock<Arc<rustls::ServerConfig>>>;

/// The peer port's TLS: this member's certificate, and the member check on every client.
pub struct PeerServerTls {
    pub config: Arc<rustls::ServerConfig>,
    hosts: Arc<std::sync::RwLock<Option<HostsFn>>>,
}

/// The files a member's peer TLS is made from, and what they held when last read.
pub struct PeerTlsFiles {
    pub cert: std::path::PathBuf,
    pub key: std::path::PathBuf,
    pub ca: std::path::PathBuf,
    pub allowed_hostnames: Vec<String>,
    seen: Mutex<Option<[u8; 32]>>,
}

impl PeerTlsFiles {
    pub fn new(cert: &Path, key: &Path, ca: &Path, allowed_hostnames: Vec<String>) -> PeerTlsFiles {
        let files = PeerTlsFiles {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            ca: ca.to_path_buf(),
            allowed_hostnames,
            seen: Mutex::new(None),
        };
        let now = files.digest();
        if let Ok(mut s) = files.seen.lock() {
            *s = now;
        }
        files
    }

    fn digest(&self) -> Option<[u8; 32]> {
        let mut h = sha2::Sha256::new();
        for p in [&self.cert, &self.key, &self.ca] {
            h.update(std::fs::read(p).ok()?);
            h.update([0]);
        }
        Some(h.finalize().into())
    }

    /// The files' fingerprint if they changed since last accepted (a rotated Secret).
    pub fn changed(&self) -> Option<[u8; 32]> {
        let now = self.digest()?;
        let seen = self.seen.lock().ok()?;
        (*seen != Some(now)).then_some(now)
    }

    /// Records that the files as of `digest` are in use.
    pub fn accept(&self, digest: [u8; 32]) {
        if let Ok(mut seen) = self.seen.lock() {
            *seen = Some(digest);
        }
    }
}

impl PeerServerTls {
    pub fn load(
        cert: &Path,
        key: &Path,
        ca: &Path,
        identity: Arc<PeerIdentity>,
        refused: prometheus::IntCounter,
    ) -> Result<PeerServerTls, TlsError> {
        let bad = |what: &'static str, path: &Path, e: String| TlsError {
            what,
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        };
        let certs: Vec<CertificateDer<'static>> =
            CertificateDer::pem_slice_iter(&read("certificate", cert)?)
                .collect::<Result<_, _>>()
                .map_err(|e| bad("certificate", cert, e.to_string()))?;
        let key_der = rustls_pki_types::PrivateKeyDer::from_pem_slice(&read("private key", key)?)
            .map_err(|e| bad("private key", key, e.to_string()))?;
        let mut roots = rustls::RootCertStore::empty();
        for der in CertificateDer::pem_slice_iter(&read("peer CA", ca)?) {
            let der = der.map_err(|e| bad("peer CA", ca, e.to_string()))?;
            roots
                .add(der)
                .map_err(|e| bad("peer CA", ca, e.to_string()))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let inner = rustls::server::WebPkiClientVerifier::builder_with_provider(
            Arc::new(roots),
            provider.clone(),
        )
        .build()
        .map_err(|e| bad("peer CA", ca, e.to_string()))?;
        let hosts: Arc<std::sync::RwLock<Option<HostsFn>>> = Arc::default();
        let verifier = Arc::new(PeerCertVerifier {
            inner,
            identity,
            hosts: hosts.clone(),
            refused,
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| bad("certificate", cert, e.to_string()))?
            .with_client_cert_verifier(verifier)
            .with_single_cert(certs, key_der)
            .map_err(|e| bad("certificate", cert, e.to_string()))?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        Ok(PeerServerTls {
            config: Arc::new(config),
            hosts,
        })
    }

    /// Tells the verifier where the current member hosts come from.
    pub fn set_hosts(&self, f: HostsFn) {
        if let Ok(mut h) = self.hosts.write() {
            *h = Some(f);
        }
    }
}

/// What the peer service learns about a connection: whether its member certificate was
/// verified in the handshake.
#[derive(Debug, Clone, Copy)]
pub struct PeerConnInfo {
    pub remote: Option<std::net::SocketAddr>,
    pub verified: bool,
}

/// A peer-port connection: plain TCP (only with `--insecure-peer-plaintext`) or TLS whose
/// member certificate was verified.
pub enum PeerConn {
    Plain(tokio::net::TcpStream, Option<std::net::SocketAddr>),
    Tls(
        Box<tokio_rustls::server::TlsStream<tokio::net::TcpStream>>,
        Option<std::net::SocketAddr>,
    ),
}

impl tonic::transport::server::Connected for PeerConn {
    type ConnectInfo = PeerConnInfo;
    fn connect_info(&self) -> PeerConnInfo {
        match self {
            PeerConn::Plain(_, remote) => PeerConnInfo {
                remote: *remote,
                verified: false,
            },
            PeerConn::Tls(_, remote) => PeerConnInfo {
                remote: *remote,
                verified: true,
            },
        }
    }
}

impl tokio::io::AsyncRead for PeerConn {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerConn::Plain(s, _) => std::pin::Pin::new(s).poll_read(cx, buf),
            PeerConn::Tls(s, _) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl tokio::io::AsyncWrite for PeerConn {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            PeerConn::Plain(s, _) => std::pin::Pin::new(s).poll_write(cx, buf),
            PeerConn::Tls(s, _) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerConn::Plain(s, _) => std::pin::Pin::new(s).poll_flush(cx),
            PeerConn::Tls(s, _) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            PeerConn::Plain(s, _) => std::pin::Pin::new(s).poll_shutdown(cx),
            PeerConn::Tls(s, _) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// How long a peer has to complete the TLS handshake (members finish in milliseconds).
const PEER_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// Handshakes in progress at once; more connections wait to be accepted.
const PEER_HANDSHAKES: usize = 256;
/// Handshakes in progress at once from one address; more from it are closed at once, so one
/// host that opens sockets and stalls cannot hold every slot and keep the members out.
const PEER_HANDSHAKES_PER_ADDRESS: usize = 8;

/// Handshakes in progress per remote address.
#[derive(Default)]
struct HandshakesByAddress(Mutex<HashMap<std::net::IpAddr, usize>>);

/// One handshake counted against its address until dropped.
struct AddressSlot {
    by: Arc<HandshakesByAddress>,
    ip: std::net::IpAddr,
}

impl HandshakesByAddress {
    fn take(self: &Arc<Self>, ip: std::net::IpAddr) -> Option<AddressSlot> {
        let mut m = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let n = m.entry(ip).or_insert(0);
        if *n >= PEER_HANDSHAKES_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(AddressSlot {
            by: self.clone(),
            ip,
        })
    }
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut m = self.by.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = m.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                m.remove(&self.ip);
            }
        }
    }
}

/// Accepts peer connections: each TLS handshake runs on its own task under a timeout (a
/// stalled or hostile client cannot hold up the others), and only connections whose member
/// certificate was verified come out.
pub fn peer_incoming(
    listener: tokio::net::TcpListener,
    tls: Option<SharedServerConfig>,
) -> impl futures::Stream<Item = std::io::Result<PeerConn>> + Send + 'static {
    let (tx, rx) = tokio::sync::mpsc::channel::<std::io::Result<PeerConn>>(16);
    let slots = Arc::new(tokio::sync::Semaphore::new(PEER_HANDSHAKES));
    let by_address = Arc::new(HandshakesByAddress::default());
    tokio::spawn(async move {
        loop {
            if tx.is_closed() {
                return;
            }
            let Ok(permit) = slots.clone().acquire_owned().await else {
                return;
            };
            let (tcp, remote) = match listener.accept().await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(error = %e, "accepting a peer connection");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            let tx = tx.clone();
            // The configuration as of this connection: a rotated certificate applies to the
            // connections accepted after it.
            let acceptor = tls.as_ref().map(|t| {
                let config = t.read().unwrap_or_else(|p| p.into_inner()).clone();
                tokio_rustls::TlsAcceptor::from(config)
            });
            match acceptor {
                None => {
                    drop(permit);
                    if tx
                        .send(Ok(PeerConn::Plain(tcp, Some(remote))))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                Some(acceptor) => {
                    let Some(address_slot) = by_address.take(remote.ip()) else {
                        tracing::debug!(%remote, "too many peer handshakes from one address; closing");
                        continue;
                    };
                    tokio::spawn(async move {
                        let _permit = permit;
                        let _address_slot = address_slot;
                        match tokio::time::timeout(PEER_HANDSHAKE_TIMEOUT, acceptor.accept(tcp))
                            .await
                        {
                            Ok(Ok(tls)) => {
                                let _ = tx
                                    .send(Ok(PeerConn::Tls(Box::new(tls), Some(remote))))
                                    .await;
                            }
                            Ok(Err(e)) => {
                                tracing::debug!(%remote, error = %e, "peer TLS handshake failed")
                            }
                            Err(_) => tracing::debug!(%remote, "peer TLS handshake timed out"),
                        }
                    });
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}
