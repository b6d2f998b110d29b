//! Password logins under attack: failed attempts are limited per client address (per /64 for
//! IPv6), counted from the moment a login starts so a burst sent at once gets no more guesses;
//! bcrypt runs on a bounded number of threads (a full queue is ResourceExhausted), and an
//! unknown user name costs the same verification as a known one, so neither timing nor volume
//! turns `Authenticate` into an oracle or a CPU sink. There is deliberately no cluster-wide
//! failure budget: one attacker could spend it and lock every user out.
//!
//! A password that verified against a user's current hash is remembered for a while (as a
//! keyed digest, never in the clear), so clients that reconnect and log in again (a benchmark's
//! hundreds of connections, every client of a member that restarted) cost a digest instead of
//! a bcrypt each. Only successes are remembered: a wrong password always pays for bcrypt, and
//! answers as slowly as before, so timing tells nothing the answer does not. A changed
//! password has a new hash, which no remembered digest matches.

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

/// How long a verified password is remembered, and for how many logins at most.
const REMEMBER_FOR: Duration = Duration::from_secs(600);
const REMEMBERED: usize = 4096;

pub struct LoginGuard {
    buckets: Mutex<HashMap<IpAddr, Bucket>>,
    bcrypt: Arc<Semaphore>,
    /// Digests of (hash, password) pairs that verified, keyed with `secret`, and when.
    verified: Mutex<HashMap<[u8; 32], Instant>>,
    secret: [u8; 32],
    /// Passwords checked with bcrypt so far.
    bcrypt_runs: std::sync::atomic::AtomicU64,
}

impl Default for LoginGuard {
    fn default() -> Self {
        let threads = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(2);
        LoginGuard {
            buckets: Mutex::new(HashMap::new()),
            bcrypt: Arc::new(Semaphore::new(threads)),
            verified: Mutex::new(HashMap::new()),
            secret: rand::random(),
            bcrypt_runs: std::sync::atomic::AtomicU64::new(0),
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

/// The address a login's allowance is kept under: the host for IPv4, the /64 for IPv6 (one
/// host is commonly handed a whole /64, so single IPv6 addresses would be free to rotate).
fn allowance_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
    }
}

/// One login in progress, charged against its address's allowance from the start, so that
/// many attempts sent at once cannot all pass before the first failure is counted. Unless it is
/// marked failed, dropping it gives the allowance back.
pub struct Attempt<'a> {
    guard: &'a LoginGuard,
    key: Option<IpAddr>,
    failed: bool,
}

impl Attempt<'_> {
    /// The password was wrong: the charge stays.
    pub fn failed(mut self) {
        self.failed = true;
    }
}

impl Drop for Attempt<'_> {
    fn drop(&mut self) {
        if self.failed {
            return;
        }
        let Some(key) = self.key else { return };
        if let Ok(mut map) = self.guard.buckets.lock()
            && let Some(b) = map.get_mut(&key)
        {
            b.tokens = (b.tokens + 1.0).min(FAILURE_BURST);
        }
    }
}

impl LoginGuard {
    fn refill(b: &mut Bucket, now: Instant) {
        let elapsed = now.saturating_duration_since(b.at).as_secs_f64();
        b.tokens = (b.tokens + elapsed * FAILURES_PER_SECOND).min(FAILURE_BURST);
        b.at = now;
    }

