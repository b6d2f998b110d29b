//! A small S3 client for backups: AWS Signature Version 4, single and multipart uploads,
//! deletes and presigned downloads, over HTTP or HTTPS (system roots plus an optional CA).
//! Just what backups need (the operator's schedule, `kvctl backup save s3://…`), so neither
//! carries a cloud SDK; any server that speaks the S3 API (AWS, MinIO, Ceph RGW, ...) works.
//! `upload_backup` streams a backup into an object, checking it on the way.

use crate::backup::{BackupInfo, BackupStream, Verifier};
use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper_util::client::legacy::Client as HttpClient;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use jiff::Timestamp;
use sha2::{Digest, Sha256};
use std::fmt::Write as _;
use std::time::Duration;

/// S3 needs every part but the last to be at least 5 MiB; larger parts mean fewer requests.
pub const PART_SIZE: usize = 16 << 20;
/// S3 allows at most this many parts in one upload.
pub const MAX_PARTS: usize = 10_000;
const REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
/// Error bodies from the server are read up to this size, no further.
const MAX_RESPONSE: usize = 1 << 20;
const EMPTY_SHA256: &str = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("S3 endpoint {0:?}: {1}")]
    Endpoint(String, String),
    #[error("S3 {op} {key}: {status} {code}: {message}")]
    Refused {
        op: &'static str,
        key: String,
        status: u16,
        code: String,
        message: String,
    },
    #[error("S3 {op} {key}: {reason}")]
    Transport {
        op: &'static str,
        key: String,
        reason: String,
    },
    #[error("S3 TLS setup: {0}")]
    Tls(String),
}

/// Where objects go and how to sign for them.
#[derive(Clone)]
pub struct Bucket {
    scheme: String,
    /// host[:port] of the endpoint.
    authority: String,
    /// Path prefix of the endpoint itself (usually empty).
    base_path: String,
    pub bucket: String,
    pub region: String,
    path_style: bool,
    access_key: String,
    secret_key: String,
    http: HttpClient<hyper_rustls::HttpsConnector<HttpConnector>, Full<Bytes>>,
}

impl std::fmt::Debug for Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Bucket")
            .field("endpoint", &format!("{}://{}", self.scheme, self.authority))
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

/// The parts of a signed request that the signature covers.
struct Signed {
    authorization: String,
    amz_date: String,
}

impl Bucket {
    /// `endpoint` is `http(s)://host[:port][/path]`; `ca_pem` adds a CA to the system roots.
    pub fn new(
        endpoint: &str,
        bucket: &str,
        region: &str,
        path_style: bool,
        access_key: &str,
        secret_key: &str,
        ca_pem: Option<&[u8]>,
    ) -> Result<Bucket, S3Error> {
        let bad = |why: &str| S3Error::Endpoint(endpoint.to_string(), why.to_string());
        let uri: http::Uri = endpoint.parse().map_err(|_| bad("not a URL"))?;
        let scheme = uri.scheme_str().ok_or_else(|| bad("no scheme"))?;
        if scheme != "http" && scheme != "https" {
            return Err(bad("the scheme must be http or https"));
        }
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        // A client sends no port in Host for the scheme's default one, so the signature must
        // not cover it either.
        let authority = match (scheme, authority.port_u16()) {
            ("https", Some(443)) | ("http", Some(80)) => authority.host().to_string(),
            _ => authority.as_str().to_string(),
        };
        if authority.contains('@') {
            return Err(bad(
                "credentials belong in the Secret, not in the endpoint URL",
            ));
        }
        // S3's own rule; anything else could steer a virtual-host-style request elsewhere.
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'.' || c == b'-');
        if !bucket_ok {
            return Err(bad(
                "the bucket must be an S3 bucket name: 3-63 lowercase letters, digits, '.' or '-'",
            ));
        }
        let base_path = uri.path().trim_end_matches('/').to_string();
        let mut roots = rustls::RootCertStore::empty();
        let native = rustls_native_certs::load_native_certs();
        for cert in native.certs {
            let _ = roots.add(cert);
        }
        if let Some(pem) = ca_pem {
            let mut added = 0;
            for cert in rustls_pemfile_certs(pem)? {
                roots
                    .add(cert)
                    .map_err(|e| S3Error::Tls(format!("the CA certificate: {e}")))?;
                added += 1;
            }
            if added == 0 {
                return Err(S3Error::Tls("the CA bundle holds no certificate".into()));
            }
        }
        let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| S3Error::Tls(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .build();
        Ok(Bucket {
            scheme: scheme.to_string(),
            authority,
            base_path,
            bucket: bucket.to_string(),
            region: if region.is_empty() {
                "us-east-1".into()
            } else {
                region.to_string()
            },
            path_style,
            access_key: access_key.to_string(),
            secret_key: secret_key.to_string(),
            http: HttpClient::builder(TokioExecutor::new()).build(connector),
        })
    }

