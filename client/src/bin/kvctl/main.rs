//! kvctl: the raftkv command line for users and administrators.

mod bench;
mod output;
mod token;
mod txn_text;

use clap::{Parser, Subcommand, ValueEnum};
use output::Table;
use raftkv_client::{Client, ConnectOptions, Error, GetOptions, TlsOptions, pb};
use serde_json::json;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
enum Format {
    Table,
    Json,
}

#[derive(Parser)]
#[command(
    name = "kvctl",
    version,
    about = "Command line for raftkv (and etcd v3) clusters"
)]
struct Cli {
    /// Comma-separated endpoints (host:port or URLs).
    #[arg(
        long,
        env = "RAFTKV_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:2379",
        global = true
    )]
    endpoints: Vec<String>,
    /// Bearer token (JWT).
    #[arg(long, env = "RAFTKV_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// File holding the bearer token.
    #[arg(long, env = "RAFTKV_TOKEN_FILE", global = true)]
    token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify servers (turns TLS on).
    #[arg(long, env = "RAFTKV_CACERT", global = true)]
    cacert: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    #[arg(
        id = "tls_cert",
        long = "cert",
        env = "RAFTKV_CERT",
        global = true,
        requires = "tls_key"
    )]
    tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(
        id = "tls_key",
        long = "key",
        env = "RAFTKV_KEY",
        global = true,
        requires = "tls_cert"
    )]
    tls_key: Option<PathBuf>,
    /// Per-request timeout (e.g. 5s, 500ms).
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration, global = true)]
    timeout: Duration,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value = "table", global = true)]
    output: Format,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Store a value.
    Put {
        key: String,
        value: String,
        /// Attach the key to a lease (hex or decimal id).
        #[arg(long)]
        lease: Option<String>,
        /// Print the previous value.
        #[arg(long)]
        prev_kv: bool,
    },
    /// Read a key or a prefix.
    Get {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// Read at this revision.
        #[arg(long, default_value_t = 0)]
        rev: i64,
        #[arg(long, default_value_t = 0)]
        limit: i64,
        #[arg(long)]
        keys_only: bool,
        /// Serve from the contacted member without a quorum round.
        #[arg(long)]
        serializable: bool,
    },
    /// Delete a key or a prefix.
    Del {
        key: String,
        #[arg(long)]
        prefix: bool,
    },
    /// Run a transaction written in kvctl's text form (from FILE, or stdin).
    Txn { file: Option<PathBuf> },
    /// List the members.
    Members,
    /// Show every member's status.
    Status,
    /// Compact history at or below a revision.
    Compact { revision: i64 },
    /// Show the leader.
    Leader,
    /// Re-seal every stored value with the active encryption key (root only); afterwards older
    /// keys can be removed from the keyring.
    Reencrypt {
        /// Values per Raft proposal.
        #[arg(long, default_value_t = 256)]
        batch_size: u32,
    },
    /// Save or check backups (restore one with `raftkv restore`).
    #[command(subcommand)]
    Backup(BackupCmd),
    /// Sign tokens.
    #[command(subcommand)]
    Token(token::TokenCmd),
    /// Closed-loop load against any etcd v3 endpoints.
    Bench(bench::BenchArgs),
}

#[derive(Subcommand)]
enum BackupCmd {
    /// Save a backup of the whole cluster at its current revision (root only) into FILE, or
    /// into an S3 object: `s3://BUCKET/KEY`, or `s3://BUCKET/PREFIX/` for a name with the
    /// time. S3 credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY.
    Save {
        target: String,
        #[command(flatten)]
        s3: S3Args,
    },
    /// Check that FILE is a whole backup and show what it holds.
    Inspect { file: PathBuf },
}

/// Where and how an `s3://` backup target is reached.
#[derive(clap::Args)]
struct S3Args {
    /// The S3 endpoint (default: AWS's for the region).
    #[arg(long, env = "AWS_ENDPOINT_URL_S3")]
    s3_endpoint: Option<String>,
    #[arg(long, env = "AWS_REGION", default_value = "us-east-1")]
    s3_region: String,
    /// Address the bucket as `<bucket>.<host>` (AWS's preferred form; the default without
    /// --s3-endpoint) rather than `<endpoint>/<bucket>` (most other servers).
    #[arg(long)]
    s3_virtual_host: bool,
    /// CA certificate (PEM) for an endpoint with a private CA.
    #[arg(long)]
    s3_ca_file: Option<PathBuf>,
}

