//! `kvctl bench`: closed-loop load against any etcd v3 endpoints. N clients share M connections
//! spread round-robin over the endpoints; each client sends its next request when the previous
//! one answers. Prints throughput and latency percentiles, with a progress line while it runs.

use hdrhistogram::Histogram;
use raftkv_client::{Error, pb};
use serde_json::json;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tonic::transport::{Channel, Endpoint};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Workload {
    /// Writes of random keys.
    Put,
    /// Linearizable reads of random keys.
    Get,
    /// Serializable (member-local) reads of random keys.
    GetSerializable,
    /// 90% linearizable reads, 10% writes.
    Mixed,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value = "put")]
    pub workload: Workload,
    /// Concurrent clients (each waits for its previous request).
    #[arg(long, default_value_t = 16)]
    pub clients: usize,
    /// gRPC connections shared by the clients (spread over the endpoints).
    #[arg(long, default_value_t = 0, help = "default: min(clients, 64)")]
    pub conns: usize,
    /// How long to measure.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    pub duration: Duration,
    /// Unmeasured load before measuring.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub warmup: Duration,
    /// Number of distinct keys.
    #[arg(long, default_value_t = 10_000)]
    pub key_space: u64,
    /// Value size in bytes.
    #[arg(long, default_value_t = 256)]
    pub value_size: usize,
    /// Emit one JSON object instead of text.
    #[arg(long)]
    pub json: bool,
    /// Print no progress lines.
    #[arg(long)]
    pub quiet: bool,
}

fn key(n: u64) -> Vec<u8> {
    format!("bench/{n:010}").into_bytes()
}

struct Shared {
    conns: Vec<Channel>,
    token: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>,
    value: Vec<u8>,
    key_space: u64,
    ops: AtomicU64,
    errors: AtomicU64,
    /// Slowest answer since the last progress line, in microseconds: a stall shows up in the
    /// second it happened instead of only in the run's tail percentiles.
    slowest: AtomicU64,
    measuring: AtomicBool,
    stop: AtomicBool,
    last_error: std::sync::Mutex<Option<String>>,
}

impl Shared {
    fn req<T>(&self, msg: T) -> tonic::Request<T> {
        let mut r = tonic::Request::new(msg);
        r.set_timeout(Duration::from_secs(10));
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        r
    }

    async fn one(
        &self,
        kv: &mut pb::kv_client::KvClient<Channel>,
        write: bool,
        serializable: bool,
    ) -> Result<(), tonic::Status> {
        let k = key(rand::random_range(0..self.key_space));
        if write {
            kv.put(self.req(pb::PutRequest {
                key: k,
                value: self.value.clone(),
                ..Default::default()
            }))
            .await?;
        } else {
            kv.range(self.req(pb::RangeRequest {
                key: k,
                serializable,
                ..Default::default()
            }))
            .await?;
        }
        Ok(())
    }
}

async fn client_loop(shared: Arc<Shared>, idx: usize, workload: Workload) -> Histogram<u64> {
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds");
    let mut kv = pb::kv_client::KvClient::new(shared.conns[idx % shared.conns.len()].clone())
        .max_decoding_message_size(64 << 20);
    while !shared.stop.load(Ordering::Relaxed) {
        let (write, serializable) = match workload {
            Workload::Put => (true, false),
            Workload::Get => (false, false),
            Workload::GetSerializable => (false, true),
            Workload::Mixed => (rand::random_range(0..10) == 0, false),
        };
        let started = Instant::now();
        let res = shared.one(&mut kv, write, serializable).await;
        let took = started.elapsed().as_micros() as u64;
        if !shared.measuring.load(Ordering::Relaxed) {
            continue;
        }
        match res {
            Ok(()) => {
                let _ = hist.record(took.max(1));
                shared.slowest.fetch_max(took, Ordering::Relaxed);
                shared.ops.fetch_add(1, Ordering::Relaxed);
            }
            Err(s) => {
                shared.errors.fetch_add(1, Ordering::Relaxed);
                if let Ok(mut e) = shared.last_error.lock() {
                    *e = Some(format!("{:?}: {}", s.code(), s.message()));
                }
            }
        }
    }
    hist
}

/// Concurrent writers filling the key space before a read or mixed workload.
const PRELOAD_PARALLEL: usize = 64;

/// Writes every key of the key space once. It is not measured, so it runs wide whatever the
/// measured concurrency: a one-client run would otherwise spend minutes on it.
async fn preload(shared: &Arc<Shared>) -> Result<(), Error> {
    let next = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for i in 0..PRELOAD_PARALLEL {
        let shared = shared.clone();
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut kv = pb::kv_client::KvClient::new(shared.conns[i % shared.conns.len()].clone());
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= shared.key_space {
                    return Ok(());
                }
                kv.put(shared.req(pb::PutRequest {
                    key: key(n),
                    value: shared.value.clone(),
                    ..Default::default()
                }))
                .await
                .map_err(|s| Error::Server {
                    code: s.code(),
                    message: format!("preloading keys: {}", s.message()),
                })?;
            }
        }));
    }
    for t in tasks {
        t.await.map_err(|e| Error::Config(e.to_string()))??;
    }
    Ok(())
}