    /// `s3://bucket/key`, for status and logs.
    pub fn location(&self, key: &str) -> String {
        format!("s3://{}/{}", self.bucket, key)
    }

    /// Host and canonical (encoded) path of an object.
    fn address(&self, key: &str) -> (String, String) {
        let key = uri_encode(key, false);
        if self.path_style {
            (
                self.authority.clone(),
                format!(
                    "{}/{}/{}",
                    self.base_path,
                    uri_encode(&self.bucket, true),
                    key
                ),
            )
        } else {
            (
                format!("{}.{}", self.bucket, self.authority),
                format!("{}/{}", self.base_path, key),
            )
        }
    }

    fn sign(
        &self,
        method: &str,
        host: &str,
        path: &str,
        query: &[(String, String)],
        payload_sha256: &str,
        now: Timestamp,
    ) -> Signed {
        let amz_date = now.strftime("%Y%m%dT%H%M%SZ").to_string();
        let date = &amz_date[..8];
        let headers = [
            ("host", host.to_string()),
            ("x-amz-content-sha256", payload_sha256.to_string()),
            ("x-amz-date", amz_date.clone()),
        ];
        let signed_headers = "host;x-amz-content-sha256;x-amz-date";
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let canonical = canonical_request(
            method,
            path,
            query,
            &headers,
            signed_headers,
            payload_sha256,
        );
        let signature = self.signature(date, &scope, &amz_date, &canonical);
        Signed {
            authorization: format!(
                "AWS4-HMAC-SHA256 Credential={}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
                self.access_key
            ),
            amz_date,
        }
    }

    fn signature(&self, date: &str, scope: &str, amz_date: &str, canonical: &str) -> String {
        let to_sign = format!(
            "AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n{}",
            hex::encode(Sha256::digest(canonical.as_bytes()))
        );
        let k_date = hmac(
            format!("AWS4{}", self.secret_key).as_bytes(),
            date.as_bytes(),
        );
        let k_region = hmac(&k_date, self.region.as_bytes());
        let k_service = hmac(&k_region, b"s3");
        let k_signing = hmac(&k_service, b"aws4_request");
        hex::encode(hmac(&k_signing, to_sign.as_bytes()))
    }

    /// A URL anyone holding it can download the object with, for `expires`.
    pub fn presign_get(&self, key: &str, expires: Duration) -> String {
        self.presign_get_at(key, expires, Timestamp::now())
    }

    fn presign_get_at(&self, key: &str, expires: Duration, now: Timestamp) -> String {
        let (host, path) = self.address(key);
        let amz_date = now.strftime("%Y%m%dT%H%M%SZ").to_string();
        let date = &amz_date[..8];
        let scope = format!("{date}/{}/s3/aws4_request", self.region);
        let mut query = vec![
            (
                "X-Amz-Algorithm".to_string(),
                "AWS4-HMAC-SHA256".to_string(),
            ),
            (
                "X-Amz-Credential".to_string(),
                format!("{}/{scope}", self.access_key),
            ),
            ("X-Amz-Date".to_string(), amz_date.clone()),
            (
                "X-Amz-Expires".to_string(),
                expires.as_secs().clamp(1, 604_800).to_string(),
            ),
            ("X-Amz-SignedHeaders".to_string(), "host".to_string()),
        ];
        let canonical = canonical_request(
            "GET",
            &path,
            &query,
            &[("host", host.clone())],
            "host",
            "UNSIGNED-PAYLOAD",
        );
        let signature = self.signature(date, &scope, &amz_date, &canonical);
        query.push(("X-Amz-Signature".to_string(), signature));
        format!("{}://{host}{path}?{}", self.scheme, canonical_query(&query))
    }

