//! `Retrying`: retries an object store's transient failures (`Throttled`, `Unavailable`) with
//! exponential backoff and full jitter; every other error (`Auth`, `NotFound`, `Invalid`, ...)
//! goes straight back to the caller. The backends do no retrying of their own.
//!
//! A retried `put_if_absent` can meet its own earlier attempt: an attempt that failed
//! transiently may still have created the object (the reply was lost). So an `Exists` after a
//! failed attempt reads the object back: the same bytes count as `Created`, since our
//! attempt made it or another writer wrote exactly these bytes, which is the same outcome.

use std::future::Future;
use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{ListPage, ObjectError, ObjectInfo, ObjectStore, PutIfAbsent, Result};

/// How `Retrying` backs off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryConfig {
    /// Calls made at most per operation, the first included (default 8).
    pub max_attempts: u32,
    /// The ceiling of the first backoff; it doubles per retry (default 50 ms).
    pub base_delay: Duration,
    /// The largest ceiling (default 5 s).
    pub max_delay: Duration,
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig { max_attempts: 8, base_delay: Duration::from_millis(50), max_delay: Duration::from_secs(5) }
    }
}

/// The ceiling of the backoff before retry number `retry` (0 for the first retry):
/// `min(max_delay, base_delay * 2^retry)`.
pub fn backoff_ceiling(config: &RetryConfig, retry: u32) -> Duration {
    let factor = 1u32.checked_shl(retry).unwrap_or(u32::MAX);
    config.base_delay.saturating_mul(factor).min(config.max_delay)
}

/// Full jitter: a delay drawn uniformly from `[0, ceiling]`.
pub fn full_jitter(ceiling: Duration, rng: &mut impl Rng) -> Duration {
    let nanos = u64::try_from(ceiling.as_nanos()).unwrap_or(u64::MAX);
    Duration::from_nanos(rng.gen_range(0..=nanos))
}

/// An object store whose transient failures are retried.
#[derive(Debug)]
pub struct Retrying<S> {
    inner: S,
    config: RetryConfig,
    rng: Mutex<SmallRng>,
    retries: AtomicU64,
}

impl<S: ObjectStore> Retrying<S> {
    /// Wraps `inner`, with jitter drawn from a generator seeded by the OS.
    pub fn new(inner: S, config: RetryConfig) -> Self {
        Self::with_rng(inner, config, SmallRng::from_entropy())
    }

