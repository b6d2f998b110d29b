//! Batching of read-index requests: callers that arrive while a round to the quorum is in
//! flight share the next round, so one heartbeat exchange serves any number of concurrent
//! linearizable reads.

use super::ProposeError;
use std::future::Future;
use std::sync::{Arc, Mutex};
use tokio::sync::oneshot;

type Waiter = oneshot::Sender<Result<u64, ProposeError>>;

#[derive(Default)]
struct State {
    running: bool,
    waiters: Vec<Waiter>,
}

#[derive(Default, Clone)]
pub struct ReadBatcher {
    state: Arc<Mutex<State>>,
}

impl ReadBatcher {
    /// Joins the next round; `fetch` runs one round (started only after every caller in the
    /// round arrived, which is what makes the returned index safe for all of them).
    pub async fn run<F, Fut>(&self, fetch: F) -> Result<u64, ProposeError>
    where
        F: Fn() -> Fut + Send + 'static,
        Fut: Future<Output = Result<u64, ProposeError>> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let start = {
            let mut s = self.state.lock().map_err(|_| ProposeError::Stopped)?;
            s.waiters.push(tx);
            !std::mem::replace(&mut s.running, true)
        };
        if start {
            let state = self.state.clone();
            tokio::spawn(async move {
                loop {
                    let batch = {
                        let Ok(mut s) = state.lock() else { return };
                        if s.waiters.is_empty() {
                            s.running = false;
                            return;
                        }
                        std::mem::take(&mut s.waiters)
                    };
                    let res = fetch().await;
                    for w in batch {
                        let _ = w.send(res.clone());
                    }
                }
            });
        }
        rx.await.unwrap_or(Err(ProposeError::Stopped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    #[tokio::test]
    async fn concurrent_callers_share_rounds() {
        let b = ReadBatcher::default();
        let rounds = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        for _ in 0..50 {
            let b = b.clone();
            let rounds = rounds.clone();
            tasks.push(tokio::spawn(async move {
                b.run(move || {
                    let rounds = rounds.clone();
                    async move {
                        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
                        Ok(rounds.fetch_add(1, Ordering::SeqCst) + 1)
                    }
                })
                .await
            }));
        }
        for t in tasks {
            assert!(t.await.unwrap().unwrap() >= 1);
        }
        let n = rounds.load(Ordering::SeqCst);
        assert!((1..=2).contains(&n), "50 concurrent reads took {n} rounds");
    }
}