    async fn send(
        &self,
        op: &'static str,
        method: Method,
        key: &str,
        query: &[(String, String)],
        body: Bytes,
    ) -> Result<(StatusCode, http::HeaderMap, Bytes), S3Error> {
        let transport = |reason: String| S3Error::Transport {
            op,
            key: key.to_string(),
            reason,
        };
        let (host, path) = self.address(key);
        let payload = if body.is_empty() {
            EMPTY_SHA256.to_string()
        } else {
            hex::encode(Sha256::digest(&body))
        };
        let signed = self.sign(
            method.as_str(),
            &host,
            &path,
            query,
            &payload,
            Timestamp::now(),
        );
        let qs = canonical_query(query);
        let uri = if qs.is_empty() {
            format!("{}://{host}{path}", self.scheme)
        } else {
            format!("{}://{host}{path}?{qs}", self.scheme)
        };
        let req = Request::builder()
            .method(method)
            .uri(uri)
            .header("host", &host)
            .header("x-amz-content-sha256", &payload)
            .header("x-amz-date", &signed.amz_date)
            .header("authorization", &signed.authorization)
            .header("content-length", body.len())
            .body(Full::new(body))
            .map_err(|e| transport(e.to_string()))?;
        let resp = tokio::time::timeout(REQUEST_TIMEOUT, self.http.request(req))
            .await
            .map_err(|_| transport(format!("no answer within {REQUEST_TIMEOUT:?}")))?
            .map_err(|e| transport(error_chain(&e)))?;
        let (parts, body) = resp.into_parts();
        let bytes =
            tokio::time::timeout(REQUEST_TIMEOUT, Limited::new(body, MAX_RESPONSE).collect())
                .await
                .map_err(|_| transport("the response body stalled".into()))?
                .map_err(|e| transport(format!("reading the response: {e}")))?
                .to_bytes();
        if !parts.status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            return Err(S3Error::Refused {
                op,
                key: key.to_string(),
                status: parts.status.as_u16(),
                code: xml_field(&text, "Code").unwrap_or_default(),
                message: xml_field(&text, "Message")
                    .unwrap_or_else(|| text.chars().take(200).collect()),
            });
        }
        Ok((parts.status, parts.headers, bytes))
    }

    pub async fn put_object(&self, key: &str, body: Bytes) -> Result<(), S3Error> {
        self.send("PutObject", Method::PUT, key, &[], body).await?;
        Ok(())
    }

    pub async fn delete_object(&self, key: &str) -> Result<(), S3Error> {
        self.send("DeleteObject", Method::DELETE, key, &[], Bytes::new())
            .await?;
        Ok(())
    }

    /// The whole object (for small objects and tests: the body is held in memory).
    pub async fn get_object(&self, key: &str, max: usize) -> Result<Bytes, S3Error> {
        let transport = |reason: String| S3Error::Transport {
            op: "GetObject",
            key: key.to_string(),
            reason,
        };
        let uri: http::Uri = self
            .presign_get(key, Duration::from_secs(300))
            .parse()
            .map_err(|e: http::uri::InvalidUri| transport(e.to_string()))?;
        let req = Request::builder()
            .uri(uri)
            .body(Full::new(Bytes::new()))
            .map_err(|e| transport(e.to_string()))?;
        let resp = self
            .http
            .request(req)
            .await
            .map_err(|e| transport(error_chain(&e)))?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), max)
            .collect()
            .await
            .map_err(|e| transport(e.to_string()))?
            .to_bytes();
        if !status.is_success() {
            let text = String::from_utf8_lossy(&bytes);
            return Err(S3Error::Refused {
                op: "GetObject",
                key: key.to_string(),
                status: status.as_u16(),
                code: xml_field(&text, "Code").unwrap_or_default(),
                message: xml_field(&text, "Message").unwrap_or_default(),
            });
        }
        Ok(bytes)
    }

    pub async fn create_multipart(&self, key: &str) -> Result<String, S3Error> {
        let (_, _, body) = self
            .send(
                "CreateMultipartUpload",
                Method::POST,
                key,
                &[("uploads".into(), String::new())],
                Bytes::new(),
            )
            .await?;
        xml_field(&String::from_utf8_lossy(&body), "UploadId").ok_or_else(|| S3Error::Transport {
            op: "CreateMultipartUpload",
            key: key.to_string(),
            reason: "the answer holds no UploadId".into(),
        })
    }

    /// Uploads one part (numbered from 1) and returns its ETag.
    pub async fn upload_part(
        &self,
        key: &str,
        upload_id: &str,
        number: usize,
        body: Bytes,
    ) -> Result<String, S3Error> {
        let query = [
            ("partNumber".to_string(), number.to_string()),
            ("uploadId".to_string(), upload_id.to_string()),
        ];
        let (_, headers, _) = self
            .send("UploadPart", Method::PUT, key, &query, body)
            .await?;
        headers
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| S3Error::Transport {
                op: "UploadPart",
                key: key.to_string(),
                reason: "the answer holds no ETag".into(),
            })
    }

    pub async fn complete_multipart(
        &self,
        key: &str,
        upload_id: &str,
        etags: &[String],
    ) -> Result<(), S3Error> {
        let mut xml = String::from("<CompleteMultipartUpload>");
        for (i, etag) in etags.iter().enumerate() {
            let _ = write!(
                xml,
                "<Part><PartNumber>{}</PartNumber><ETag>{}</ETag></Part>",
                i + 1,
                xml_escape(etag)
            );
        }
        xml.push_str("</CompleteMultipartUpload>");
        let (_, _, body) = self
            .send(
                "CompleteMultipartUpload",
                Method::POST,
                key,
                &[("uploadId".to_string(), upload_id.to_string())],
                Bytes::from(xml),
            )
            .await?;
        // S3 may answer 200 and still report a failure in the body.
        let text = String::from_utf8_lossy(&body);
        if text.contains("<Error>") {
            return Err(S3Error::Refused {
                op: "CompleteMultipartUpload",
                key: key.to_string(),
                status: 200,
                code: xml_field(&text, "Code").unwrap_or_default(),
                message: xml_field(&text, "Message").unwrap_or_default(),
            });
        }
        Ok(())
    }

    pub async fn abort_multipart(&self, key: &str, upload_id: &str) -> Result<(), S3Error> {
        self.send(
            "AbortMultipartUpload",
            Method::DELETE,
            key,
            &[("uploadId".to_string(), upload_id.to_string())],
            Bytes::new(),
        )
        .await?;
        Ok(())
    }

    /// Streams a backup into the object `key`, checking it as it goes: in `PART_SIZE` parts
    /// (one PUT when it fits in one), the upload completed only once the whole stream verified
    /// and aborted otherwise, so an object under `key` is always a whole backup. At most one
    /// part is held in memory. A stream silent for `idle` is given up on.
    pub async fn upload_backup(
        &self,
        key: &str,
        stream: &mut BackupStream,
        idle: Duration,
    ) -> Result<BackupInfo, String> {
        let mut verifier = Verifier::new();
        let mut part: Vec<u8> = Vec::with_capacity(PART_SIZE);
        let mut upload: Option<(String, Vec<String>)> = None;
        let result = async {
            loop {
                let chunk = tokio::time::timeout(idle, stream.next_chunk())
                    .await
                    .map_err(|_| format!("the member sent nothing for {}s", idle.as_secs()))?
                    .map_err(|e| format!("reading the backup stream: {e}"))?;
                let Some(chunk) = chunk else { break };
                verifier
                    .update(&chunk)
                    .map_err(|e| format!("the stream is not a raftkv backup: {e}"))?;
                part.extend_from_slice(&chunk);
                while part.len() >= PART_SIZE {
                    let rest = part.split_off(PART_SIZE);
                    let body = Bytes::from(std::mem::replace(&mut part, rest));
                    self.next_part(key, &mut upload, body).await?;
                }
            }
            let info = verifier
                .finish()
                .map_err(|e| format!("the backup stream ended early or damaged: {e}"))?;
            if upload.is_none() {
                self.put_object(key, Bytes::from(std::mem::take(&mut part)))
                    .await
                    .map_err(|e| e.to_string())?;
            } else {
                if !part.is_empty() {
                    let body = Bytes::from(std::mem::take(&mut part));
                    self.next_part(key, &mut upload, body).await?;
                }
                if let Some((id, etags)) = &upload {
                    self.complete_multipart(key, id, etags)
                        .await
                        .map_err(|e| e.to_string())?;
                }
            }
            Ok::<_, String>(info)
        }
        .await;
        if result.is_err()
            && let Some((id, _)) = &upload
            && let Err(e) = self.abort_multipart(key, id).await
        {
            tracing::warn!(key, error = %e, "aborting the unfinished upload");
        }
        result
    }

    /// Uploads the next part of a multipart upload, starting the upload with the first.
    async fn next_part(
        &self,
        key: &str,
        upload: &mut Option<(String, Vec<String>)>,
        body: Bytes,
    ) -> Result<(), String> {
        if upload.is_none() {
            let id = self
                .create_multipart(key)
                .await
                .map_err(|e| e.to_string())?;
            *upload = Some((id, Vec::new()));
        }
        let Some((id, etags)) = upload.as_mut() else {
            return Err("no upload in progress".into());
        };
        if etags.len() >= MAX_PARTS {
            return Err(format!(
                "the backup is larger than S3's {MAX_PARTS} parts of {} MiB",
                PART_SIZE >> 20
            ));
        }
        let etag = self
            .upload_part(key, id, etags.len() + 1, body)
            .await
            .map_err(|e| e.to_string())?;
        etags.push(etag);
        Ok(())
    }
}

