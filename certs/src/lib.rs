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
            return Authority::from_pem(&cert_pem, &key_pem);
        }
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let ca = Authority::generate(name, Duration::from_secs(10 * 365 * 86_400))?;
        write_private(&key_path, ca.key.serialize_pem().as_bytes())?;
        std::fs::write(&cert_path, &ca.cert_pem).map_err(io(&cert_path))?;
        Ok(ca)
    }

    /// A CA this crate made, from its PEM certificate and key. Only the key and the subject
    /// name matter for signing; the name is read from the certificate (a CA of another making
    /// may have a subject this crate cannot rebuild: it is refused rather than misused).
    pub fn from_pem(cert_pem: &str, key_pem: &str) -> Result<Authority, CertError> {
        use rustls_pki_types::pem::PemObject;
        let key = KeyPair::from_pem(key_pem)?;
        let der = rustls_pki_types::CertificateDer::from_pem_slice(cert_pem.as_bytes())
            .map_err(|e| CertError::Invalid(format!("the CA certificate is not PEM: {e}")))?;
        let name = subject_common_name(&der).ok_or_else(|| {
            CertError::Invalid("the CA certificate has no readable common name".into())
        })?;
        let params = ca_params(&name, Duration::from_secs(86_400));
        // Signing with a rebuilt subject only works if it is byte for byte the CA's.
        let rebuilt = params.self_signed(&key)?;
        if subject_der(rebuilt.der()) != subject_der(&der) {
            return Err(CertError::Invalid(format!(
                "the CA certificate's subject is not one raftkv makes (CN={name:?}, O=raftkv)"
            )));
        }
        Ok(Authority {
            cert_pem: cert_pem.to_string(),
            key,
            params,
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

/// One DER TLV: (tag, content, the whole item, rest).
type Tlv<'a> = (u8, &'a [u8], &'a [u8], &'a [u8]);

/// Reads one DER TLV. Definite lengths of up to 4 bytes only.
fn der_item(b: &[u8]) -> Option<Tlv<'_>> {
    let (&tag, rest) = b.split_first()?;
    let (&first, rest) = rest.split_first()?;
    let (len, rest, header) = if first < 0x80 {
        (first as usize, rest, 2)
    } else {
        let n = (first & 0x7f) as usize;
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | *b as usize);
        (len, &rest[n..], 2 + n)
    };
    if rest.len() < len {
        return None;
    }
    Some((tag, &rest[..len], &b[..header + len], &rest[len..]))
}

/// The subject `Name` of a certificate, as DER. Never panics, whatever the bytes.
pub fn subject_der(cert: &[u8]) -> Option<&[u8]> {
    let (_, certificate, _, _) = der_item(cert)?;
    let (_, tbs, _, _) = der_item(certificate)?;
    let mut rest = tbs;
    // [0] version, when present.
    if rest.first() == Some(&0xa0) {
        rest = der_item(rest)?.3;
    }
    // serialNumber, signature, issuer, validity, then subject.
    for _ in 0..4 {
        rest = der_item(rest)?.3;
    }
    let (tag, _, whole, _) = der_item(rest)?;
    (tag == 0x30).then_some(whole)
}

/// The common name in a DER `Name`, if it has exactly one readable CN. Never panics.
pub fn common_name_of(name: &[u8]) -> Option<String> {
    const CN_OID: &[u8] = &[0x55, 0x04, 0x03];
    let (tag, mut rdns, _, _) = der_item(name)?;
    if tag != 0x30 {
        return None;
    }
    let mut found = None;
    while !rdns.is_empty() {
        let (tag, set, _, rest) = der_item(rdns)?;
        rdns = rest;
        if tag != 0x31 {
            return None;
        }
        let mut atvs = set;
        while !atvs.is_empty() {
            let (tag, atv, _, rest) = der_item(atvs)?;
            atvs = rest;
            if tag != 0x30 {
                return None;
            }
            let (oid_tag, oid, _, value) = der_item(atv)?;
            if oid_tag != 0x06 || oid != CN_OID {
                continue;
            }
            let (vtag, v, _, _) = der_item(value)?;
            // UTF8String, PrintableString, IA5String, TeletexString.
            if !matches!(vtag, 0x0c | 0x13 | 0x16 | 0x14) || found.is_some() {
                return None;
            }
            found = Some(String::from_utf8(v.to_vec()).ok()?);
        }
    }
    found
}

/// The subject common name of a DER certificate.
pub fn subject_common_name(cert: &[u8]) -> Option<String> {
    common_name_of(subject_der(cert)?)
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
        // A CA with its own name reloads with it (its certificates chain to it).
        let other = tempfile::tempdir().unwrap();
        let named = Authority::load_or_create(other.path(), "e2e store CA").unwrap();
        let again = Authority::load_or_create(other.path(), "ignored: the file decides").unwrap();
        assert_eq!(named.cert_pem, again.cert_pem);
        let der = |pem: &str| {
            use rustls_pki_types::pem::PemObject;
            rustls_pki_types::CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
        };
        let member = again
            .member("m", &["localhost".into()], Duration::from_secs(60))
            .unwrap();
        assert_eq!(
            subject_common_name(&der(&named.cert_pem)).as_deref(),
            Some("e2e store CA")
        );
        let issued = der(&member.cert_pem);
        assert_eq!(subject_common_name(&issued).as_deref(), Some("m"));
        for i in 0..5000u32 {
            let b: Vec<u8> = (0..(i % 200)).map(|j| (j * 7 + i) as u8).collect();
            let _ = subject_common_name(&b);
        }
        assert!(
            b.member("n", &["bäd".into()], Duration::from_secs(60))
                .is_err()
        );
    }
}
