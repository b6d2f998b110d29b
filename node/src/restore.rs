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

/// Checks the backup and the keyring, then writes the data directory. Refuses, and writes
/// nothing, if the backup is corrupt, a key is missing, or the directory is in use.
pub fn run(args: &RestoreArgs) -> Result<BackupHeader, NodeError> {
    if args.id == 0 {
        return Err(NodeError::Config("--id must be a positive integer".into()));
    }
    let verified = backup::verify(&args.from)
        .map_err(|e| NodeError::Config(format!("{}: {e}", args.from.display())))?;
    check_keys(&verified.header, args.encryption_keyring_file.as_deref())?;
    // Decided before anything is written: a data directory that is in use stays untouched.
    if std::fs::read_dir(&args.data_dir).is_ok_and(|mut d| d.next().is_some()) {
        return Err(
            crate::bootstrap::IdentityError::NotEmpty(args.data_dir.display().to_string()).into(),
        );
    }
    let seeded = (|| -> Result<(), NodeError> {
        let data = DataDir::create_restored(
            &args.data_dir,
            &args.cluster_token,
            args.id,
            &verified.digest,
        )?;
        let store = Store::open(&data.db_path())?;
        backup::seed(&store, &verified, &args.from)?;
        Ok(())
    })();
    if let Err(e) = seeded {
        // Half a restore must not be mistaken for a member's data.
        let _ = std::fs::remove_dir_all(&args.data_dir);
        return Err(e);
    }
    Ok(verified.header)
}

fn check_keys(header: &BackupHeader, keyring: Option<&std::path::Path>) -> Result<(), NodeError> {
    if header.keys.is_empty() {
        return Ok(());
    }
    let ids = || {
        header
            .keys
            .iter()
            .map(|k| k.id.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    };
    let Some(path) = keyring else {
        return Err(NodeError::Config(format!(
            "the backup's values are sealed with key id(s) {}; give --encryption-keyring-file \
             with a keyring that holds them",
            ids()
        )));
    };
    let ring = Keyring::load(path)?;
    for k in &header.keys {
        match ring.get(k.id) {
            None => {
                return Err(NodeError::Config(format!(
                    "the backup's values are sealed with key id {id}, which keyring {} does not \
                     hold; use the source cluster's keyring, or one holding key ids {}",
                    path.display(),
                    ids(),
                    id = k.id,
                )));
            }
            Some(key) if hex::encode(key.fingerprint) != k.fingerprint => {
                return Err(NodeError::Config(format!(
                    "key id {} in keyring {} is not the key the backup was sealed with \
                     (fingerprint {} expected, {} found)",
                    k.id,
                    path.display(),
                    k.fingerprint,
                    hex::encode(key.fingerprint)
                )));
            }
            Some(_) => {}
        }
    }
    Ok(())
}
