//! `Faulty`: an object store that fails and stalls on purpose, for reliability tests.
//!
//! With a seeded generator, each call fails with a fraction `fail_rate` (half of those
//! `Unavailable`, half `Throttled`; half of them before the wrapped call runs, half after it
//! has run and succeeded, so the caller cannot tell whether a put happened), and is delayed
//! by `delay` with a fraction `delay_rate` of the rest. `set_down(true)` makes every call fail
//! with `Unavailable` without reaching the wrapped store, as an unreachable bucket does.

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use super::{ListPage, ObjectError, ObjectInfo, ObjectStore, PutIfAbsent, Result};

/// What `Faulty` injects.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FaultConfig {
    /// Fraction of calls, in `[0, 1]`, that fail.
    pub fail_rate: f64,
    /// Fraction of the calls that do not fail, in `[0, 1]`, that are delayed by `delay`.
    pub delay_rate: f64,
    pub delay: Duration,
    /// Seeds the generator that decides, so a failing run can be replayed.
    pub seed: u64,
}

/// The fate of one call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    Pass,
    Delay,
    /// Fail without calling the wrapped store.
    FailBefore {
        throttled: bool,
    },
    /// Call the wrapped store, then fail whatever it answered.
    FailAfter {
        throttled: bool,
    },
}

/// An object store wrapper that injects failures and delays.
#[derive(Debug)]
pub struct Faulty<S> {
    inner: S,
    config: FaultConfig,
    rng: Mutex<SmallRng>,
    down: AtomicBool,
    injected: AtomicU64,
}

impl<S: ObjectStore> Faulty<S> {
    pub fn new(inner: S, config: FaultConfig) -> Self {
        Faulty {
            inner,
            rng: Mutex::new(SmallRng::seed_from_u64(config.seed)),
            config,
            down: AtomicBool::new(false),
            injected: AtomicU64::new(0),
        }
    }

    /// The wrapped store.
    pub fn inner(&self) -> &S {
        &self.inner
    }

