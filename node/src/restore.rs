//! `raftkv restore`: turns a backup into the data directory of one member of a new cluster.
//! Run it once per member, with the same backup and the same new cluster token, then start the
//! members with `raftkv serve --initial-cluster-state new` as for any new cluster: they form a
//! cluster whose keys, values, revisions, versions, leases, users and roles are the backup's.

use crate::bootstrap::DataDir;
use crate::crypto::Keyring;
use crate::server::NodeError;
use crate::storage::Store;
use crate::storage::backup::{self, BackupHeader};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct RestoreArgs {
    /// The backup file (from `kvctl backup save`, `etcdctl snapshot save`, or Maintenance.Snapshot).
    #[arg(long)]
    pub from: PathBuf,
    /// The new member's data directory; it must not exist or be empty.
    #[arg(long)]
    pub data_dir: PathBuf,
    /// The new member's id (as `raftkv serve --id`).
    #[arg(long)]
    pub id: u64,
    /// The new cluster's token (as `raftkv serve --cluster-token`); the same for every member.
    #[arg(long, env = "RAFTKV_CLUSTER_TOKEN")]
    pub cluster_token: String,
    /// The keyring the new cluster will use: it must hold every key the backup's values are
    /// sealed with.
    #[arg(long, env = "RAFTKV_ENCRYPTION_KEYRING_FILE")]
    pub encryption_keyring_file: Option<PathBuf>,
}

/// Checks the backup and the keyring, then writes the data directory. Refuses, and leaves
/// nothing behind, if the backup is corrupt, a key is missing, or the directory is in use. The
/// member is assembled in a hidden sibling directory and renamed into place once whole, so a
/// crash mid-restore never leaves something that looks like a member.
pub fn run(args: &RestoreArgs) -> Result<BackupHeader, NodeError> {
    if args.id == 0 {
        return Err(NodeError::Config("--id must be a positive integer".into()));
    }
    let verified = backup::verify(&args.from)
        .map_err(|e| NodeError::Config(format!("{}: {e}", args.from.display())))?;
    let keyring = match &args.encryption_keyring_file {
        Some(p) => Some((Keyring::load(p)?, p.clone())),
        None => None,
    };
    check_keys(
        &verified
            .header
            .keys
            .iter()
            .map(|k| (k.id, k.fingerprint.clone()))
            .collect::<Vec<_>>(),
        keyring.as_ref(),
    )?;
    let target = &args.data_dir;
    let in_use = || std::fs::read_dir(target).is_ok_and(|mut d| d.next().is_some());
    if in_use() {
        return Err(crate::bootstrap::IdentityError::NotEmpty(target.display().to_string()).into());
    }
    let name = target
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .ok_or_else(|| NodeError::Config(format!("{} names no directory", target.display())))?;
    let parent = parent_dir(target)?;
    let staging = parent.join(format!(".{name}.restoring-{:016x}", rand::random::<u64>()));
    let assembled = (|| -> Result<(), NodeError> {
        std::fs::create_dir(&staging).map_err(|e| io(&staging, e))?;
        {
            let store = Store::open(&staging.join("db"))?;
            backup::seed(&store, &verified, &args.from)?;
            // The data itself says which keys sealed it (the header is read a moment apart).
            let used: Vec<(u32, String)> = crate::apply::keys_in_use(&store)?
                .into_iter()
                .map(|(id, fp)| (id, hex::encode(fp)))
                .collect();
            check_keys(&used, keyring.as_ref())?;
            store.sync_wal()?;
        }
        DataDir::mark_restored(&staging, &args.cluster_token, args.id, &verified.digest)?;
        if in_use() {
            return Err(
                crate::bootstrap::IdentityError::NotEmpty(target.display().to_string()).into(),
            );
        }
        if target.exists() {
            std::fs::remove_dir(target).map_err(|e| io(target, e))?;
        }
        std::fs::rename(&staging, target).map_err(|e| io(target, e))?;
        std::fs::File::open(&parent)
            .and_then(|d| d.sync_all())
            .map_err(|e| io(&parent, e))?;
        Ok(())
    })();
    if let Err(e) = assembled {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(e);
    }
    Ok(verified.header)
}

fn io(path: &std::path::Path, e: std::io::Error) -> NodeError {
    NodeError::Config(format!("{}: {e}", path.display()))
}

