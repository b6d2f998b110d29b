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
    let parent = target
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    std::fs::create_dir_all(&parent).map_err(|e| io(&parent, e))?;
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