pub async fn run(endpoints: &[String], token: Option<String>, a: &BenchArgs) -> Result<(), Error> {
    if a.clients == 0 || a.key_space == 0 {
        return Err(Error::Config(
            "--clients and --key-space must be positive".into(),
        ));
    }
    let nconns = if a.conns == 0 {
        a.clients.min(64)
    } else {
        a.conns
    };
    let mut conns = Vec::with_capacity(nconns);
    for i in 0..nconns {
        let ep = &endpoints[i % endpoints.len()];
        let url = if ep.contains("://") {
            ep.clone()
        } else {
            format!("http://{ep}")
        };
        let ch = Endpoint::from_shared(url.clone())
            .map_err(|e| Error::Config(format!("endpoint {url}: {e}")))?
            .tcp_nodelay(true)
            .connect()
            .await
            .map_err(|e| Error::Unavailable(format!("{url}: {e}")))?;
        conns.push(ch);
    }
    let token =
        match token {
            Some(t) => Some(format!("Bearer {}", t.trim()).parse().map_err(|_| {
                Error::Config("token has characters not allowed in metadata".into())
            })?),
            None => None,
        };
    let shared = Arc::new(Shared {
        conns,
        token,
        value: (0..a.value_size).map(|i| b'a' + (i % 26) as u8).collect(),
        key_space: a.key_space,
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        slowest: AtomicU64::new(0),
        measuring: AtomicBool::new(false),
        stop: AtomicBool::new(false),
        last_error: std::sync::Mutex::new(None),
    });
    if a.workload != Workload::Put {
        preload(&shared).await?;
    }
    let tasks: Vec<_> = (0..a.clients)
        .map(|i| tokio::spawn(client_loop(shared.clone(), i, a.workload)))
        .collect();
    tokio::time::sleep(a.warmup).await;
    shared.measuring.store(true, Ordering::Relaxed);
    let started = Instant::now();
    let mut last_ops = 0;
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    while started.elapsed() < a.duration {
        tick.tick().await;
        let ops = shared.ops.load(Ordering::Relaxed);
        let slowest = shared.slowest.swap(0, Ordering::Relaxed);
        if !a.quiet {
            eprintln!(
                "[{:>3}s] {:>8} ops/s  slowest {:>8.2} ms  errors {}",
                started.elapsed().as_secs(),
                ops - last_ops,
                slowest as f64 / 1000.0,
                shared.errors.load(Ordering::Relaxed)
            );
        }
        last_ops = ops;
    }
    shared.measuring.store(false, Ordering::Relaxed);
    let elapsed = started.elapsed();
    shared.stop.store(true, Ordering::Relaxed);
    let mut hist =
        Histogram::<u64>::new_with_bounds(1, 60_000_000, 3).expect("static histogram bounds");
    for t in tasks {
        if let Ok(h) = t.await {
            let _ = hist.add(h);
        }
    }
    let ops = shared.ops.load(Ordering::Relaxed);
    let errors = shared.errors.load(Ordering::Relaxed);
    let ops_per_sec = ops as f64 / elapsed.as_secs_f64();
    let ms = |q: f64| hist.value_at_quantile(q) as f64 / 1000.0;
    let workload = format!("{:?}", a.workload).to_lowercase();
    if a.json {
        println!(
            "{}",
            json!({
                "workload": workload,
                "clients": a.clients,
                "conns": nconns,
                "ops": ops,
                "errors": errors,
                "seconds": elapsed.as_secs_f64(),
                "ops_per_sec": ops_per_sec,
                "p50_ms": ms(0.5),
                "p99_ms": ms(0.99),
                "p999_ms": ms(0.999),
                "max_ms": hist.max() as f64 / 1000.0,
            })
        );
    } else {
        println!(
            "{workload}: {} clients over {nconns} connections, {:.1}s: {:.0} ops/s, p50 {:.2} ms, p99 {:.2} ms, p999 {:.2} ms, {errors} errors",
            a.clients,
            elapsed.as_secs_f64(),
            ops_per_sec,
            ms(0.5),
            ms(0.99),
            ms(0.999)
        );
    }
    if let Ok(e) = shared.last_error.lock()
        && let Some(e) = e.as_ref()
    {
        eprintln!("last error: {e}");
    }
    if ops == 0 {
        return Err(Error::Unavailable("no request succeeded".into()));
    }
    Ok(())
}