/// Checks that `keyring` holds every key in `keys` (id, hex fingerprint) with that
/// fingerprint; the errors name the key id.
fn check_keys(
    keys: &[(u32, String)],
    keyring: Option<&(Keyring, PathBuf)>,
) -> Result<(), NodeError> {
    if keys.is_empty() {
        return Ok(());
    }
    let ids = || {
        keys.iter()
            .map(|(id, _)| id.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some((ring, path)) = keyring else {
        return Err(NodeError::Config(format!(
            "the backup's values are sealed with key id(s) {}; give --encryption-keyring-file \
             with a keyring that holds them",
            ids()
        )));
    };
    for (id, fingerprint) in keys {
        match ring.get(*id) {
            None => {
                return Err(NodeError::Config(format!(
                    "the backup's values are sealed with key id {id}, which keyring {} does not \
                     hold; use the source cluster's keyring, or one holding key ids {}",
                    path.display(),
                    ids(),
                )));
            }
            Some(key) if hex::encode(key.fingerprint) != *fingerprint => {
                return Err(NodeError::Config(format!(
                    "key id {id} in keyring {} is not the key the backup was sealed with \
                     (fingerprint {fingerprint} expected, {} found)",
                    path.display(),
                    hex::encode(key.fingerprint)
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}

/// The directory `path` sits in (created): staging files go beside the data directory, on
/// the same filesystem, so the final rename is atomic.
fn parent_dir(path: &std::path::Path) -> Result<PathBuf, NodeError> {
    let parent = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
    Ok(parent)
}

/// How long a download may go without a byte before it is given up.
const DOWNLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

/// `raftkv serve --restore-from-url`: a member of a new cluster whose data directory is still
/// empty downloads the backup (an HTTP(S) URL, such as the presigned S3 URL the operator
/// gives), checks it against `sha256` when given, and restores it before serving. A member
/// that joins an existing cluster ignores it: the backup only seeds a cluster's first members.
/// A first member whose directory already holds data that was not restored from a backup
/// (a volume kept from an earlier cluster of the same name) refuses to start: serving that
/// old data as if it were the restore would be a silent, wrong answer.
pub async fn restore_from_url_if_new(
    url: &str,
    sha256: Option<&str>,
    args: &RestoreArgs,
    forming: bool,
) -> Result<Option<BackupHeader>, NodeError> {
    let has_data = std::fs::read_dir(&args.data_dir).is_ok_and(|mut d| d.next().is_some());
    if has_data && forming {
        let restored = DataDir::recorded(&args.data_dir).and_then(|i| i.restored_from);
        if restored.is_none() {
            return Err(NodeError::Config(format!(
                "this member is to be restored from a backup, but its data directory {} already                  holds data that did not come from one (a volume kept from an earlier cluster?):                  refusing to serve it as the restore; delete the volume, or remove the restore                  from the cluster's spec to serve the old data",
                args.data_dir.display()
            )));
        }
    }
    if has_data || !forming {
        tracing::info!(
            has_data,
            forming,
            "not restoring from the backup URL: it only seeds the empty members of a new cluster"
        );
        return Ok(None);
    }
    // A backup on a volume mounted into the member (the operator's PersistentVolumeClaim
    // destination) is read where it is: no copy, but the same digest check.
    let local = url.strip_prefix("file://").map(std::path::PathBuf::from);
    let parent = parent_dir(&args.data_dir)?;
    let file = match &local {
        Some(path) => path.clone(),
        None => parent.join(format!(".restore-download-{:016x}", rand::random::<u64>())),
    };
    let result = async {
        let started = std::time::Instant::now();
        let (bytes, digest) = match &local {
            Some(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || digest_of(&path))
                    .await
                    .map_err(|e| NodeError::Config(format!("the digest task: {e}")))??
            }
            None => download(url, &file).await?,
        };
        if let Some(want) = sha256
            && !want.eq_ignore_ascii_case(&digest)
        {
            return Err(NodeError::Config(format!(
                "the downloaded backup's SHA-256 is {digest}, not the {want} expected: refusing it"
            )));
        }
        tracing::info!(
            bytes,
            sha256 = %digest,
            seconds = started.elapsed().as_secs_f64(),
            "downloaded the backup; restoring"
        );
        let restore = RestoreArgs {
            from: file.clone(),
            ..args.clone()
        };
        tokio::task::spawn_blocking(move || run(&restore))
            .await
            .map_err(|e| NodeError::Config(format!("the restore task: {e}")))?
    }
    .await;
    if local.is_none() {
        let _ = std::fs::remove_file(&file);
    }
    let header = result?;
    tracing::info!(
        revision = header.revision,
        source_cluster = format!("{:x}", header.cluster_id),
        "restored this member from the backup"
    );
    Ok(Some(header))
}

/// The size and hex SHA-256 of a local backup file.
fn digest_of(path: &std::path::Path) -> Result<(u64, String), NodeError> {
    use sha2::Digest;
    use std::io::Read;
    let mut f = std::fs::File::open(path).map_err(|e| io(path, e))?;
    let mut hash = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut bytes = 0u64;
    loop {
        let n = f.read(&mut buf).map_err(|e| io(path, e))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        bytes += n as u64;
    }
    Ok((bytes, hex::encode(hash.finalize())))
}

/// Streams `url` into `file` (owner-only), returning its size and hex SHA-256.
async fn download(url: &str, file: &std::path::Path) -> Result<(u64, String), NodeError> {
    use http_body_util::BodyExt;
    use sha2::Digest;
    use tokio::io::AsyncWriteExt;
    let bad = |why: String| {
        // The query of a presigned URL is a credential: it stays out of messages.
        let shown = url.split('?').next().unwrap_or_default();
        NodeError::Config(format!("downloading the backup from {shown}: {why}"))
    };
    let uri: http::Uri = url.parse().map_err(|_| bad("not a URL".into()))?;
    let mut roots = rustls::RootCertStore::empty();
    for cert in rustls_native_certs::load_native_certs().certs {
        let _ = roots.add(cert);
    }
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| bad(e.to_string()))?
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .build();
    let client: hyper_util::client::legacy::Client<_, http_body_util::Empty<bytes::Bytes>> =
        hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
            .build(connector);
    let req = http::Request::get(uri)
        .body(http_body_util::Empty::new())
        .map_err(|e| bad(e.to_string()))?;
    let resp = tokio::time::timeout(DOWNLOAD_IDLE, client.request(req))
        .await
        .map_err(|_| bad(format!("no answer within {DOWNLOAD_IDLE:?}")))?
        .map_err(|e| bad(e.to_string()))?;
    if !resp.status().is_success() {
        let status = resp.status();
        let body = tokio::time::timeout(
            DOWNLOAD_IDLE,
            http_body_util::Limited::new(resp.into_body(), 4096).collect(),
        )
        .await
        .ok()
        .and_then(|r| r.ok())
        .map(|b| String::from_utf8_lossy(&b.to_bytes()).into_owned())
        .unwrap_or_default();
        return Err(bad(format!("{status}: {}", body.trim())));
    }
    let mut open = tokio::fs::OpenOptions::new();
    open.write(true).create_new(true);
    #[cfg(unix)]
    open.mode(0o600);
    let mut out = open.open(file).await.map_err(|e| io(file, e))?;
    let mut body = resp.into_body();
    let mut hash = sha2::Sha256::new();
    let mut bytes = 0u64;
    loop {
        let frame = tokio::time::timeout(DOWNLOAD_IDLE, body.frame())
            .await
            .map_err(|_| bad(format!("stalled for {DOWNLOAD_IDLE:?}")))?;
        let Some(frame) = frame else { break };
        let frame = frame.map_err(|e| bad(e.to_string()))?;
        if let Ok(data) = frame.into_data() {
            hash.update(&data);
            bytes += data.len() as u64;
            out.write_all(&data).await.map_err(|e| io(file, e))?;
        }
    }
    out.sync_all().await.map_err(|e| io(file, e))?;
    Ok((bytes, hex::encode(hash.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(dir: &std::path::Path) -> RestoreArgs {
        RestoreArgs {
            from: PathBuf::new(),
            data_dir: dir.to_path_buf(),
            id: 1,
            cluster_token: "apps.kv".into(),
            encryption_keyring_file: None,
        }
    }

    // No server answers this address: a test that reached the download would fail on it.
    const NOWHERE: &str = "http://127.0.0.1:9/backup";

    #[tokio::test]
    async fn a_first_member_with_old_data_refuses_to_pass_it_off_as_the_restore() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        DataDir::claim(&data, "apps.kv", 1).unwrap();
        let err = restore_from_url_if_new(NOWHERE, None, &args(&data), true)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("did not come from one"), "{err}");
        // Joining an existing cluster, the backup is not this member's business.
        assert!(
            restore_from_url_if_new(NOWHERE, None, &args(&data), false)
                .await
                .unwrap()
                .is_none()
        );
    }

    #[tokio::test]
    async fn a_backup_on_a_mounted_volume_is_checked_and_left_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let backup = dir.path().join("volume").join("kv-1.rkvbackup");
        std::fs::create_dir_all(backup.parent().unwrap()).unwrap();
        std::fs::write(&backup, b"not the backup the operator recorded").unwrap();
        let url = format!("file://{}", backup.display());
        let want = "0".repeat(64);
        let err = restore_from_url_if_new(&url, Some(&want), &args(&data), true)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("SHA-256") && err.contains("refusing"), "{err}");
        // The volume's file is the backup itself, not a download: it stays; nothing was made.
        assert!(backup.exists());
        assert!(std::fs::read_dir(&data).map_or(true, |mut d| d.next().is_none()));
        let missing = format!("file://{}", dir.path().join("gone").display());
        let err = restore_from_url_if_new(&missing, None, &args(&data), true)
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains("gone"), "{err}");
    }

    #[tokio::test]
    async fn a_member_restored_before_a_restart_starts_from_what_it_restored() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        std::fs::create_dir_all(&data).unwrap();
        DataDir::mark_restored(&data, "apps.kv", 1, "ab12").unwrap();
        assert!(
            restore_from_url_if_new(NOWHERE, None, &args(&data), true)
                .await
                .unwrap()
                .is_none()
        );
    }
}
