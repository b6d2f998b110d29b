//! Password logins under attack: failed attempts are limited per client address, bcrypt runs
//! on a bounded number of threads, and an unknown user name costs the same verification as a
//! known one, so neither timing nor volume turns `Authenticate` into an oracle or a CPU sink.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tonic::Status;

/// Failed logins one address may make in a burst, and how fast that allowance comes back.
pub const FAILURE_BURST: f64 = 10.0;
pub const FAILURES_PER_SECOND: f64 = 1.0;
/// Addresses tracked at once; beyond this the oldest allowances are forgotten.
const TRACKED_ADDRESSES: usize = 65_536;
/// How long a login may wait for a bcrypt slot before it is turned away.
const QUEUE_WAIT: Duration = Duration::from_secs(5);

struct Bucket {
    tokens: f64,
    at: Instant,
}

pub struct LoginGuard {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    bcrypt: Arc<Semaphore>,
}

impl Default for LoginGuard {
    fn default() -> Self {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        LoginGuard {
            buckets: Mutex::new(HashMap::new()),
            bcrypt: Arc::new(Semaphore::new(threads)),
        }
    }
}

/// A bcrypt hash of a random password, verified against when there is no real hash, so that
/// "no such user" takes as long as "wrong password".
fn decoy_hash() -> &'static str {
    static DECOY: OnceLock<String> = OnceLock::new();
    DECOY.get_or_init(|| {
        let pw: [u8; 16] = rand::random();
        super::password::hash(&hex::encode(pw)).unwrap_or_default()
    })
}

impl LoginGuard {
    fn refill(b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * FAILURES_PER_SECOND).min(FAILURE_BURST);
        b.at = now;
    }

    /// Refuses a login from an address that used up its failures.
    pub fn admit(&self, from: Option<IpAddr>) -> Result<(), Status> {
        let Some(ip) = from else { return Ok(()) };
        let Ok(mut map) = self.buckets.lock() else {
            return Ok(());
        };
        let Some(b) = map.get_mut(&ip) else {
            return Ok(());
        };
        Self::refill(b, Instant::now());
        if b.tokens < 1.0 {
            let wait = ((1.0 - b.tokens) / FAILURES_PER_SECOND).ceil() as u64;
            return Err(Status::resource_exhausted(format!(
                "etcdserver: too many failed logins from this address; retry in {wait} s"
            )));
        }
        Ok(())
    }

    /// Counts a failed login against its address.
    pub fn failed(&self, from: Option<IpAddr>) {
        let Some(ip) = from else { return };
        let Ok(mut map) = self.buckets.lock() else {
            return;
        };
        let now = Instant::now();
        if map.len() >= TRACKED_ADDRESSES && !map.contains_key(&ip) {
            // Forget addresses whose allowance is whole again; if none, start over.
            map.retain(|_, b| {
                Self::refill(b, now);
                b.tokens < FAILURE_BURST
            });
            if map.len() >= TRACKED_ADDRESSES {
                map.clear();
            }
        }
        let b = map.entry(ip).or_insert(Bucket {
            tokens: FAILURE_BURST,
            at: now,
        });
        Self::refill(b, now);
        b.tokens = (b.tokens - 1.0).max(0.0);
    }

    /// Checks `password` against `hash` (or the decoy when there is none) on a bounded pool.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, String> {
        let permit = tokio::time::timeout(QUEUE_WAIT, self.bcrypt.clone().acquire_owned())
            .await
            .map_err(|_| "etcdserver: too many logins in progress; retry".to_string())?
            .map_err(|e| e.to_string())?;
        let real = hash.is_some();
        let hash = hash.unwrap_or_else(|| decoy_hash().to_string());
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            super::password::verify(&password, &hash)
        })
        .await
        .map_err(|e| e.to_string())?;
        Ok(ok && real)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_are_limited_per_address_and_come_back() {
        let g = LoginGuard::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        for _ in 0..FAILURE_BURST as usize {
            assert!(g.admit(Some(a)).is_ok());
            g.failed(Some(a));
        }
        let e = g.admit(Some(a)).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(g.admit(Some(b)).is_ok(), "other addresses are unaffected");
        if let Ok(mut m) = g.buckets.lock()
            && let Some(bk) = m.get_mut(&a)
        {
            bk.at -= Duration::from_secs(2);
        }
        assert!(g.admit(Some(a)).is_ok(), "the allowance refills");
    }

    #[tokio::test]
    async fn an_unknown_user_is_verified_against_a_decoy() {
        let g = LoginGuard::default();
        let h = super::super::password::hash("pw").unwrap();
        assert!(g.verify("pw".into(), Some(h.clone())).await.unwrap());
        assert!(!g.verify("no".into(), Some(h)).await.unwrap());
        let started = Instant::now();
        assert!(!g.verify("pw".into(), None).await.unwrap());
        // bcrypt at cost 10 takes tens of milliseconds; an instant answer would be the oracle.
        assert!(started.elapsed() > Duration::from_millis(5));
    }
}
