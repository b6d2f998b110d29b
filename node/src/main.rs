//! The `raftkv` binary: `serve` runs one member, `dev` a local cluster, `keyring` manages
//! encryption keyrings, `certs` makes certificates, `restore` makes a member from a backup.

use clap::{Parser, Subcommand};

/// mimalloc: the request path allocates many small, short-lived buffers (protobuf messages,
/// encoded log entries), where glibc's allocator showed up as a tenth of a member's CPU time.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use raftkv::crypto::Keyring;
use raftkv::telemetry::{self, LogFormat};
use std::path::PathBuf;
use std::process::ExitCode;

#[derive(Parser)]
#[command(
    name = "raftkv",
    version,
    about = "A Raft-replicated, encrypted key-value store that speaks the etcd v3 API"
)]
struct Cli {
    /// Log format.
    #[arg(
        long,
        env = "RAFTKV_LOG_FORMAT",
        value_enum,
        default_value = "human",
        global = true
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run one member of a cluster.
    Serve(Box<raftkv::config::ServeArgs>),
    /// Run a local cluster on loopback (secure by default) and keep serving until Ctrl-C.
    Dev(raftkv::dev::DevArgs),
    /// Create and rotate encryption keyrings.
    #[command(subcommand)]
    Keyring(KeyringCmd),
    /// Make a cluster CA and member or client certificates signed by it.
    #[command(subcommand)]
    Certs(CertsCmd),
    /// Make the data directory of one member of a new cluster from a backup.
    Restore(raftkv::restore::RestoreArgs),
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create the CA (`ca.crt`, `ca.key`) in DIR, unless one is there.
    Ca {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long, default_value = "raftkv CA")]
        name: String,
    },
    /// A member certificate (`NAME.crt`, `NAME.key`) for the peer port, valid for every --host.
    Member {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// Host names or IP addresses the member is reached at (repeatable).
        #[arg(long = "host", required = true)]
        hosts: Vec<String>,
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
    /// A client certificate (`USER.crt`, `USER.key`) with USER as its common name.
    Client {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        user: String,
        #[arg(long, default_value_t = 365)]
        days: u64,
    },
}

fn certs(cmd: CertsCmd) -> Result<(), String> {
    use raftkv::certs::Authority;
    use std::time::Duration;
    let days = |d: u64| Duration::from_secs(d.saturating_mul(86_400));
    match cmd {
        CertsCmd::Ca { dir, name } => {
            Authority::load_or_create(&dir, &name).map_err(|e| e.to_string())?;
            println!("CA in {}", dir.join(raftkv::certs::CA_CERT).display());
        }
        CertsCmd::Member {
            dir,
            name,
            hosts,
            days: d,
        } => {
            let ca = Authority::load_or_create(&dir, "raftkv CA").map_err(|e| e.to_string())?;
            let files = ca
                .member(&name, &hosts, days(d))
                .and_then(|c| c.write(&dir, &name))
                .map_err(|e| e.to_string())?;
            println!("wrote {} and {}", files.cert.display(), files.key.display());
        }
        CertsCmd::Client { dir, user, days: d } => {
            let ca = Authority::load_or_create(&dir, "raftkv CA").map_err(|e| e.to_string())?;
            let files = ca
                .client(&user, days(d))
                .and_then(|c| c.write(&dir, &user))
                .map_err(|e| e.to_string())?;
            println!("wrote {} and {}", files.cert.display(), files.key.display());
        }
    }
    Ok(())
}

#[derive(Subcommand)]
enum KeyringCmd {
    /// Write a new keyring with one random key.
    New { file: PathBuf },
    /// Add a random key to a keyring and make it the active one.
    Rotate { file: PathBuf },
    /// Remove a key that is no longer active (after re-encrypting what it sealed).
    Remove {
        file: PathBuf,
        #[arg(long)]
        id: u32,
    },
}

fn keyring(cmd: KeyringCmd) -> Result<(), String> {
    match cmd {
        KeyringCmd::New { file } => {
            if file.exists() {
                return Err(format!(
                    "{} exists; refusing to overwrite a keyring",
                    file.display()
                ));
            }
            Keyring::generate().save(&file).map_err(|e| e.to_string())?;
            println!("wrote {} with key 1 active", file.display());
        }
        KeyringCmd::Rotate { file } => {
            let mut k = Keyring::load(&file).map_err(|e| e.to_string())?;
            let id = k.rotate();
            k.save(&file).map_err(|e| e.to_string())?;
            println!("added key {id} to {} and made it active", file.display());
        }
        KeyringCmd::Remove { file, id } => {
            let mut k = Keyring::load(&file).map_err(|e| e.to_string())?;
            k.remove(id)?;
            k.save(&file).map_err(|e| e.to_string())?;
            println!("removed key {id} from {}", file.display());
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init(cli.log_format);
    let result: Result<(), String> = match cli.command {
        Cmd::Keyring(k) => keyring(k),
        Cmd::Certs(c) => certs(c),
        Cmd::Restore(args) => match raftkv::restore::run(&args) {
            Ok(h) => {
                println!(
                    "restored {} into {} as member {} of a new cluster: revision {} (compacted at {}), taken {} s after the epoch from member {:x} of cluster {:x}",
                    args.from.display(),
                    args.data_dir.display(),
                    args.id,
                    h.revision,
                    h.compact_revision,
                    h.created_unix,
                    h.member_id,
                    h.cluster_id
                );
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
        cmd => {
            let mut builder = tokio::runtime::Builder::new_multi_thread();
            if let Cmd::Serve(args) = &cmd
                && args.worker_threads > 0
            {
                builder.worker_threads(args.worker_threads);
            }
            let rt = match builder.enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("raftkv: cannot start the runtime: {e}");
                    return ExitCode::FAILURE;
                }
            };
            rt.block_on(async move {
                match cmd {
                    Cmd::Serve(args) => raftkv::server::run(*args).await.map_err(|e| e.to_string()),
                    Cmd::Dev(args) => raftkv::dev::run(args).await,
                    Cmd::Keyring(_) | Cmd::Certs(_) | Cmd::Restore(_) => Ok(()),
                }
            })
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            eprintln!("raftkv: {e}");
            ExitCode::FAILURE
        }
    }
}
