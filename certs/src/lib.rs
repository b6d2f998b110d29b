//! Certificate issuance for clusters that have no PKI of their own: a cluster CA, member
//! certificates for the peer port (usable as server and client, naming the member's hosts), and
//! client certificates (client use only, the user name as CN). `raftkv dev`, `raftkv certs`, the
//! operator and the test harness use this; production clusters may bring certificates from
//! anywhere (cert-manager, their own CA).

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("generating a certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> CertError + '_ {
    move |source| CertError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// A CA certificate with its key, able to sign member and client certificates.
pub struct Authority {
    pub cert_pem: String,
    key: KeyPair,
    params: CertificateParams,
}

/// A certificate and its private key, both PEM.
#[derive(Debug, Clone)]
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
}

/// File names under a certificate directory.
pub const CA_CERT: &str = "ca.crt";
pub const CA_KEY: &str = "ca.key";

fn validity(params: &mut CertificateParams, lifetime: Duration) {
    let now = time::OffsetDateTime::now_utc();
    // A little backdating absorbs clock skew between the issuer and the members.
    params.not_before = now - time::Duration::minutes(5);
    params.not_after = now + time::Duration::seconds(lifetime.as_secs() as i64);
}

fn ca_params(name: &str, lifetime: Duration) -> CertificateParams {
    let mut p = CertificateParams::default();
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, name);
    dn.push(DnType::OrganizationName, "raftkv");
    p.distinguished_name = dn;
    p.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    validity(&mut p, lifetime);
    p
}

impl Authority {
    /// A new self-signed CA named `name`.
    pub fn generate(name: &str, lifetime: Duration) -> Result<Authority, CertError> {
        let key = KeyPair::generate()?;
        let params = ca_params(name, lifetime);
        let cert = params.self_signed(&key)?;
        Ok(Authority {
            cert_pem: cert.pem(),
            key,
            params,
        })
    }

    /// The CA in `dir` (`ca.crt`, `ca.key`), created if absent. The key file is 0600.
    pub fn load_or_create(dir: &Path, name: &str) -> Result<Authority, CertError> {
        let cert_path = dir.join(CA_CERT);
        let key_path = dir.join(CA_KEY);
        if cert_path.exists() && key_path.exists() {
            let cert_pem = std::fs::read_to_string(&cert_path).map_err(io(&cert_path))?;
            let key_pem = std::fs::read_to_string(&key_path).map_err(io(&key_path))?;
            return Authority::from_pem(name, &cert_pem, &key_pem);
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let ca = Authority::generate(name, Duration::from_secs(10 * 365 * 86_400))?;
        write_private(&key_path, ca.key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, &ca.cert_pem).map_err(io(&cert_path))?;
        Ok(ca)
    }

    /// A CA from its PEM certificate and key. Only the key and the subject name matter for
    /// signing, so the parameters are rebuilt with the same name rather than parsed.
    pub fn from_pem(name: &str, cert_pem: &str, key_pem: &str) -> Result<Authority, CertError> {
        let key = KeyPair::from_pem(key_pem)?;
        Ok(Authority {
            cert_pem: cert_pem.to_string(),
            key,
            params: ca_params(name, Duration::from_secs(86_400)),
        })
    }

    pub fn key_pem(&self) -> String {
        self.key.serialize_pem()
    }

    fn sign(&self, params: &CertificateParams) -> Result<Issued, CertError> {
        let key = KeyPair::generate()?;
        let issuer = Issuer::from_params(&self.params, &self.key);
        let cert = params.signed_by(&key, &issuer)?;
        Ok(Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        })
    }

    /// A member certificate for the peer port (and the client port): valid as a TLS server for
    /// every host in `hosts` (DNS names or IP addresses), and as a client, because members dial
    /// each other.
    pub fn member(
        &self,
        name: &str,
        hosts: &[String],
        lifetime: Duration,
    ) -> Result<Issued, CertError> {
        if hosts.is_empty() {
            return Err(CertError::Invalid(format!(
                "member certificate {name}: at least one host name or address is needed"
            )));
        }
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, name);
        dn.push(DnType::OrganizationName, "raftkv");
        p.distinguished_name = dn;
        p.subject_alt_names = hosts.iter().map(|h| san(h)).collect::<Result<_, _>>()?;
        p.key_usages = vec![
            KeyUsagePurpose::DigitalSignature,
            KeyUsagePurpose::KeyEncipherment,
        ];
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, lifetime);
        self.sign(&p)
    }

    /// A client certificate: client use only, `user` as CN (the user name under client
    /// certificate authentication).
    pub fn client(&self, user: &str, lifetime: Duration) -> Result<Issued, CertError> {
        let mut p = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, user);
        p.distinguished_name = dn;
        p.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        p.use_authority_key_identifier_extension = true;
        validity(&mut p, lifetime);
        self.sign(&p)
    }
}

fn san(host: &str) -> Result<SanType, CertError> {
    match host.parse::<std::net::IpAddr>() {
        Ok(ip) => Ok(SanType::IpAddress(ip)),
        Err(_) => Ok(SanType::DnsName(host.to_string().try_into().map_err(
            |e: rcgen::Error| CertError::Invalid(format!("{host:?} is not a valid host name: {e}")),
        )?)),
    }
}

/// Writes a private key (or any secret) readable by its owner only.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), CertError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).map_err(io(path))?;
    f.write_all(bytes).map_err(io(path))
}

/// Paths of an issued certificate written to disk.
#[derive(Debug, Clone)]
pub struct IssuedFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl Issued {
    /// Writes `<stem>.crt` and `<stem>.key` (0600) under `dir`.
    pub fn write(&self, dir: &Path, stem: &str) -> Result<IssuedFiles, CertError> {
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let cert = dir.join(format!("{stem}.crt"));
        let key = dir.join(format!("{stem}.key"));
        std::fs::write(&cert, &self.cert_pem).map_err(io(&cert))?;
        write_private(&key, self.key_pem.as_bytes())?;
        Ok(IssuedFiles { cert, key })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_ca_survives_a_reload_from_its_files_and_signs_certificates() {
        let dir = tempfile::tempdir().unwrap();
        let a = Authority::load_or_create(dir.path(), "dev CA").unwrap();
        let b = Authority::load_or_create(dir.path(), "dev CA").unwrap();
        assert_eq!(a.cert_pem, b.cert_pem);
        assert_eq!(a.key_pem(), b.key_pem());
        let m = b
            .member(
                "n",
                &["localhost".into(), "10.0.0.1".into()],
                Duration::from_secs(60),
            )
            .unwrap();
        assert!(m.cert_pem.starts_with("-----BEGIN CERTIFICATE-----"));
        let files = m.write(dir.path(), "n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(files.key).unwrap().permissions().mode() & 0o777;
            assert_eq!(mode, 0o600);
        }
        assert!(b.member("n", &[], Duration::from_secs(60)).is_err());
        assert!(
            b.member("n", &["bäd".into()], Duration::from_secs(60))
                .is_err()
        );
    }
}