/// Streams a backup into `s3://bucket/key`, checked on the way; returns the location.
async fn save_to_s3(
    client: &Client,
    target: &str,
    args: &S3Args,
) -> Result<(String, raftkv_client::backup::BackupInfo), Error> {
    let rest = target.strip_prefix("s3://").unwrap_or(target);
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    let key = if key.is_empty() || key.ends_with('/') {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("{key}raftkv-{now}.rkvbackup")
    } else {
        key.to_string()
    };
    let env = |name: &str| {
        std::env::var(name)
            .map_err(|_| Error::Config(format!("{name} must be set for an s3:// backup")))
    };
    let (access, secret) = (env("AWS_ACCESS_KEY_ID")?, env("AWS_SECRET_ACCESS_KEY")?);
    let endpoint = args
        .s3_endpoint
        .clone()
        .unwrap_or_else(|| format!("https://s3.{}.amazonaws.com", args.s3_region));
    let path_style = args.s3_endpoint.is_some() && !args.s3_virtual_host;
    let ca = match &args.s3_ca_file {
        Some(p) => Some(
            std::fs::read(p).map_err(|e| Error::Config(format!("reading {}: {e}", p.display())))?,
        ),
        None => None,
    };
    let b = raftkv_client::s3::Bucket::new(
        &endpoint,
        bucket,
        &args.s3_region,
        path_style,
        &access,
        &secret,
        ca.as_deref(),
    )
    .map_err(|e| Error::Config(e.to_string()))?;
    let mut stream = client.backup_stream().await?;
    let info = b
        .upload_backup(&key, &mut stream, Duration::from_secs(300))
        .await
        .map_err(Error::Destination)?;
    Ok((b.location(&key), info))
}

fn print_backup(path: &std::path::Path, b: &raftkv_client::backup::BackupInfo, json_out: bool) {
    if json_out {
        let keys: Vec<u32> = b.keys.iter().map(|k| k.id).collect();
        println!(
            "{}",
            json!({"file": path.display().to_string(), "revision": b.revision,
                   "compact_revision": b.compact_revision, "bytes": b.bytes,
                   "sha256": b.sha256, "cluster_id": format!("{:x}", b.cluster_id),
                   "member_id": format!("{:x}", b.member_id), "key_ids": keys,
                   "created_unix": b.created_unix})
        );
    } else {
        let keys: Vec<String> = b.keys.iter().map(|k| k.id.to_string()).collect();
        println!(
            "{}: revision {} (compacted at {}), {} bytes, sha256 {}, from member {:x} of cluster {:x}, values sealed with key ids [{}]",
            path.display(),
            b.revision,
            b.compact_revision,
            b.bytes,
            b.sha256,
            b.member_id,
            b.cluster_id,
            keys.join(", ")
        );
    }
}

