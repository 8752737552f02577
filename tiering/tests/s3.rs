//! `S3Store` against a real S3 server started in this process: s3s-fs (the s3s crate's
//! file-system backend) on a free loopback port, path-style, one static key. The conformance
//! suite runs on it directly, through `Retrying(Faulty)`, and on a server that refuses
//! conditional writes; then the error kinds a caller relies on (auth, bucket down, no bucket).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use rand::SeedableRng;
use rand::rngs::SmallRng;
use s3s::auth::SimpleAuth;
use s3s::dto::*;
use s3s::service::S3ServiceBuilder;
use s3s::{S3, S3Request, S3Response, S3Result, s3_error};
use tidepool_tiering::{
    FaultConfig, Faulty, ListPage, ObjectError, ObjectInfo, ObjectStore, PutIfAbsent, RetryConfig, Retrying, S3Config,
    S3Store,
};
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use common::conformance;

const ACCESS_KEY: &str = "tidepool-test-key";
const SECRET_KEY: &str = "tidepool-test-secret";
const BUCKET: &str = "cold-tier";
const MIB: u64 = 1024 * 1024;

/// An S3 server on a loopback port, stopped (connections cut) by `stop` or on drop.
struct Server {
    addr: SocketAddr,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
    _root: tempfile::TempDir,
}

impl Server {
    /// s3s-fs over a fresh folder holding the bucket `BUCKET`.
    async fn start() -> Server {
        Self::start_with(|fs| Box::new(fs)).await
    }

