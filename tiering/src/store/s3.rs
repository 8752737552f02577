//! `S3Store`: an S3 bucket (AWS or any S3-compatible server) as an object store, on the AWS
//! SDK. Keys live under the configured prefix (`<prefix>/<key>`).
//!
//! - put: one `PutObject` below `multipart_threshold_bytes`, else a multipart upload whose
//!   parts go up in parallel (at most `part_parallelism` at once); a failed part aborts it.
//! - put_if_absent: `PutObject` (or `CompleteMultipartUpload`) with `If-None-Match: *`.
//! - get: `GetObject` with a `Range` header; list: `ListObjectsV2`, whose continuation token
//!   is the page's `next`.
//!
//! The SDK's own retries are off: `Retrying` retries, so each call here is one attempt (and a
//! fault-injection test sees exactly the calls it caused). Errors are mapped in `s3/error.rs`.

mod error;

use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use aws_config::BehaviorVersion;
use aws_config::retry::RetryConfig;
use aws_config::timeout::TimeoutConfig;
use aws_sdk_s3::Client;
use aws_sdk_s3::config::{Credentials, Region, RequestChecksumCalculation, ResponseChecksumValidation};
use aws_sdk_s3::primitives::ByteStream;
use aws_sdk_s3::types::{CompletedMultipartUpload, CompletedPart};
use aws_smithy_http_client::tls::{Provider, rustls_provider::CryptoMode};
use bytes::Bytes;
use futures_util::stream::{self, StreamExt, TryStreamExt};

use self::error::{Failure, failure};
use super::key::check_key;
use super::url::{BucketUrl, parse_bucket_url};
use super::{ListPage, ObjectError, ObjectInfo, ObjectStore, PutIfAbsent, Result};

const MIB: u64 = 1024 * 1024;
/// S3's smallest part (all but the last) and largest part count.
const MIN_PART_BYTES: u64 = 5 * MIB;
const MAX_PARTS: u64 = 10_000;
/// The region when neither the settings nor the environment name one (S3-compatible servers
/// mostly ignore it; AWS redirects, which shows up as an `Invalid` naming the region).
const FALLBACK_REGION: &str = "us-east-1";

/// Where an `S3Store` points and how it uploads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Config {
    pub bucket: String,
    /// Key prefix inside the bucket, without leading or trailing `/` (empty: the whole bucket).
    pub prefix: String,
    /// `None`: from the environment (`AWS_REGION`, the profile, IMDS), else `us-east-1`.
    pub region: Option<String>,
    /// An S3-compatible endpoint (`http://127.0.0.1:9000`); `None`: AWS.
    pub endpoint: Option<String>,
    /// Path-style addressing (`endpoint/bucket/key`) rather than virtual-host style
    /// (`bucket.endpoint/key`); `with_endpoint` turns it on, as most S3-compatible servers
    /// want (default false: AWS).
    pub path_style: bool,
    /// Bodies of at least this size go up as multipart uploads (default 16 MiB).
    pub multipart_threshold_bytes: u64,
    /// Size of each part but the last (default 8 MiB; at least 5 MiB, as S3 requires; grown
    /// for a body that would otherwise need more than 10,000 parts).
    pub part_size_bytes: u64,
    /// Parts in flight at once per upload (default 4).
    pub part_parallelism: usize,
    /// Time allowed to open a connection (default 5 s).
    pub connect_timeout: Duration,
    /// Time allowed for one request until its response starts (default 120 s: an 8 MiB part
    /// at ~0.5 Mbit/s). A stalled response body is cut by the SDK's stalled-stream guard.
    pub attempt_timeout: Duration,
}

impl S3Config {
    /// A config for `bucket` and `prefix` with every other setting at its default.
    pub fn new(bucket: impl Into<String>, prefix: impl Into<String>) -> Self {
        S3Config {
            bucket: bucket.into(),
            prefix: prefix.into().trim_matches('/').to_owned(),
            region: None,
            endpoint: None,
            path_style: false,
            multipart_threshold_bytes: 16 * MIB,
            part_size_bytes: 8 * MIB,
            part_parallelism: 4,
            connect_timeout: Duration::from_secs(5),
            attempt_timeout: Duration::from_secs(120),
        }
    }