async fn connect(cli: &Cli) -> Result<Client, Error> {
    let mut opts = ConnectOptions::default().with_timeout(cli.timeout);
    let token = match (&cli.token, &cli.token_file) {
        (Some(t), _) => Some(t.trim().to_string()),
        (None, Some(f)) => Some(
            std::fs::read_to_string(f)
                .map_err(|e| Error::Config(format!("reading token file {}: {e}", f.display())))?
                .trim()
                .to_string(),
        ),
        (None, None) => None,
    };
    if let Some(t) = token {
        opts = opts.with_token(t);
    }
    if cli.cacert.is_some() || cli.tls_cert.is_some() {
        let read = |p: &PathBuf| {
            std::fs::read(p).map_err(|e| Error::Config(format!("reading {}: {e}", p.display())))
        };
        let ca_pem = cli.cacert.as_ref().map(read).transpose()?;
        let identity_pem = match (&cli.tls_cert, &cli.tls_key) {
            (Some(c), Some(k)) => Some((read(c)?, read(k)?)),
            _ => None,
        };
        opts = opts.with_tls(TlsOptions {
            ca_pem,
            identity_pem,
            domain: None,
        });
    }
    Client::connect(cli.endpoints.clone(), opts).await
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn kv_json(kv: &raftkv_client::KeyValue) -> serde_json::Value {
    json!({
        "key": text(&kv.key),
        "value": text(&kv.value),
        "create_revision": kv.create_revision,
        "mod_revision": kv.mod_revision,
        "version": kv.version,
        "lease": kv.lease,
    })
}

fn parse_lease(s: &str) -> Result<i64, Error> {
    let s = s.trim();
    let parsed = if let Some(h) = s.strip_prefix("0x") {
        i64::from_str_radix(h, 16)
    } else {
        s.parse().or_else(|_| i64::from_str_radix(s, 16))
    };
    parsed.map_err(|_| Error::Config(format!("lease id {s:?} is not a number")))
}

async fn run(cli: Cli) -> Result<(), Error> {
    let json_out = cli.output == Format::Json;
    match &cli.cmd {
        Cmd::Token(t) => return token::run(t).map_err(Error::Config),
        Cmd::Backup(BackupCmd::Inspect { file }) => {
            let b = raftkv_client::backup::inspect(file)?;
            print_backup(file, &b, json_out);
            return Ok(());
        }
        Cmd::Bench(b) => return bench::run(&cli.endpoints, cli.token.clone(), b).await,
        _ => {}
    }
    let client = connect(&cli).await?;
    match &cli.cmd {
        Cmd::Put {
            key,
            value,
            lease,
            prev_kv,
        } => {
            let resp = client
                .put_raw(pb::PutRequest {
                    key: key.as_bytes().to_vec(),
                    value: value.as_bytes().to_vec(),
                    lease: lease.as_deref().map(parse_lease).transpose()?.unwrap_or(0),
                    prev_kv: *prev_kv,
                    ..Default::default()
                })
                .await?;
            let revision = resp.header.map(|h| h.revision).unwrap_or(0);
            if json_out {
                println!(
                    "{}",
                    json!({"revision": revision, "prev_kv": resp.prev_kv.as_ref().map(kv_json)})
                );
            } else {
                println!("OK (revision {revision})");
                if let Some(p) = resp.prev_kv {
                    println!("previous: {}", text(&p.value));
                }
            }
        }
        Cmd::Get {
            key,
            prefix,
            rev,
            limit,
            keys_only,
            serializable,
        } => {
            let r = client
                .get_with(
                    key,
                    GetOptions {
                        prefix: *prefix,
                        revision: *rev,
                        limit: *limit,
                        serializable: *serializable,
                        keys_only: *keys_only,
                        count_only: false,
                    },
                )
                .await?;
            if json_out {
                println!(
                    "{}",
                    json!({
                        "revision": r.revision,
                        "count": r.count,
                        "more": r.more,
                        "kvs": r.kvs.iter().map(kv_json).collect::<Vec<_>>(),
                    })
                );
            } else if *keys_only {
                for kv in &r.kvs {
                    println!("{}", text(&kv.key));
                }
            } else {
                let mut t = Table::new(&["KEY", "VALUE", "VERSION", "CREATE REV", "MOD REV"]);
                for kv in &r.kvs {
                    t.row(vec![
                        text(&kv.key),
                        text(&kv.value),
                        kv.version.to_string(),
                        kv.create_revision.to_string(),
                        kv.mod_revision.to_string(),
                    ]);
                }
                t.print();
                if r.more {
                    println!(
                        "({} of {} keys shown; raise --limit for more)",
                        r.kvs.len(),
                        r.count
                    );
                }
            }
        }
        Cmd::Del { key, prefix } => {
            let n = if *prefix {
                client.delete_prefix(key).await?
            } else {
                client.delete(key).await?
            };
            if json_out {
                println!("{}", json!({ "deleted": n }));
            } else {
                println!("deleted {n}");
            }
        }
        Cmd::Txn { file } => {
            let input = match file {
                Some(f) if f.as_os_str() != "-" => std::fs::read_to_string(f)
                    .map_err(|e| Error::Config(format!("reading {}: {e}", f.display())))?,
                _ => {
                    let mut s = String::new();
                    std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)
                        .map_err(|e| Error::Config(format!("reading stdin: {e}")))?;
                    s
                }
            };
            let txn = txn_text::parse(&input).map_err(|e| Error::Config(e.to_string()))?;
            let out = client.txn(txn).await?;
            if json_out {
                println!(
                    "{}",
                    json!({
                        "succeeded": out.succeeded,
                        "revision": out.revision,
                        "kvs": out.kvs().iter().map(kv_json).collect::<Vec<_>>(),
                    })
                );
            } else {
                println!("{}", if out.succeeded { "SUCCESS" } else { "FAILURE" });
                output::print_txn_responses(&out.responses);
            }
        }
        Cmd::Members => {
            let members = client.members().await?;
            if json_out {
                println!("{}", serde_json::to_string(&members).unwrap_or_default());
            } else {
                let mut t = Table::new(&["ID", "NAME", "PEER URLS", "CLIENT URLS", "LEARNER"]);
                for m in members {
                    t.row(vec![
                        format!("{:x}", m.id),
                        m.name,
                        m.peer_urls.join(","),
                        m.client_urls.join(","),
                        m.is_learner.to_string(),
                    ]);
                }
                t.print();
            }
        }
        Cmd::Status => {
            let all = client.status().await;
            let mut failed = Vec::new();
            if json_out {
                let v: Vec<serde_json::Value> = all
                    .iter()
                    .map(|(ep, r)| match r {
                        Ok(s) => serde_json::to_value(s).unwrap_or_default(),
                        Err(e) => json!({"endpoint": ep, "error": e.to_string()}),
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                let mut t = Table::new(&[
                    "ENDPOINT",
                    "ID",
                    "LEADER",
                    "TERM",
                    "COMMITTED",
                    "APPLIED",
                    "DB SIZE",
                    "LEARNER",
                    "ERRORS",
                ]);
                for (ep, r) in &all {
                    match r {
                        Ok(s) => t.row(vec![
                            ep.clone(),
                            format!("{:x}", s.id),
                            if s.leader == s.id {
                                "yes".into()
                            } else {
                                format!("{:x}", s.leader)
                            },
                            s.term.to_string(),
                            s.committed_index.to_string(),
                            s.applied_index.to_string(),
                            output::bytes(s.db_size),
                            s.is_learner.to_string(),
                            s.errors.join("; "),
                        ]),
                        Err(e) => t.row(vec![
                            ep.clone(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            "-".into(),
                            e.to_string(),
                        ]),
                    }
                }
                t.print();
            }
            for (ep, r) in &all {
                if let Err(e) = r {
                    failed.push(format!("{ep}: {e}"));
                }
            }
            if failed.len() == all.len() {
                return Err(Error::Unavailable(failed.join("; ")));
            }
        }
        Cmd::Compact { revision } => {
            let rev = client.compact(*revision).await?;
            if json_out {
                println!("{}", json!({"compacted": revision, "revision": rev}));
            } else {
                println!("compacted revision {revision}");
            }
        }
        Cmd::Leader => {
            let leader = client.leader().await?;
            let members = client.members().await?;
            let m = members.iter().find(|m| m.id == leader);
            if json_out {
                println!("{}", json!({"id": leader, "member": m}));
            } else {
                match m {
                    Some(m) => println!("{:x} {} {}", m.id, m.name, m.client_urls.join(",")),
                    None => println!("{leader:x}"),
                }
            }
        }
        Cmd::Reencrypt { batch_size } => {
            let (n, key) = client.reencrypt(*batch_size).await?;
            if json_out {
                println!("{}", json!({"reencrypted": n, "active_key": key}));
            } else {
                println!("re-encrypted {n} values; everything is sealed with key {key}");
            }
        }
        Cmd::Backup(BackupCmd::Save { target, s3 }) => {
            if target.starts_with("s3://") {
                let (location, b) = save_to_s3(&client, target, s3).await?;
                print_backup(std::path::Path::new(&location), &b, json_out);
            } else {
                let file = PathBuf::from(target);
                let b = client.save_backup(&file).await?;
                print_backup(&file, &b, json_out);
            }
        }
        Cmd::Token(_) | Cmd::Bench(_) | Cmd::Backup(BackupCmd::Inspect { .. }) => {}
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kvctl: cannot start: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("kvctl: {e}");
            match e {
                Error::Config(_) => ExitCode::from(2),
                _ => ExitCode::FAILURE,
            }
        }
    }
}