/// HMAC-SHA256 (RFC 2104), written out: it cannot fail, whatever the key.
fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    const BLOCK: usize = 64;
    let mut k = [0u8; BLOCK];
    if key.len() > BLOCK {
        k[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        k[..key.len()].copy_from_slice(key);
    }
    let mut inner = Sha256::new();
    inner.update(k.map(|b| b ^ 0x36));
    inner.update(data);
    let mut outer = Sha256::new();
    outer.update(k.map(|b| b ^ 0x5c));
    outer.update(inner.finalize());
    outer.finalize().to_vec()
}

fn canonical_request(
    method: &str,
    path: &str,
    query: &[(String, String)],
    headers: &[(&str, String)],
    signed_headers: &str,
    payload_sha256: &str,
) -> String {
    let mut h: Vec<_> = headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    h.sort();
    let mut canonical_headers = String::new();
    for (k, v) in h {
        let _ = writeln!(canonical_headers, "{k}:{v}");
    }
    let path = if path.is_empty() { "/" } else { path };
    format!(
        "{method}\n{path}\n{}\n{canonical_headers}\n{signed_headers}\n{payload_sha256}",
        canonical_query(query)
    )
}

fn canonical_query(query: &[(String, String)]) -> String {
    let mut q: Vec<_> = query
        .iter()
        .map(|(k, v)| (uri_encode(k, true), uri_encode(v, true)))
        .collect();
    q.sort();
    q.iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect::<Vec<_>>()
        .join("&")
}

