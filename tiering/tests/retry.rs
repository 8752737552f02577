//! `Retrying` over a scripted store: which errors are retried, how often, what is counted,
//! and how a retried `put_if_absent` settles "did my earlier attempt create it?". Time is
//! paused, so backoff sleeps cost nothing.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tidepool_tiering::{ListPage, ObjectError, ObjectInfo, ObjectStore, PutIfAbsent, RetryConfig, Retrying};

/// Answers each call with the next scripted error (then success), and records the calls.
/// Holds at most one object, to model a put that took effect before its reply was lost.
#[derive(Default)]
struct Scripted {
    errors: Mutex<VecDeque<ObjectError>>,
    calls: Mutex<Vec<&'static str>>,
    object: Mutex<Option<Bytes>>,
    /// Apply a put_if_absent even when failing it (the reply was lost).
    apply_then_fail: bool,
}

impl Scripted {
    fn failing(errors: impl IntoIterator<Item = ObjectError>) -> Self {
        Scripted { errors: Mutex::new(errors.into_iter().collect()), ..Default::default() }
    }

    fn calls(&self) -> Vec<&'static str> {
        self.calls.lock().expect("calls lock").clone()
    }

    fn next(&self, op: &'static str) -> Result<(), ObjectError> {
        self.calls.lock().expect("calls lock").push(op);
        match self.errors.lock().expect("errors lock").pop_front() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

#[async_trait]
impl ObjectStore for Scripted {
    fn describe(&self) -> String {
        "scripted".into()
    }
    async fn put(&self, _: &str, body: Bytes) -> Result<(), ObjectError> {
        self.next("put")?;
        *self.object.lock().expect("object lock") = Some(body);
        Ok(())
    }
    async fn put_if_absent(&self, _: &str, body: Bytes) -> Result<PutIfAbsent, ObjectError> {
        let outcome = self.next("put_if_absent");
        if let Err(e) = &outcome
            && !self.apply_then_fail
        {
            return Err(e.clone());
        }
        let mut object = self.object.lock().expect("object lock");
        let answer = if object.is_some() {
            PutIfAbsent::Exists
        } else {
            *object = Some(body);
            PutIfAbsent::Created
        };
        outcome.map(|()| answer)
    }
    async fn get(&self, key: &str, _: Option<Range<u64>>) -> Result<Bytes, ObjectError> {
        self.next("get")?;
        self.object.lock().expect("object lock").clone().ok_or_else(|| ObjectError::NotFound(key.into()))
    }
    async fn head(&self, _: &str) -> Result<Option<ObjectInfo>, ObjectError> {
        self.next("head")?;
        Ok(None)
    }
    async fn list(&self, _: &str, _: Option<String>, _: usize) -> Result<ListPage, ObjectError> {
        self.next("list")?;
        Ok(ListPage::default())
    }
    async fn delete(&self, _: &str) -> Result<(), ObjectError> {
        self.next("delete")
    }
}

fn config(max_attempts: u32) -> RetryConfig {
    RetryConfig { max_attempts, base_delay: Duration::from_millis(50), max_delay: Duration::from_secs(5) }
}

fn retrying(inner: Scripted, max_attempts: u32) -> Retrying<Scripted> {
    Retrying::with_rng(inner, config(max_attempts), SmallRng::seed_from_u64(1))
}

fn unavailable() -> ObjectError {
    ObjectError::Unavailable("connection reset".into())
}

#[tokio::test(start_paused = true)]
async fn transient_errors_are_retried_until_success() {
    let errors = [unavailable(), ObjectError::Throttled("slow down".into()), unavailable()];
    let store = retrying(Scripted::failing(errors), 8);
    store.put("k", Bytes::from_static(b"v")).await.expect("put succeeds on the fourth attempt");
    assert_eq!(store.inner().calls(), ["put"; 4]);
    assert_eq!(store.retries(), 3);
}

#[tokio::test(start_paused = true)]
async fn final_errors_are_not_retried() {
    for error in [
        ObjectError::Auth("bad signature".into()),
        ObjectError::NotFound("k".into()),
        ObjectError::Invalid("bad range".into()),
        ObjectError::NoBucket("b".into()),
        ObjectError::Corrupt("short".into()),
        ObjectError::Io("disk".into()),
    ] {
        let store = retrying(Scripted::failing([error.clone(), error.clone()]), 8);
        assert_eq!(store.delete("k").await, Err(error.clone()));
        assert_eq!(store.inner().calls(), ["delete"], "{error:?} is answered at once");
        assert_eq!(store.retries(), 0);
    }
}

#[tokio::test(start_paused = true)]
async fn gives_up_after_max_attempts_with_the_last_error() {
    let errors = (0..10).map(|i| ObjectError::Unavailable(format!("attempt {i}")));
    let store = retrying(Scripted::failing(errors), 5);
    let start = tokio::time::Instant::now();
    assert_eq!(store.list("", None, 10).await, Err(ObjectError::Unavailable("attempt 4".into())));
    assert_eq!(store.inner().calls(), ["list"; 5]);
    assert_eq!(store.retries(), 4);
    // Four backoffs, each at most its ceiling: 50 + 100 + 200 + 400 ms.
    assert!(start.elapsed() <= Duration::from_millis(750), "backed off {:?}", start.elapsed());
}

#[tokio::test(start_paused = true)]
async fn retries_are_counted_across_calls() {
    let store = retrying(Scripted::failing([unavailable(), unavailable()]), 8);
    store.head("a").await.expect("head");
    store.get("b", None).await.expect_err("nothing stored");
    assert_eq!(store.retries(), 2);
    assert_eq!(store.inner().calls(), ["head", "head", "head", "get"]);
}

#[tokio::test(start_paused = true)]
async fn put_if_absent_whose_lost_reply_created_it_reports_created() {
    let inner = Scripted { apply_then_fail: true, ..Scripted::failing([unavailable()]) };
    let store = retrying(inner, 8);
    let answer = store.put_if_absent("LATEST", Bytes::from_static(b"epoch 7")).await;
    assert_eq!(answer, Ok(PutIfAbsent::Created), "our own earlier attempt made the object");
    assert_eq!(store.inner().calls(), ["put_if_absent", "put_if_absent", "get"]);
}

#[tokio::test(start_paused = true)]
async fn put_if_absent_over_another_body_after_a_retry_reports_exists() {
    let inner = Scripted::failing([unavailable()]);
    *inner.object.lock().expect("object lock") = Some(Bytes::from_static(b"epoch 6"));
    let store = retrying(inner, 8);
    let answer = store.put_if_absent("LATEST", Bytes::from_static(b"epoch 7")).await;
    assert_eq!(answer, Ok(PutIfAbsent::Exists));
    assert_eq!(store.inner().object.lock().expect("object lock").as_deref(), Some(&b"epoch 6"[..]));
}

#[tokio::test(start_paused = true)]
async fn put_if_absent_exists_without_a_retry_reads_nothing() {
    let inner = Scripted::default();
    *inner.object.lock().expect("object lock") = Some(Bytes::from_static(b"epoch 7"));
    let store = retrying(inner, 8);
    assert_eq!(store.put_if_absent("LATEST", Bytes::from_static(b"epoch 7")).await, Ok(PutIfAbsent::Exists));
    assert_eq!(store.inner().calls(), ["put_if_absent"], "a first-attempt Exists is final");
}
