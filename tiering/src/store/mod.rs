//! The `ObjectStore` trait: the one seam between tidepool and a bucket, and the backends and
//! wrappers behind it. Keys are relative to the store's prefix (the backend adds it); they are
//! `/`-separated, never start with `/`, and are at most 1024 bytes.
//!
//! Behaviour that is not "talk to one kind of bucket" lives in wrappers around the same trait
//! (retry with backoff, fault injection), so each can be tested alone.

pub mod azure;
pub mod fault;
pub mod key;
pub mod local;
pub mod retry;
pub mod s3;
pub mod url;

use std::ops::Range;

use async_trait::async_trait;
use bytes::Bytes;

/// What a failed object-store call was, as far as a caller must tell apart.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ObjectError {
    /// No object at this key (GET, HEAD of a missing key; a range on a missing key).
    #[error("no such object key={0}")]
    NotFound(String),
    /// Credentials refused or missing, or no permission: retrying will not help.
    #[error("object store refused the credentials: {0}")]
    Auth(String),
    /// The store asks us to slow down (S3 503 SlowDown, HTTP 429, Azure ServerBusy): retry later.
    #[error("object store throttled the request: {0}")]
    Throttled(String),
    /// Connection refused or reset, timeout, HTTP 500/502/503: retry later.
    #[error("object store unavailable: {0}")]
    Unavailable(String),
    /// The bucket / container itself does not exist.
    #[error("no such bucket or container: {0}")]
    NoBucket(String),
    /// A request the store answered as invalid (bad range, bad key, ...): a bug or bad input.
    #[error("object store rejected the request: {0}")]
    Invalid(String),
    /// Bytes came back that do not check (short read, bad length).
    #[error("object store returned bad data: {0}")]
    Corrupt(String),
    /// Local I/O failed (the local-folder backend).
    #[error("local object store i/o error: {0}")]
    Io(String),
}

impl ObjectError {
    /// Worth retrying with backoff: throttling and transient unavailability.
    pub fn is_retryable(&self) -> bool {
        matches!(self, ObjectError::Throttled(_) | ObjectError::Unavailable(_))
    }
}

pub type Result<T, E = ObjectError> = std::result::Result<T, E>;

/// What a conditional put did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PutIfAbsent {
    /// The object did not exist and now holds the body.
    Created,
    /// An object was already there; it was left unchanged.
    Exists,
}

/// One object in a listing or a HEAD.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ObjectInfo {
    /// Key relative to the store's prefix.
    pub key: String,
    pub size_bytes: u64,
}

/// One page of a listing, in key order. `next` continues it (opaque; backend-specific).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListPage {
    pub objects: Vec<ObjectInfo>,
    pub next: Option<String>,
}

/// An object store: S3, Azure Blob, a local folder, or a wrapper around one.
#[async_trait]
pub trait ObjectStore: Send + Sync + 'static {
    /// Where this store points, for logs and errors (`s3://bucket/prefix`, `file:///path`).
    fn describe(&self) -> String;

    /// Write an object whole, replacing any object at `key`. Large bodies go up as multipart
    /// (S3) or staged blocks (Azure), parts in parallel; the object appears atomically.
    async fn put(&self, key: &str, body: Bytes) -> Result<()>;

    /// Write an object only if none exists at `key` (S3 `If-None-Match: *`, Azure
    /// `If-None-Match: *`, local `link`/`O_EXCL`): the commit point of manifests.
    async fn put_if_absent(&self, key: &str, body: Bytes) -> Result<PutIfAbsent>;

    /// Read an object, or only `range` (byte offsets, end exclusive) of it. A range past the
    /// end is `Invalid`; the returned length always equals the range's length.
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes>;

    /// Size of the object at `key`, `None` if there is none.
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>>;

    /// Objects whose key starts with `prefix`, in key order, at most `limit` (>= 1) per page;
    /// pass the previous page's `next` to continue.
    async fn list(&self, prefix: &str, next: Option<String>, limit: usize) -> Result<ListPage>;

    /// Delete the object at `key`; deleting a missing key succeeds.
    async fn delete(&self, key: &str) -> Result<()>;
}

/// A shared store is a store: wrappers can wrap an `Arc` (a test keeps a handle on the
/// fault injector it wrapped).
#[async_trait]
impl<T: ObjectStore + ?Sized> ObjectStore for std::sync::Arc<T> {
    fn describe(&self) -> String {
        (**self).describe()
    }
    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        (**self).put(key, body).await
    }
    async fn put_if_absent(&self, key: &str, body: Bytes) -> Result<PutIfAbsent> {
        (**self).put_if_absent(key, body).await
    }
    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        (**self).get(key, range).await
    }
    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        (**self).head(key).await
    }
    async fn list(&self, prefix: &str, next: Option<String>, limit: usize) -> Result<ListPage> {
        (**self).list(prefix, next, limit).await
    }
    async fn delete(&self, key: &str) -> Result<()> {
        (**self).delete(key).await
    }
}