    /// While `down`, every call fails with `Unavailable` (the bucket is unreachable).
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    /// Failures injected so far (down calls included).
    pub fn injected_failures(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn fate(&self) -> Fate {
        // A poisoned lock only means another caller panicked mid-draw; the generator's state
        // is still a valid generator state.
        let mut rng = self.rng.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        if rng.gen_bool(self.config.fail_rate.clamp(0.0, 1.0)) {
            let throttled = rng.gen_bool(0.5);
            if rng.gen_bool(0.5) { Fate::FailBefore { throttled } } else { Fate::FailAfter { throttled } }
        } else if rng.gen_bool(self.config.delay_rate.clamp(0.0, 1.0)) {
            Fate::Delay
        } else {
            Fate::Pass
        }
    }

    fn injected_error(&self, op: &str, key: &str, throttled: bool, after: bool) -> ObjectError {
        self.injected.fetch_add(1, Ordering::Relaxed);
        let when = if after { "after the call" } else { "before the call" };
        let detail = format!("injected fault {when} op={op} key={key}");
        if throttled { ObjectError::Throttled(detail) } else { ObjectError::Unavailable(detail) }
    }

    /// Runs `call` under the next fate.
    async fn with_faults<T>(&self, op: &str, key: &str, call: impl Future<Output = Result<T>>) -> Result<T> {
        if self.down.load(Ordering::SeqCst) {
            self.injected.fetch_add(1, Ordering::Relaxed);
            return Err(ObjectError::Unavailable(format!("injected fault: store is down op={op} key={key}")));
        }
        match self.fate() {
            Fate::Pass => call.await,
            Fate::Delay => {
                tokio::time::sleep(self.config.delay).await;
                call.await
            }
            Fate::FailBefore { throttled } => Err(self.injected_error(op, key, throttled, false)),
            Fate::FailAfter { throttled } => {
                call.await?;
                Err(self.injected_error(op, key, throttled, true))
            }
        }
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for Faulty<S> {
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        self.with_faults("put", key, self.inner.put(key, body)).await
    }

    async fn put_if_absent(&self, key: &str, body: Bytes) -> Result<PutIfAbsent> {
        self.with_faults("put_if_absent", key, self.inner.put_if_absent(key, body)).await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        self.with_faults("get", key, self.inner.get(key, range)).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        self.with_faults("head", key, self.inner.head(key)).await
    }

    async fn list(&self, prefix: &str, next: Option<String>, limit: usize) -> Result<ListPage> {
        self.with_faults("list", prefix, self.inner.list(prefix, next, limit)).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        self.with_faults("delete", key, self.inner.delete(key)).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nothing;

    #[async_trait]
    impl ObjectStore for Nothing {
        fn describe(&self) -> String {
            "nothing".into()
        }
        async fn put(&self, _: &str, _: Bytes) -> Result<()> {
            Ok(())
        }
        async fn put_if_absent(&self, _: &str, _: Bytes) -> Result<PutIfAbsent> {
            Ok(PutIfAbsent::Created)
        }
        async fn get(&self, _: &str, _: Option<Range<u64>>) -> Result<Bytes> {
            Ok(Bytes::new())
        }
        async fn head(&self, _: &str) -> Result<Option<ObjectInfo>> {
            Ok(None)
        }
        async fn list(&self, _: &str, _: Option<String>, _: usize) -> Result<ListPage> {
            Ok(ListPage::default())
        }
        async fn delete(&self, _: &str) -> Result<()> {
            Ok(())
        }
    }

    fn faulty(fail_rate: f64, delay_rate: f64, seed: u64) -> Faulty<Nothing> {
        Faulty::new(Nothing, FaultConfig { fail_rate, delay_rate, delay: Duration::from_millis(1), seed })
    }

    #[test]
    fn fates_follow_the_rates() {
        let f = faulty(0.3, 0.5, 1);
        let fates: Vec<Fate> = (0..10_000).map(|_| f.fate()).collect();
        let count = |p: fn(&Fate) -> bool| fates.iter().filter(|f| p(f)).count();
        let failed = count(|f| matches!(f, Fate::FailBefore { .. } | Fate::FailAfter { .. }));
        let after = count(|f| matches!(f, Fate::FailAfter { .. }));
        let throttled =
            count(|f| matches!(f, Fate::FailBefore { throttled: true } | Fate::FailAfter { throttled: true }));
        let delayed = count(|f| *f == Fate::Delay);
        assert!((2700..3300).contains(&failed), "failed={failed}");
        assert!((failed * 4 / 10..failed * 6 / 10).contains(&after), "after={after} failed={failed}");
        assert!((failed * 4 / 10..failed * 6 / 10).contains(&throttled), "throttled={throttled} failed={failed}");
        assert!((3200..3800).contains(&delayed), "delayed={delayed}");
    }

    #[test]
    fn same_seed_same_fates() {
        let a: Vec<Fate> = (0..100)
            .map({
                let f = faulty(0.5, 0.5, 9);
                move |_| f.fate()
            })
            .collect();
        let b: Vec<Fate> = (0..100)
            .map({
                let f = faulty(0.5, 0.5, 9);
                move |_| f.fate()
            })
            .collect();
        assert_eq!(a, b);
    }

    #[tokio::test]
    async fn down_fails_everything_and_up_again_passes() {
        let f = faulty(0.0, 0.0, 0);
        f.set_down(true);
        assert!(matches!(f.put("k", Bytes::new()).await, Err(ObjectError::Unavailable(_))));
        assert!(matches!(f.list("", None, 1).await, Err(ObjectError::Unavailable(_))));
        assert_eq!(f.injected_failures(), 2);
        f.set_down(false);
        assert_eq!(f.put("k", Bytes::new()).await, Ok(()));
    }

    #[tokio::test]
    async fn every_call_fails_at_rate_one() {
        let f = faulty(1.0, 0.0, 3);
        for _ in 0..20 {
            assert!(f.get("k", None).await.is_err_and(|e| e.is_retryable()));
        }
        assert_eq!(f.injected_failures(), 20);
    }
}