    /// s3s-fs wrapped by `wrap` (to change how it answers).
    async fn start_with(wrap: impl FnOnce(s3s_fs::FileSystem) -> Box<dyn S3>) -> Server {
        let root = tempfile::tempdir().expect("tempdir");
        std::fs::create_dir(root.path().join(BUCKET)).expect("create the bucket folder");
        let fs = s3s_fs::FileSystem::new(root.path()).expect("s3s-fs over the folder");
        let service = {
            let mut b = S3ServiceBuilder::new(Boxed(wrap(fs)));
            b.set_auth(SimpleAuth::from_single(ACCESS_KEY, SECRET_KEY));
            b.build()
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a free loopback port");
        let addr = listener.local_addr().expect("local addr");
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            let http = ConnBuilder::new(TokioExecutor::new());
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((sock, _)) = accepted else { continue };
                        let _ = sock.set_nodelay(true);
                        let conn = http.serve_connection(TokioIo::new(sock), service.clone()).into_owned();
                        conns.spawn(async move {
                            let _ = conn.await;
                        });
                    }
                    _ = &mut stopped => break,
                }
            }
            // Dropping the set aborts every connection: pooled client connections are cut.
            conns.abort_all();
        });
        Server { addr, stop: Some(stop), task: Some(task), _root: root }
    }

    fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Small parts so the conformance suite's 12 MiB object goes up in three.
    fn config(&self, prefix: &str) -> S3Config {
        S3Config {
            multipart_threshold_bytes: 6 * MIB,
            part_size_bytes: 5 * MIB,
            part_parallelism: 3,
            connect_timeout: Duration::from_secs(2),
            attempt_timeout: Duration::from_secs(30),
            ..S3Config::new(BUCKET, prefix).with_endpoint(self.endpoint()).with_region("us-east-1")
        }
    }

    async fn store(&self, prefix: &str) -> S3Store {
        S3Store::with_static_credentials(self.config(prefix), ACCESS_KEY, SECRET_KEY).await.expect("s3 store")
    }

    async fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            task.await.expect("server task");
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_s3() {
    let server = Server::start().await;
    conformance::run(Arc::new(server.store("tp/fs1").await)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_on_s3_without_a_prefix() {
    let server = Server::start().await;
    let store = server.store("").await;
    assert_eq!(store.describe(), format!("s3://{BUCKET}"));
    conformance::run(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn conformance_through_faults_and_retries() {
    let server = Server::start().await;
    let faults = FaultConfig { fail_rate: 0.3, delay_rate: 0.1, delay: Duration::from_millis(5), seed: 1234 };
    let retry =
        RetryConfig { max_attempts: 12, base_delay: Duration::from_millis(2), max_delay: Duration::from_millis(50) };
    let faulty = Faulty::new(server.store("faulty").await, faults);
    let store = Arc::new(Retrying::with_rng(faulty, retry, SmallRng::seed_from_u64(99)));
    conformance::run(store.clone()).await;
    let injected = store.inner().injected_failures();
    assert!(injected > 10, "faults were injected: {injected}");
    assert!(store.retries() >= injected, "every injected failure was retried: {} < {injected}", store.retries());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_if_absent_falls_back_when_conditional_writes_are_not_implemented() {
    let counters = Arc::new(Counters::default());
    let server = {
        let counters = counters.clone();
        Server::start_with(move |fs| Box::new(Quirky { fs, counters, fail_part: None, slow_down_gets: false })).await
    };
    conformance::run(Arc::new(server.store("fallback").await)).await;
    assert!(counters.refused_conditional.load(Ordering::Relaxed) >= 1, "the server refused If-None-Match");
    assert!(counters.parts.load(Ordering::Relaxed) >= 3, "the large object went up in parts");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_part_aborts_the_upload() {
    let counters = Arc::new(Counters::default());
    let server = {
        let counters = counters.clone();
        Server::start_with(move |fs| Box::new(Quirky { fs, counters, fail_part: Some(2), slow_down_gets: false })).await
    };
    let store = server.store("").await;
    let body = conformance::pattern(11 * MIB as usize, 3);
    let put = store.put("chunks/aa/big", body).await;
    assert!(matches!(put, Err(ObjectError::Unavailable(_))), "a 503 on part 2 is retryable: {put:?}");
    assert_eq!(counters.aborts.load(Ordering::Relaxed), 1, "the upload was aborted");
    assert_eq!(store.head("chunks/aa/big").await.expect("head"), None, "no object appeared");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_down_is_throttled() {
    let counters = Arc::new(Counters::default());
    let server = {
        let counters = counters.clone();
        Server::start_with(move |fs| Box::new(Quirky { fs, counters, fail_part: None, slow_down_gets: true })).await
    };
    let store = server.store("").await;
    store.put("k", Bytes::from_static(b"v")).await.expect("put");
    let got = store.get("k", None).await;
    assert!(matches!(got, Err(ObjectError::Throttled(_))), "503 SlowDown: {got:?}");
    let got = store.get("k", Some(0..1)).await;
    assert!(matches!(got, Err(ObjectError::Throttled(_))), "503 SlowDown on a ranged get: {got:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_secret_is_auth_and_is_not_retried() {
    let server = Server::start().await;
    let bad = S3Store::with_static_credentials(server.config(""), ACCESS_KEY, "not-the-secret").await.expect("store");
    let counted = Counted { inner: bad, calls: AtomicU64::new(0) };
    let store = Retrying::with_rng(counted, RetryConfig::default(), SmallRng::seed_from_u64(1));
    let put = store.put("k", Bytes::from_static(b"v")).await;
    assert!(matches!(put, Err(ObjectError::Auth(_))), "{put:?}");
    assert_eq!(store.inner().calls.load(Ordering::Relaxed), 1, "exactly one call reached the server");
    assert_eq!(store.retries(), 0);
    let unknown = S3Store::with_static_credentials(server.config(""), "nobody", SECRET_KEY).await.expect("store");
    let list = unknown.list("", None, 10).await;
    assert!(matches!(list, Err(ObjectError::Auth(_))), "unknown access key: {list:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopped_server_is_unavailable() {
    let mut server = Server::start().await;
    let store = server.store("down").await;
    store.put("k", Bytes::from_static(b"v")).await.expect("put while up");
    server.stop().await;
    let got = store.get("k", None).await;
    assert!(matches!(got, Err(ObjectError::Unavailable(_))), "get from a stopped server: {got:?}");
    let put = store.put("k", Bytes::from_static(b"v")).await;
    assert!(matches!(put, Err(ObjectError::Unavailable(_))), "put to a stopped server: {put:?}");
    let retry =
        RetryConfig { max_attempts: 3, base_delay: Duration::from_millis(1), max_delay: Duration::from_millis(5) };
    let retrying = Retrying::with_rng(store, retry, SmallRng::seed_from_u64(2));
    let head = retrying.head("k").await;
    assert!(matches!(head, Err(ObjectError::Unavailable(_))), "still down after retries: {head:?}");
    assert_eq!(retrying.retries(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_bucket_is_no_bucket() {
    let server = Server::start().await;
    let config = S3Config { bucket: "no-such-bucket".into(), ..server.config("") };
    let store = S3Store::with_static_credentials(config, ACCESS_KEY, SECRET_KEY).await.expect("store");
    let list = store.list("", None, 10).await;
    assert!(matches!(&list, Err(ObjectError::NoBucket(b)) if b == "no-such-bucket"), "{list:?}");
    // (s3s-fs answers a PUT into a missing bucket by making the bucket's folder, so only the
    // listing is checked here.)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefixes_keep_stores_apart() {
    let server = Server::start().await;
    let a = server.store("fs-a").await;
    let b = server.store("fs-b").await;
    a.put("manifests/LATEST", Bytes::from_static(b"a")).await.expect("put a");
    assert_eq!(b.put_if_absent("manifests/LATEST", Bytes::from_static(b"b")).await, Ok(PutIfAbsent::Created));
    assert_eq!(a.get("manifests/LATEST", None).await, Ok(Bytes::from_static(b"a")));
    let page = a.list("", None, 10).await.expect("list a");
    assert_eq!(
        page,
        ListPage { objects: vec![ObjectInfo { key: "manifests/LATEST".into(), size_bytes: 1 }], next: None }
    );
    let whole = server.store("").await.list("", None, 10).await.expect("list bucket");
    let keys: Vec<String> = whole.objects.into_iter().map(|o| o.key).collect();
    assert_eq!(keys, ["fs-a/manifests/LATEST", "fs-b/manifests/LATEST"]);
}

/// Counts calls that reach the wrapped store.
struct Counted<S> {
    inner: S,
    calls: AtomicU64,
}

impl<S: ObjectStore> Counted<S> {
    fn tick(&self) -> &S {
        self.calls.fetch_add(1, Ordering::Relaxed);
        &self.inner
    }
}

#[async_trait]
impl<S: ObjectStore> ObjectStore for Counted<S> {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn put(&self, key: &str, body: Bytes) -> Result<(), ObjectError> {
        self.tick().put(key, body).await
    }
    async fn put_if_absent(&self, key: &str, body: Bytes) -> Result<PutIfAbsent, ObjectError> {
        self.tick().put_if_absent(key, body).await
    }
    async fn get(&self, key: &str, range: Option<std::ops::Range<u64>>) -> Result<Bytes, ObjectError> {
        self.tick().get(key, range).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>, ObjectError> {
        self.tick().head(key).await
    }
    async fn list(&self, prefix: &str, next: Option<String>, limit: usize) -> Result<ListPage, ObjectError> {
        self.tick().list(prefix, next, limit).await
    }
    async fn delete(&self, key: &str) -> Result<(), ObjectError> {
        self.tick().delete(key).await
    }
}

/// An `S3` implementation behind a box, so `Server::start_with` takes any wrapper.
struct Boxed(Box<dyn S3>);

#[derive(Default)]
struct Counters {
    refused_conditional: AtomicU64,
    parts: AtomicU64,
    aborts: AtomicU64,
}

/// s3s-fs as an older or busier S3-compatible server: `If-None-Match` on writes is not
/// implemented (501); optionally one part number always fails with 503 ServiceUnavailable,
/// and every GET is answered 503 SlowDown.
struct Quirky {
    fs: s3s_fs::FileSystem,
    counters: Arc<Counters>,
    fail_part: Option<i32>,
    slow_down_gets: bool,
}

#[async_trait]
impl S3 for Boxed {
    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        self.0.put_object(req).await
    }

    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        self.0.get_object(req).await
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        self.0.head_object(req).await
    }

    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.0.delete_object(req).await
    }

    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.0.list_objects_v2(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.0.create_multipart_upload(req).await
    }

    async fn upload_part(&self, req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        self.0.upload_part(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        self.0.complete_multipart_upload(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.0.abort_multipart_upload(req).await
    }
}

#[async_trait]
impl S3 for Quirky {
    async fn get_object(&self, req: S3Request<GetObjectInput>) -> S3Result<S3Response<GetObjectOutput>> {
        if self.slow_down_gets {
            return Err(s3_error!(SlowDown, "reduce your request rate"));
        }
        self.fs.get_object(req).await
    }

    async fn head_object(&self, req: S3Request<HeadObjectInput>) -> S3Result<S3Response<HeadObjectOutput>> {
        self.fs.head_object(req).await
    }

    async fn delete_object(&self, req: S3Request<DeleteObjectInput>) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.fs.delete_object(req).await
    }

    async fn list_objects_v2(&self, req: S3Request<ListObjectsV2Input>) -> S3Result<S3Response<ListObjectsV2Output>> {
        self.fs.list_objects_v2(req).await
    }

    async fn create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        self.fs.create_multipart_upload(req).await
    }

    async fn put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        if req.input.if_none_match.is_some() {
            self.counters.refused_conditional.fetch_add(1, Ordering::Relaxed);
            return Err(s3_error!(NotImplemented, "conditional writes are not implemented"));
        }
        self.fs.put_object(req).await
    }

    async fn upload_part(&self, req: S3Request<UploadPartInput>) -> S3Result<S3Response<UploadPartOutput>> {
        self.counters.parts.fetch_add(1, Ordering::Relaxed);
        if Some(req.input.part_number) == self.fail_part {
            return Err(s3_error!(ServiceUnavailable, "this part always fails"));
        }
        self.fs.upload_part(req).await
    }

    async fn complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        if req.input.if_none_match.is_some() {
            self.counters.refused_conditional.fetch_add(1, Ordering::Relaxed);
            return Err(s3_error!(NotImplemented, "conditional writes are not implemented"));
        }
        self.fs.complete_multipart_upload(req).await
    }

    async fn abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        self.counters.aborts.fetch_add(1, Ordering::Relaxed);
        self.fs.abort_multipart_upload(req).await
    }
}