    /// A config from `s3://bucket/prefix`, every other setting at its default.
    pub fn from_url(url: &str) -> Result<Self> {
        match parse_bucket_url(url)? {
            BucketUrl::S3 { bucket, prefix } => Ok(S3Config::new(bucket, prefix)),
            _ => Err(ObjectError::Invalid(format!("not an s3 url url={url:?}"))),
        }
    }

    /// Points at an S3-compatible server, with path-style addressing.
    pub fn with_endpoint(mut self, endpoint: impl Into<String>) -> Self {
        self.endpoint = Some(endpoint.into());
        self.path_style = true;
        self
    }

    pub fn with_region(mut self, region: impl Into<String>) -> Self {
        self.region = Some(region.into());
        self
    }

    fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(ObjectError::Invalid(format!("bad s3 settings: {what}")));
        if self.part_size_bytes < MIN_PART_BYTES {
            return bad(format!("part size below 5 MiB part_size_bytes={}", self.part_size_bytes));
        }
        if self.multipart_threshold_bytes == 0 {
            return bad("multipart threshold is zero multipart_threshold_bytes=0".into());
        }
        if self.part_parallelism == 0 {
            return bad("part parallelism is zero part_parallelism=0".into());
        }
        Ok(())
    }
}

/// An S3 bucket (or a prefix of one) as an object store. Cheap to clone.
#[derive(Debug, Clone)]
pub struct S3Store {
    client: Client,
    config: Arc<S3Config>,
    /// Set once the server answered `If-None-Match: *` with "not implemented": from then on
    /// `put_if_absent` checks with HEAD first (see `put_if_absent_unconditional`).
    no_conditional_put: Arc<AtomicBool>,
}

impl S3Store {
    /// A store with credentials from the usual AWS chain (environment, profile, web identity,
    /// ECS, IMDS).
    pub async fn new(config: S3Config) -> Result<Self> {
        Self::build(config, None).await
    }

    /// A store with a fixed access key and secret (tests, S3-compatible servers).
    pub async fn with_static_credentials(
        config: S3Config,
        access_key_id: impl Into<String>,
        secret_access_key: impl Into<String>,
    ) -> Result<Self> {
        let credentials = Credentials::new(access_key_id, secret_access_key, None, None, "tidepool-static");
        Self::build(config, Some(credentials)).await
    }