    /// Wraps `inner`, with jitter drawn from `rng` (seeded by a test for repeatable delays).
    pub fn with_rng(inner: S, config: RetryConfig, rng: SmallRng) -> Self {
        Retrying { inner, config, rng: Mutex::new(rng), retries: AtomicU64::new(0) }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// Retries made so far, over all calls (a metric).
    pub fn retries(&self) -> u64 {
        self.retries.load(Ordering::Relaxed)
    }

    fn next_delay(&self, retry: u32) -> Duration {
        let ceiling = backoff_ceiling(&self.config, retry);
        // A poisoned lock only means another caller panicked mid-draw; the generator's state
        // is still a valid generator state.
        let mut rng = self.rng.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        full_jitter(ceiling, &mut *rng)
    }

    /// Runs `call` until it succeeds, fails for good, or runs out of attempts. Returns the
    /// result and whether an earlier attempt failed transiently (so may have taken effect).
    async fn run<T, F, Fut>(&self, op: &'static str, key: &str, mut call: F) -> (Result<T>, bool)
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T>>,
    {
        let max_attempts = self.config.max_attempts.max(1);
        let mut attempt = 1;
        loop {
            let err = match call().await {
                Ok(v) => return (Ok(v), attempt > 1),
                Err(e) => e,
            };
            if !err.is_retryable() || attempt >= max_attempts {
                return (Err(err), attempt > 1);
            }
            let delay = self.next_delay(attempt - 1);
            if attempt == 1 {
                tracing::warn!(store = %self.inner.describe(), op, key, error = %err, "object store call failed, retrying");
            } else {
                tracing::debug!(op, key, attempt, error = %err, delay_ms = delay.as_millis() as u64, "retrying again");
            }
            self.retries.fetch_add(1, Ordering::Relaxed);
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for Retrying<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        self.run("put", key, || self.inner.put(key, body.clone())).await.0
    }

    async fn put_if_absent(&self, key: &str, body: Bytes) -> Result<PutIfAbsent> {
        let (result, retried) = self.run("put_if_absent", key, || self.inner.put_if_absent(key, body.clone())).await;
        match result {
            Ok(PutIfAbsent::Exists) if retried => {
                let (there, _) = self.run("get", key, || self.inner.get(key, None)).await;
                match there {
                    Ok(there) if there == body => Ok(PutIfAbsent::Created),
                    Ok(_) => Ok(PutIfAbsent::Exists),
                    // Deleted since: what was there is gone, so "exists" is as true as any
                    // answer; the caller reads it again if it cares.
                    Err(ObjectError::NotFound(_)) => Ok(PutIfAbsent::Exists),
                    Err(e) => Err(e),
                }
            }
            other => other,
        }
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        self.run("get", key, || self.inner.get(key, range.clone())).await.0
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.run("head", key, || self.inner.head(key)).await.0
    }

    async fn list(&self, prefix: &str, next: Option<String>, limit: usize) -> Result<ListPage> {
        self.run("list", prefix, || self.inner.list(prefix, next.clone(), limit)).await.0
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.run("delete", key, || self.inner.delete(key)).await.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(base_ms: u64, cap_ms: u64) -> RetryConfig {
        RetryConfig {
            max_attempts: 8,
            base_delay: Duration::from_millis(base_ms),
            max_delay: Duration::from_millis(cap_ms),
        }
    }

    #[test]
    fn ceiling_doubles_up_to_the_cap() {
        let c = RetryConfig::default();
        let ceilings: Vec<u128> = (0..10).map(|r| backoff_ceiling(&c, r).as_millis()).collect();
        assert_eq!(ceilings, [50, 100, 200, 400, 800, 1600, 3200, 5000, 5000, 5000]);
    }

    #[test]
    fn ceiling_does_not_overflow() {
        let c = config(50, 5000);
        assert_eq!(backoff_ceiling(&c, 31), Duration::from_secs(5));
        assert_eq!(backoff_ceiling(&c, 32), Duration::from_secs(5));
        assert_eq!(backoff_ceiling(&c, u32::MAX), Duration::from_secs(5));
        let huge = RetryConfig { max_attempts: 8, base_delay: Duration::MAX, max_delay: Duration::MAX };
        assert_eq!(backoff_ceiling(&huge, 3), Duration::MAX);
    }

    #[test]
    fn jitter_stays_within_the_ceiling_and_spreads() {
        let mut rng = SmallRng::seed_from_u64(7);
        let ceiling = Duration::from_millis(100);
        let draws: Vec<Duration> = (0..10_000).map(|_| full_jitter(ceiling, &mut rng)).collect();
        assert!(draws.iter().all(|d| *d <= ceiling));
        let mean_ms = draws.iter().map(|d| d.as_secs_f64() * 1000.0).sum::<f64>() / draws.len() as f64;
        assert!((45.0..55.0).contains(&mean_ms), "mean of full jitter over [0, 100 ms] is {mean_ms} ms");
        assert!(draws.iter().any(|d| *d < Duration::from_millis(10)));
        assert!(draws.iter().any(|d| *d > Duration::from_millis(90)));
        assert_eq!(full_jitter(Duration::ZERO, &mut rng), Duration::ZERO);
    }

    #[test]
    fn jitter_is_repeatable_with_a_seed() {
        let c = RetryConfig::default();
        let draw = |seed| {
            let mut rng = SmallRng::seed_from_u64(seed);
            (0..8).map(|r| full_jitter(backoff_ceiling(&c, r), &mut rng)).collect::<Vec<_>>()
        };
        assert_eq!(draw(42), draw(42));
        assert_ne!(draw(42), draw(43));
    }
}