    /// Starts a login from `from`, or refuses it when the address used up its allowance.
    pub fn admit(&self, from: Option<IpAddr>) -> Result<Attempt<'_>, Status> {
        let unlimited = Attempt {
            guard: self,
            key: None,
            failed: false,
        };
        let Some(key) = from.map(allowance_key) else {
            return Ok(unlimited);
        };
        let Ok(mut map) = self.buckets.lock() else {
            return Ok(unlimited);
        };
        let now = Instant::now();
        if map.len() >= TRACKED_ADDRESSES && !map.contains_key(&key) {
            // Forget addresses whose allowance is whole again; if none, start over.
            map.retain(|_, b| {
                Self::refill(b, now);
                b.tokens < FAILURE_BURST
            });
            if map.len() >= TRACKED_ADDRESSES {
                map.clear();
            }
        }
        let b = map.entry(key).or_insert(Bucket {
            tokens: FAILURE_BURST,
            at: now,
        });
        Self::refill(b, now);
        if b.tokens < 1.0 {
            let wait = ((1.0 - b.tokens) / FAILURES_PER_SECOND).ceil() as u64;
            return Err(Status::resource_exhausted(format!(
                "etcdserver: too many failed logins from this address; retry in {wait} s"
            )));
        }
        b.tokens -= 1.0;
        Ok(Attempt {
            guard: self,
            key: Some(key),
            failed: false,
        })
    }

    /// The key a verified (hash, password) pair is remembered under.
    fn digest(&self, hash: &str, password: &str) -> [u8; 32] {
        use sha2::{Digest, Sha256};
        let mut d = Sha256::new();
        d.update(self.secret);
        d.update((hash.len() as u64).to_be_bytes());
        d.update(hash.as_bytes());
        d.update(password.as_bytes());
        d.finalize().into()
    }

    fn remembered(&self, key: &[u8; 32]) -> bool {
        let Ok(mut v) = self.verified.lock() else {
            return false;
        };
        match v.get(key) {
            Some(at) if at.elapsed() < REMEMBER_FOR => true,
            Some(_) => {
                v.remove(key);
                false
            }
            None => false,
        }
    }

    fn remember(&self, key: [u8; 32]) {
        let Ok(mut v) = self.verified.lock() else {
            return;
        };
        if v.len() >= REMEMBERED {
            v.retain(|_, at| at.elapsed() < REMEMBER_FOR);
            if v.len() >= REMEMBERED {
                v.clear();
            }
        }
        v.insert(key, Instant::now());
    }

    /// Checks `password` against `hash` (or the decoy when there is none) on a bounded pool.
    pub async fn verify(&self, password: String, hash: Option<String>) -> Result<bool, Status> {
        let key = hash.as_deref().map(|h| self.digest(h, &password));
        if key.as_ref().is_some_and(|k| self.remembered(k)) {
            return Ok(true);
        }
        let permit = tokio::time::timeout(QUEUE_WAIT, self.bcrypt.clone().acquire_owned())
            .await
            .map_err(|_| {
                Status::resource_exhausted("etcdserver: too many logins in progress; retry")
            })?
            .map_err(|e| Status::internal(e.to_string()))?;
        self.bcrypt_runs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let real = hash.is_some();
        let hash = hash.unwrap_or_else(|| decoy_hash().to_string());
        let ok = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            super::password::verify(&password, &hash)
        })
        .await
        .map_err(|e| Status::internal(format!("verifying a password: {e}")))?;
        if ok && let Some(k) = key {
            self.remember(k);
        }
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
            g.admit(Some(a)).unwrap().failed();
        }
        let e = g.admit(Some(a)).err().unwrap();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(g.admit(Some(b)).is_ok(), "other addresses are unaffected");
        if let Ok(mut m) = g.buckets.lock()
            && let Some(bk) = m.get_mut(&a)
        {
            bk.at -= Duration::from_secs(2);
        }
        assert!(g.admit(Some(a)).is_ok(), "the allowance refills");
    }

    #[test]
    fn attempts_in_flight_are_charged_and_successes_refunded() {
        let g = LoginGuard::default();
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        // Sent at once, before any answer: only the allowance gets through.
        let in_flight: Vec<_> = (0..FAILURE_BURST as usize)
            .map(|_| g.admit(Some(a)).unwrap())
            .collect();
        assert!(g.admit(Some(a)).is_err());
        // Logins that succeed (or never got to the password) cost nothing.
        drop(in_flight);
        for _ in 0..100 {
            drop(g.admit(Some(a)).unwrap());
        }
    }

    #[test]
    fn an_ipv6_host_cannot_rotate_through_its_64() {
        let g = LoginGuard::default();
        for i in 0..FAILURE_BURST as u16 {
            let ip = IpAddr::V6(std::net::Ipv6Addr::new(0x2001, 0xdb8, 1, 2, 0, 0, 0, i + 1));
            g.admit(Some(ip)).unwrap().failed();
        }
        let next: IpAddr = "2001:db8:1:2::ffff".parse().unwrap();
        assert!(g.admit(Some(next)).is_err());
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(g.admit(Some(other)).is_ok());
    }

    #[tokio::test]
    async fn a_verified_password_is_remembered_only_for_its_hash_and_wrong_ones_pay_bcrypt() {
        let g = LoginGuard::default();
        let h = super::super::password::hash("pw").unwrap();
        assert!(g.verify("pw".into(), Some(h.clone())).await.unwrap());
        let runs = || g.bcrypt_runs.load(std::sync::atomic::Ordering::Relaxed);
        assert_eq!(runs(), 1);
        // Again: remembered, so no bcrypt.
        for _ in 0..20 {
            assert!(g.verify("pw".into(), Some(h.clone())).await.unwrap());
        }
        assert_eq!(runs(), 1);
        // A wrong password is never answered from memory.
        assert!(!g.verify("pW".into(), Some(h.clone())).await.unwrap());
        assert_eq!(runs(), 2);
        // The same password against a new hash (the password was set again) is verified anew.
        let h2 = super::super::password::hash("other").unwrap();
        assert!(!g.verify("pw".into(), Some(h2)).await.unwrap());
        assert_eq!(runs(), 3);
        // The decoy of an unknown user never passes, remembered or not.
        assert!(!g.verify("pw".into(), None).await.unwrap());
        assert_eq!(runs(), 4);
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