    async fn build(config: S3Config, credentials: Option<Credentials>) -> Result<Self> {
        config.validate()?;
        // rustls with ring: no C toolchain beyond what ring needs, no aws-lc build.
        let http =
            aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
        let timeouts = TimeoutConfig::builder()
            .connect_timeout(config.connect_timeout)
            .operation_attempt_timeout(config.attempt_timeout)
            .build();
        let mut loader = aws_config::defaults(BehaviorVersion::latest())
            .http_client(http)
            .retry_config(RetryConfig::disabled())
            .timeout_config(timeouts);
        if let Some(region) = &config.region {
            loader = loader.region(Region::new(region.clone()));
        }
        if let Some(credentials) = credentials {
            loader = loader.credentials_provider(credentials);
        }
        let sdk = loader.load().await;
        let mut s3 = aws_sdk_s3::config::Builder::from(&sdk)
            .force_path_style(config.path_style)
            // Checksums only where S3 requires them: tidepool checks every block's crc32c
            // itself, and several S3-compatible servers refuse the SDK's newer defaults.
            .request_checksum_calculation(RequestChecksumCalculation::WhenRequired)
            .response_checksum_validation(ResponseChecksumValidation::WhenRequired);
        if sdk.region().is_none() {
            s3 = s3.region(Region::new(FALLBACK_REGION));
        }
        if let Some(endpoint) = &config.endpoint {
            s3 = s3.endpoint_url(endpoint);
        }
        Ok(S3Store {
            client: Client::from_conf(s3.build()),
            config: Arc::new(config),
            no_conditional_put: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The bucket key of `key`.
    fn full_key(&self, key: &str) -> String {
        if self.config.prefix.is_empty() { key.to_owned() } else { format!("{}/{key}", self.config.prefix) }
    }

    /// The key relative to the prefix of a bucket key from a listing.
    fn relative_key<'a>(&self, full: &'a str) -> Option<&'a str> {
        if self.config.prefix.is_empty() {
            Some(full)
        } else {
            full.strip_prefix(self.config.prefix.as_str()).and_then(|rest| rest.strip_prefix('/'))
        }
    }

    fn bucket(&self) -> &str {
        &self.config.bucket
    }

    async fn put_single(&self, key: &str, body: Bytes, if_absent: bool) -> Result<(), Failure> {
        let full = self.full_key(key);
        let mut req = self
            .client
            .put_object()
            .bucket(self.bucket())
            .key(&full)
            .content_length(len_i64(body.len()))
            .body(ByteStream::from(body));
        if if_absent {
            req = req.if_none_match("*");
        }
        req.send().await.map(drop).map_err(|e| failure(e, "put_object", self.bucket(), key))
    }

    async fn put_multipart(&self, key: &str, body: Bytes, if_absent: bool) -> Result<(), Failure> {
        let full = self.full_key(key);
        let created = self
            .client
            .create_multipart_upload()
            .bucket(self.bucket())
            .key(&full)
            .send()
            .await
            .map_err(|e| failure(e, "create_multipart_upload", self.bucket(), key))?;
        let Some(upload_id) = created.upload_id() else {
            return Err(Failure::Error(ObjectError::Corrupt(format!(
                "create multipart upload answered without an upload id key={key:?}"
            ))));
        };
        let result = self.upload_parts_and_complete(key, &full, upload_id, body, if_absent).await;
        if result.is_err() {
            // Best effort: an upload left behind costs storage until the bucket's lifecycle
            // rule (or the next GC sweep of incomplete uploads) removes it.
            let aborted =
                self.client.abort_multipart_upload().bucket(self.bucket()).key(&full).upload_id(upload_id).send().await;
            if let Err(e) = aborted {
                let e = failure(e, "abort_multipart_upload", self.bucket(), key);
                tracing::warn!(key, upload_id, error = %e, "could not abort a failed multipart upload");
            }
        }
        result
    }

    async fn upload_parts_and_complete(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        body: Bytes,
        if_absent: bool,
    ) -> Result<(), Failure> {
        let len = body.len() as u64;
        let part_size = self.config.part_size_bytes.max(len.div_ceil(MAX_PARTS));
        let parts = (0..len.div_ceil(part_size)).map(|i| {
            let start = i * part_size;
            let end = (start + part_size).min(len);
            // Part numbers start at 1; at most MAX_PARTS, so they fit an i32.
            (i as i32 + 1, body.slice(start as usize..end as usize))
        });
        let mut completed: Vec<CompletedPart> = stream::iter(parts)
            .map(|(number, part)| self.upload_part(key, full, upload_id, number, part))
            .buffer_unordered(self.config.part_parallelism)
            .try_collect()
            .await?;
        completed.sort_by_key(|p| p.part_number());
        let mut req = self
            .client
            .complete_multipart_upload()
            .bucket(self.bucket())
            .key(full)
            .upload_id(upload_id)
            .multipart_upload(CompletedMultipartUpload::builder().set_parts(Some(completed)).build());
        if if_absent {
            req = req.if_none_match("*");
        }
        req.send().await.map(drop).map_err(|e| failure(e, "complete_multipart_upload", self.bucket(), key))
    }

    async fn upload_part(
        &self,
        key: &str,
        full: &str,
        upload_id: &str,
        number: i32,
        part: Bytes,
    ) -> Result<CompletedPart, Failure> {
        let out = self
            .client
            .upload_part()
            .bucket(self.bucket())
            .key(full)
            .upload_id(upload_id)
            .part_number(number)
            .content_length(len_i64(part.len()))
            .body(ByteStream::from(part))
            .send()
            .await
            .map_err(|e| failure(e, "upload_part", self.bucket(), key))?;
        let Some(etag) = out.e_tag() else {
            return Err(Failure::Error(ObjectError::Corrupt(format!(
                "upload part answered without an etag key={key:?} part={number}"
            ))));
        };
        Ok(CompletedPart::builder().part_number(number).e_tag(etag).build())
    }

    async fn put_body(&self, key: &str, body: Bytes, if_absent: bool) -> Result<(), Failure> {
        if (body.len() as u64) < self.config.multipart_threshold_bytes {
            self.put_single(key, body, if_absent).await
        } else {
            self.put_multipart(key, body, if_absent).await
        }
    }

    /// `put_if_absent` for a server without `If-None-Match: *` on writes: HEAD, then PUT if
    /// nothing is there. RACE: two writers can both see no object and both PUT; the later
    /// one wins and both are told `Created`. Only the manifest pointer relies on this, and
    /// only one cluster writes to a prefix; a server with conditional writes has no race.
    async fn put_if_absent_unconditional(&self, key: &str, body: Bytes) -> Result<PutIfAbsent> {
        if self.head(key).await?.is_some() {
            return Ok(PutIfAbsent::Exists);
        }
        self.put_body(key, body, false).await.map_err(Failure::into_error)?;
        Ok(PutIfAbsent::Created)
    }

    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        if range.start > range.end {
            return Err(ObjectError::Invalid(format!(
                "range ends before it starts key={key:?} range={}..{}",
                range.start, range.end
            )));
        }
        if range.start == range.end {
            // HTTP cannot ask for zero bytes; the range is valid if it is inside the object.
            let size = self.head(key).await?.ok_or_else(|| ObjectError::NotFound(key.to_owned()))?.size_bytes;
            return if range.end <= size { Ok(Bytes::new()) } else { Err(past_end(key, &range, size)) };
        }
        let out = self
            .client
            .get_object()
            .bucket(self.bucket())
            .key(self.full_key(key))
            .range(format!("bytes={}-{}", range.start, range.end - 1))
            .send()
            .await
            .map_err(|e| failure(e, "get_object", self.bucket(), key).into_error())?;
        let total = out.content_range().and_then(content_range_total);
        let body = collect(key, out.body).await?;
        let want = range.end - range.start;
        if body.len() as u64 == want {
            return Ok(body);
        }
        // S3 answers a range that runs past the end with the bytes up to the end.
        match total {
            Some(size) if range.end > size => Err(past_end(key, &range, size)),
            _ => Err(ObjectError::Corrupt(format!(
                "ranged get returned the wrong length key={key:?} want_bytes={want} got_bytes={}",
                body.len()
            ))),
        }
    }
}