/// SigV4 URI encoding: unreserved characters stay, everything else is %XX; `/` too unless it
/// separates path segments.
fn uri_encode(s: &str, encode_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                out.push(b as char)
            }
            b'/' if !encode_slash => out.push('/'),
            _ => {
                let _ = write!(out, "%{b:02X}");
            }
        }
    }
    out
}

/// The text of the first `<name>` element (S3's answers are small and flat).
fn xml_field(xml: &str, name: &str) -> Option<String> {
    let open = format!("<{name}>");
    let close = format!("</{name}>");
    let start = xml.find(&open)? + open.len();
    let end = start + xml[start..].find(&close)?;
    Some(xml_unescape(&xml[start..end]))
}

fn xml_unescape(s: &str) -> String {
    s.replace("&quot;", "\"")
        .replace("&apos;", "'")
        .replace("&lt;", "<")
        .replace("&gt;", ">")
        .replace("&amp;", "&")
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(inner) = src {
        let _ = write!(s, ": {inner}");
        src = inner.source();
    }
    s
}

fn rustls_pemfile_certs(
    pem: &[u8],
) -> Result<Vec<rustls_pki_types::CertificateDer<'static>>, S3Error> {
    use rustls_pki_types::pem::PemObject;
    rustls_pki_types::CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| S3Error::Tls(format!("the CA bundle: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn example() -> Bucket {
        example_at("https://s3.amazonaws.com")
    }

    fn example_at(endpoint: &str) -> Bucket {
        // The example credentials and bucket of AWS's SigV4 documentation for S3.
        Bucket::new(
            endpoint,
            "examplebucket",
            "us-east-1",
            false,
            "AKIAIOSFODNN7EXAMPLE",
            "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
            None,
        )
        .unwrap()
    }

    fn may_24_2013() -> Timestamp {
        "2013-05-24T00:00:00Z".parse().unwrap()
    }

    #[test]
    fn a_presigned_get_matches_the_aws_documented_example() {
        let url = example().presign_get_at("test.txt", Duration::from_secs(86400), may_24_2013());
        assert!(url.starts_with("https://examplebucket.s3.amazonaws.com/test.txt?"));
        assert!(
            url.contains(
                "&X-Amz-Signature=aeeed9bbccd4d02ee5c0109b86d86835f995330da4c265957d157751f604d404"
            ),
            "{url}"
        );
    }

    #[test]
    fn a_signed_put_matches_the_aws_documented_example() {
        // AWS's PUT Object example signs date and storage-class headers as well; with only the
        // three headers this client sends, the canonical form is checked piece by piece.
        let b = example();
        let (host, path) = b.address("test$file.text");
        assert_eq!(host, "examplebucket.s3.amazonaws.com");
        assert_eq!(path, "/test%24file.text");
        let canonical = canonical_request(
            "GET",
            "/",
            &[
                ("uploads".into(), String::new()),
                ("max-keys".into(), "2".into()),
            ],
            &[("host", host)],
            "host",
            EMPTY_SHA256,
        );
        assert!(canonical.starts_with("GET\n/\nmax-keys=2&uploads=\nhost:examplebucket"));
    }

    #[test]
    fn keys_and_buckets_are_encoded_once_and_endpoints_checked() {
        assert_eq!(uri_encode("a b/c~d", false), "a%20b/c~d");
        assert_eq!(uri_encode("a/b", true), "a%2Fb");
        let path = Bucket::new("http://127.0.0.1:9000", "bkt", "", true, "a", "b", None).unwrap();
        assert_eq!(path.address("x/y").1, "/bkt/x/y");
        assert_eq!(path.region, "us-east-1");
        assert!(Bucket::new("ftp://h", "bkt", "", true, "a", "b", None).is_err());
        assert!(Bucket::new("http://u:p@h", "bkt", "", true, "a", "b", None).is_err());
        assert!(Bucket::new("http://h", "bkt", "", true, "a", "b", Some(b"junk")).is_err());
        // Not bucket names: a virtual-host-style request must not be steered to another host.
        for bad in ["", "b", "evil.example#", "evil.example/x", "Upper", "a@b.c"] {
            assert!(
                Bucket::new("http://h", bad, "", false, "a", "b", None).is_err(),
                "{bad:?}"
            );
        }
        // Host carries no default port, so the signature must not either.
        let aws = example_at("https://s3.amazonaws.com:443");
        let when = may_24_2013();
        let d = Duration::from_secs(86400);
        assert_eq!(
            aws.presign_get_at("test.txt", d, when),
            example().presign_get_at("test.txt", d, when)
        );
    }

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2 of RFC 4231.
        assert_eq!(
            hex::encode(hmac(b"Jefe", b"what do ya want for nothing?")),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        // Test case 6: a key longer than the block.
        assert_eq!(
            hex::encode(hmac(
                &[0xaa; 131],
                b"Test Using Larger Than Block-Size Key - Hash Key First"
            )),
            "60e431591ee0b67f0d8a26aacbf5b77f8e0bc6213728c5140546040f0ee37f54"
        );
    }

    #[test]
    fn answers_are_read_for_their_fields() {
        let xml = "<InitiateMultipartUploadResult><Bucket>b</Bucket><UploadId>a&amp;b</UploadId></InitiateMultipartUploadResult>";
        assert_eq!(xml_field(xml, "UploadId").as_deref(), Some("a&b"));
        assert_eq!(xml_field(xml, "Code"), None);
        assert_eq!(xml_escape("\"e\""), "&quot;e&quot;");
    }
}