#[async_trait]
impl ObjectStore for S3Store {
    fn describe(&self) -> String {
        BucketUrl::S3 { bucket: self.config.bucket.clone(), prefix: self.config.prefix.clone() }.to_string()
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        check_key(key)?;
        self.put_body(key, body, false).await.map_err(Failure::into_error)
    }

    async fn put_if_absent(&self, key: &str, body: Bytes) -> Result<PutIfAbsent> {
        check_key(key)?;
        if self.no_conditional_put.load(Ordering::Relaxed) {
            return self.put_if_absent_unconditional(key, body).await;
        }
        match self.put_body(key, body.clone(), true).await {
            Ok(()) => Ok(PutIfAbsent::Created),
            Err(Failure::PreconditionFailed) => Ok(PutIfAbsent::Exists),
            Err(Failure::NotImplemented(detail)) => {
                tracing::warn!(
                    store = %self.describe(), detail,
                    "the server does not support conditional writes; put_if_absent falls back to head then put"
                );
                self.no_conditional_put.store(true, Ordering::Relaxed);
                self.put_if_absent_unconditional(key, body).await
            }
            Err(Failure::Error(e)) => Err(e),
        }
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        check_key(key)?;
        if let Some(range) = range {
            return self.get_range(key, range).await;
        }
        let out = self
            .client
            .get_object()
            .bucket(self.bucket())
            .key(self.full_key(key))
            .send()
            .await
            .map_err(|e| failure(e, "get_object", self.bucket(), key).into_error())?;
        let want = out.content_length();
        let body = collect(key, out.body).await?;
        match want {
            Some(want) if want != len_i64(body.len()) => Err(ObjectError::Corrupt(format!(
                "get returned the wrong length key={key:?} want_bytes={want} got_bytes={}",
                body.len()
            ))),
            _ => Ok(body),
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        check_key(key)?;
        let out = self.client.head_object().bucket(self.bucket()).key(self.full_key(key)).send().await;
        match out.map_err(|e| failure(e, "head_object", self.bucket(), key).into_error()) {
            Ok(out) => Ok(Some(ObjectInfo { key: key.to_owned(), size_bytes: size_u64(key, out.content_length())? })),
            // A HEAD answer has no body, so a missing bucket looks like a missing key here.
            Err(ObjectError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    async fn list(&self, prefix: &str, next: Option<String>, limit: usize) -> Result<ListPage> {
        if limit == 0 {
            return Err(ObjectError::Invalid("list limit must be at least 1 limit=0".into()));
        }
        let full_prefix = self.full_key(prefix);
        let max_keys = i32::try_from(limit.min(1000)).unwrap_or(1000);
        let out = self
            .client
            .list_objects_v2()
            .bucket(self.bucket())
            .prefix(&full_prefix)
            .max_keys(max_keys)
            .set_continuation_token(next)
            .send()
            .await
            .map_err(|e| failure(e, "list_objects_v2", self.bucket(), prefix).into_error())?;
        let mut objects = Vec::with_capacity(out.contents().len());
        for object in out.contents() {
            let full = object.key().unwrap_or_default();
            let Some(key) = self.relative_key(full) else {
                return Err(ObjectError::Corrupt(format!("listing returned a key outside the prefix key={full:?}")));
            };
            objects.push(ObjectInfo { key: key.to_owned(), size_bytes: size_u64(key, object.size())? });
        }
        let next = match (out.is_truncated().unwrap_or(false), out.next_continuation_token()) {
            (false, _) => None,
            (true, Some(token)) => Some(token.to_owned()),
            (true, None) => {
                return Err(ObjectError::Corrupt(format!(
                    "truncated listing without a continuation token prefix={prefix:?}"
                )));
            }
        };
        Ok(ListPage { objects, next })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        check_key(key)?;
        let out = self.client.delete_object().bucket(self.bucket()).key(self.full_key(key)).send().await;
        match out.map_err(|e| failure(e, "delete_object", self.bucket(), key).into_error()) {
            Ok(_) | Err(ObjectError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

async fn collect(key: &str, body: ByteStream) -> Result<Bytes> {
    match body.collect().await {
        Ok(data) => Ok(data.into_bytes()),
        Err(e) => Err(ObjectError::Unavailable(format!("reading the object body failed key={key:?} error={e}"))),
    }
}

fn past_end(key: &str, range: &Range<u64>, size: u64) -> ObjectError {
    ObjectError::Invalid(format!(
        "range outside the object key={key:?} range={}..{} size_bytes={size}",
        range.start, range.end
    ))
}

/// The total size in a `Content-Range: bytes a-b/total` header.
fn content_range_total(header: &str) -> Option<u64> {
    header.rsplit_once('/').and_then(|(_, total)| total.trim().parse().ok())
}

fn size_u64(key: &str, size: Option<i64>) -> Result<u64> {
    let size = size.unwrap_or(0);
    u64::try_from(size).map_err(|_| ObjectError::Corrupt(format!("negative object size key={key:?} size={size}")))
}

/// A body length as S3's `i64` (lengths in memory are far below `i64::MAX`).
fn len_i64(len: usize) -> i64 {
    i64::try_from(len).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_and_endpoint() {
        let c = S3Config::new("b", "/p/q/");
        assert_eq!(c.prefix, "p/q");
        assert!(!c.path_style);
        assert_eq!((c.multipart_threshold_bytes, c.part_size_bytes, c.part_parallelism), (16 * MIB, 8 * MIB, 4));
        let c = c.with_endpoint("http://127.0.0.1:9000");
        assert!(c.path_style);
        assert_eq!(c.validate(), Ok(()));
        let small = S3Config { part_size_bytes: MIB, ..S3Config::new("b", "") };
        assert!(matches!(small.validate(), Err(ObjectError::Invalid(_))));
    }

    #[test]
    fn config_from_url() {
        let c = S3Config::from_url("s3://my-bucket/cold/fs1/");
        assert_eq!(c.map(|c| (c.bucket, c.prefix)), Ok(("my-bucket".into(), "cold/fs1".into())));
        assert!(matches!(S3Config::from_url("az://cold/x"), Err(ObjectError::Invalid(_))));
    }

    #[test]
    fn parses_content_range_total() {
        assert_eq!(content_range_total("bytes 0-9/100"), Some(100));
        assert_eq!(content_range_total("bytes 0-9/*"), None);
        assert_eq!(content_range_total("garbage"), None);
    }
}
