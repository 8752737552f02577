//! The Azure Blob backend: one container, keys under a prefix, through the official SDK
//! (`azure_storage_blob` 1.x on `azure_core`).
//!
//! Bodies up to `single_put_max_bytes` go up as one Put Blob; larger ones as staged blocks
//! (Put Block, at most `block_parallelism` at a time) committed by one Put Block List, so the
//! blob appears whole or not at all. `put_if_absent` sends `If-None-Match: *` on the call
//! that creates the blob. Reads are ranged GETs; a whole-object GET of a large blob is split
//! into block-sized ranges read in parallel (pinned to the first answer's ETag).
//!
//! Credentials ([`AzureCredential`]): a SAS token appended to every URL; the account key,
//! with which a per-try pipeline policy here signs each request (Shared Key; the SDK has no
//! such policy of its own); or Entra ID tokens from the environment (https only).
//!
//! The SDK's own retry policy is off: `Throttled` and `Unavailable` go to the caller, which
//! wraps the store in the retrying wrapper.

use std::collections::BTreeMap;
use std::fmt;
use std::num::NonZero;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use azure_core::credentials::{AccessToken, TokenCredential, TokenRequestOptions};
use azure_core::error::ErrorKind;
use azure_core::http::headers::HeaderName;
use azure_core::http::policies::{Policy, PolicyResult};
use azure_core::http::{ClientOptions, Context, Etag, Request, RetryOptions, Transport, Url};
use azure_identity::{
    DeveloperToolsCredential, ManagedIdentityCredential, ManagedIdentityCredentialOptions, WorkloadIdentityCredential,
    WorkloadIdentityCredentialOptions,
};
use azure_storage_blob::models::{
    BlobClientDownloadOptions, BlobClientGetPropertiesResultHeaders, BlobContainerClientListBlobsOptions,
    BlockBlobClientCommitBlockListOptions, BlockBlobClientUploadOptions, BlockLookupList,
};
use azure_storage_blob::{BlobClient, BlobContainerClient, BlobContainerClientOptions};
use bytes::Bytes;
use futures_util::TryStreamExt;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;
use tokio::task::JoinSet;

use super::{ListPage, ObjectError, ObjectInfo, ObjectStore, PutIfAbsent, Result};

/// Default size of one staged block of a large put: 8 MiB.
pub const DEFAULT_BLOCK_SIZE_BYTES: u64 = 8 << 20;
/// Default number of blocks one put stages at once: 4.
pub const DEFAULT_BLOCK_PARALLELISM: usize = 4;
/// Default largest body sent as a single Put Blob: 16 MiB.
pub const DEFAULT_SINGLE_PUT_MAX_BYTES: u64 = 16 << 20;

/// Azure's limits (service version 2019-12-12 on): a staged block, a single Put Blob, and
/// the number of blocks in one blob.
const MAX_BLOCK_SIZE_BYTES: u64 = 4000 << 20;
const MAX_SINGLE_PUT_BYTES: u64 = 5000 << 20;
const MAX_BLOCKS: u64 = 50_000;
/// At most this many names per List Blobs page (the service caps `maxresults` there).
const MAX_LIST_RESULTS: usize = 5000;
/// Entra ID scope of the storage data plane.
const STORAGE_SCOPE: &str = "https://storage.azure.com/.default";

/// Where an [`AzureStore`] points and how it talks to it.
#[derive(Debug, Clone)]
pub struct AzureConfig {
    /// Storage account name (`devstoreaccount1` for Azurite).
    pub account: String,
    /// Container holding the objects; it must exist (else calls fail with `NoBucket`).
    pub container: String,
    /// Key prefix inside the container, without leading or trailing `/`; empty for none.
    pub prefix: String,
    /// Blob service endpoint. Default `https://<account>.blob.core.windows.net`; Azurite is
    /// path-style with the account in the path: `http://127.0.0.1:10000/devstoreaccount1`.
    pub endpoint: Option<String>,
    pub credential: AzureCredential,
    /// Size of each staged block of a put larger than `single_put_max_bytes`. Default 8 MiB,
    /// at most 4000 MiB.
    pub block_size_bytes: u64,
    /// Blocks staged at once by one put (and ranges read at once by one whole GET). Default 4.
    pub block_parallelism: usize,
    /// Bodies up to this size go up as one Put Blob. Default 16 MiB, at most 5000 MiB.
    pub single_put_max_bytes: u64,
}

impl AzureConfig {
    /// A config with the default endpoint, no prefix and the default sizes.
    pub fn new(account: impl Into<String>, container: impl Into<String>, credential: AzureCredential) -> Self {
        AzureConfig {
            account: account.into(),
            container: container.into(),
            prefix: String::new(),
            endpoint: None,
            credential,
            block_size_bytes: DEFAULT_BLOCK_SIZE_BYTES,
            block_parallelism: DEFAULT_BLOCK_PARALLELISM,
            single_put_max_bytes: DEFAULT_SINGLE_PUT_MAX_BYTES,
        }
    }
}

/// How an [`AzureStore`] proves who it is.
#[derive(Clone)]
pub enum AzureCredential {
    /// A SAS token (account or container SAS; the leading `?` optional), appended to every
    /// request URL. It needs read, write, delete and list permissions on the container.
    Sas(String),
    /// The account key (base64, as the portal shows it): every request is signed with it
    /// (Shared Key authorization).
    SharedKey(String),
    /// Entra ID tokens from the environment, first that works: workload identity (AKS,
    /// `AZURE_FEDERATED_TOKEN_FILE`), managed identity, then developer tools (`az`, `azd`).
    /// Needs an https endpoint.
    Default,
}

impl fmt::Debug for AzureCredential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AzureCredential::Sas(_) => f.write_str("Sas(<redacted>)"),
            AzureCredential::SharedKey(_) => f.write_str("SharedKey(<redacted>)"),
            AzureCredential::Default => f.write_str("Default"),
        }
    }
}

/// An [`ObjectStore`] over one Azure Blob container.
pub struct AzureStore {
    container: BlobContainerClient,
    /// `prefix/` (or empty): prepended to every key.
    key_prefix: String,
    describe: String,
    block_size_bytes: u64,
    block_parallelism: NonZero<usize>,
    single_put_max_bytes: u64,
}

impl AzureStore {
    /// Checks `config` and builds the clients; does no I/O (a wrong account, container or
    /// credential shows up on the first call).
    pub fn new(config: AzureConfig) -> Result<Self> {
        let AzureConfig { account, container, prefix, endpoint, credential, .. } = &config;
        if account.is_empty() || container.is_empty() {
            return Err(invalid_config(format!(
                "account and container must be set account={account} container={container}"
            )));
        }
        if config.block_size_bytes == 0 || config.block_size_bytes > MAX_BLOCK_SIZE_BYTES {
            return Err(invalid_config(format!(
                "block size out of range block_size_bytes={}",
                config.block_size_bytes
            )));
        }
        if config.single_put_max_bytes > MAX_SINGLE_PUT_BYTES {
            return Err(invalid_config(format!(
                "single put size out of range single_put_max_bytes={}",
                config.single_put_max_bytes
            )));
        }
        let block_parallelism = NonZero::new(config.block_parallelism)
            .ok_or_else(|| invalid_config("block parallelism must be at least 1 block_parallelism=0".to_string()))?;
        let prefix = prefix.trim_matches('/');
        let key_prefix = if prefix.is_empty() { String::new() } else { format!("{prefix}/") };
        let describe = format!("azure://{account}/{container}/{prefix}").trim_end_matches('/').to_string();

        let endpoint = endpoint.clone().unwrap_or_else(|| format!("https://{account}.blob.core.windows.net"));
        let mut url = Url::parse(&endpoint)
            .map_err(|e| invalid_config(format!("endpoint is not a url: {e} endpoint={endpoint}")))?;
        url.set_query(None);
        url.path_segments_mut()
            .map_err(|()| invalid_config(format!("endpoint cannot take a path endpoint={endpoint}")))?
            .pop_if_empty()
            .push(container);

        let mut client_options = ClientOptions {
            transport: Some(Transport::new(Arc::new(http_client(&endpoint)?))),
            retry: RetryOptions::none(),
            ..ClientOptions::default()
        };
        let mut token = None;
        match credential {
            AzureCredential::Sas(sas) => {
                let sas = sas.trim_start_matches('?');
                if sas.is_empty() {
                    return Err(invalid_config(format!("empty sas token store={describe}")));
                }
                url.set_query(Some(sas));
            }
            AzureCredential::SharedKey(key) => {
                let key = azure_core::base64::decode(key.trim())
                    .map_err(|e| invalid_config(format!("shared key is not base64: {e} store={describe}")))?;
                client_options.per_try_policies.push(Arc::new(SharedKeyPolicy { account: account.clone(), key }));
            }
            AzureCredential::Default => {
                if url.scheme() != "https" {
                    return Err(invalid_config(format!(
                        "entra id credentials need an https endpoint endpoint={endpoint}"
                    )));
                }
                token = Some(DefaultChain::new(&client_options)? as Arc<dyn TokenCredential>);
            }
        }
        let options = BlobContainerClientOptions { client_options, ..BlobContainerClientOptions::default() };
        let container = BlobContainerClient::new(url, token, Some(options))
            .map_err(|e| invalid_config(format!("container client refused: {e} store={describe}")))?;
        Ok(AzureStore {
            container,
            key_prefix,
            describe,
            block_size_bytes: config.block_size_bytes,
            block_parallelism,
            single_put_max_bytes: config.single_put_max_bytes,
        })
    }

    /// Creates the container; one that exists already is fine. For setup and tests: the
    /// store itself never creates its container.
    pub async fn create_container(&self) -> Result<()> {
        match self.container.create(None).await {
            Ok(_) => Ok(()),
            Err(e) if error_code(&e) == Some("ContainerAlreadyExists") => Ok(()),
            Err(e) => Err(self.map_err(e, "create container", "")),
        }
    }

    fn blob(&self, key: &str) -> BlobClient {
        self.container.blob_client(&format!("{}{key}", self.key_prefix))
    }

    /// One Put Blob (`If-None-Match: *` when `if_absent`).
    async fn put_single(&self, key: &str, body: Bytes, if_absent: bool) -> azure_core::Result<()> {
        let len = body.len() as u64;
        let options = BlockBlobClientUploadOptions {
            // One partition as large as the body: the SDK then sends a single Put Blob.
            partition_size: NonZero::new(len.max(1)),
            parallel: NonZero::new(1),
            if_none_match: if_absent.then(|| Etag::from("*")),
            ..BlockBlobClientUploadOptions::default()
        };
        self.blob(key).upload(body.into(), Some(options)).await.map(drop)
    }

    /// Put Block for each `block_size_bytes` slice, `block_parallelism` at a time, then one
    /// Put Block List (`If-None-Match: *` when `if_absent`): the blob appears at the commit.
    async fn put_blocks(&self, key: &str, body: Bytes, if_absent: bool) -> Result<(), PutFailure> {
        let len = body.len() as u64;
        let blocks = len.div_ceil(self.block_size_bytes);
        if blocks > MAX_BLOCKS {
            return Err(PutFailure::Store(ObjectError::Invalid(format!(
                "object needs more than {MAX_BLOCKS} blocks key={key} size_bytes={len} block_size_bytes={}",
                self.block_size_bytes
            ))));
        }
        // Ids must be unique per upload (another writer may stage blocks of the same blob) and
        // of one length within a blob. 24 ASCII hex digits: their base64 has no `+`, `/` or `=`.
        let nonce = &azure_core::Uuid::new_v4().simple().to_string()[..16];
        let ids: Vec<Vec<u8>> = (0..blocks).map(|i| format!("{nonce}{i:08x}").into_bytes()).collect();
        let client = Arc::new(self.blob(key).block_blob_client());
        let mut staging = JoinSet::new();
        let mut next = 0usize;
        let block_size = self.block_size_bytes as usize;
        while next < ids.len() || !staging.is_empty() {
            while next < ids.len() && staging.len() < self.block_parallelism.get() {
                let start = next * block_size;
                let part = body.slice(start..(start + block_size).min(body.len()));
                let (client, id) = (Arc::clone(&client), ids[next].clone());
                staging.spawn(async move {
                    let part_len = part.len() as u64;
                    client.stage_block(&id, part_len, part.into(), None).await.map(drop)
                });
                next += 1;
            }
            match staging.join_next().await {
                Some(Ok(Ok(()))) | None => {}
                Some(Ok(Err(e))) => return Err(PutFailure::Sdk(e)),
                Some(Err(e)) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
                Some(Err(e)) => {
                    return Err(PutFailure::Store(ObjectError::Unavailable(format!(
                        "block upload task cancelled: {e} key={key}"
                    ))));
                }
            }
        }
        let list = BlockLookupList { latest: Some(ids), ..BlockLookupList::default() };
        let options = BlockBlobClientCommitBlockListOptions {
            if_none_match: if_absent.then(|| Etag::from("*")),
            ..BlockBlobClientCommitBlockListOptions::default()
        };
        let list = list.try_into().map_err(PutFailure::Sdk)?;
        client.commit_block_list(list, Some(options)).await.map(drop).map_err(PutFailure::Sdk)
    }

    async fn put_any(&self, key: &str, body: Bytes, if_absent: bool) -> Result<(), PutFailure> {
        if body.len() as u64 <= self.single_put_max_bytes {
            self.put_single(key, body, if_absent).await.map_err(PutFailure::Sdk)
        } else {
            self.put_blocks(key, body, if_absent).await
        }
    }

    /// A ranged GET of a non-empty `range`; a range past the end is `Invalid`.
    async fn get_range(&self, key: &str, range: Range<u64>) -> Result<Bytes> {
        let want = range.end - range.start;
        let partition = usize::try_from(want)
            .ok()
            .and_then(NonZero::new)
            .ok_or_else(|| ObjectError::Invalid(format!("range too large key={key} range={range:?}")))?;
        let options = BlobClientDownloadOptions {
            range: Some(range.clone().into()),
            // One partition as large as the range: a single GET.
            partition_size: Some(partition),
            parallel: NonZero::new(1),
            ..BlobClientDownloadOptions::default()
        };
        let answer = self.blob(key).download(Some(options)).await.map_err(|e| self.map_err(e, "get", key))?;
        let size_bytes = object_size(&answer.headers)
            .ok_or_else(|| ObjectError::Corrupt(format!("ranged get without an object size key={key}")))?;
        if range.end > size_bytes {
            return Err(ObjectError::Invalid(format!(
                "range past the end of the object key={key} range={range:?} size_bytes={size_bytes}"
            )));
        }
        let bytes = answer.body.collect().await.map_err(|e| self.map_err(e, "get", key))?;
        if bytes.len() as u64 != want {
            return Err(ObjectError::Corrupt(format!(
                "ranged get returned the wrong length key={key} range={range:?} len={}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// A whole-object GET, in block-sized ranges read `block_parallelism` at a time.
    async fn get_whole(&self, key: &str) -> Result<Bytes> {
        let partition = usize::try_from(self.block_size_bytes).ok().and_then(NonZero::new);
        let options = BlobClientDownloadOptions {
            partition_size: partition,
            parallel: Some(self.block_parallelism),
            ..BlobClientDownloadOptions::default()
        };
        let answer = self.blob(key).download(Some(options)).await.map_err(|e| self.map_err(e, "get", key))?;
        let size_bytes = object_size(&answer.headers)
            .ok_or_else(|| ObjectError::Corrupt(format!("get without an object size key={key}")))?;
        let bytes = answer.body.collect().await.map_err(|e| self.map_err(e, "get", key))?;
        if bytes.len() as u64 != size_bytes {
            return Err(ObjectError::Corrupt(format!(
                "get returned the wrong length key={key} size_bytes={size_bytes} len={}",
                bytes.len()
            )));
        }
        Ok(bytes)
    }

    /// Maps an SDK error of call `op` on `key` (empty for container calls) to its kind.
    fn map_err(&self, err: azure_core::Error, op: &str, key: &str) -> ObjectError {
        let store = &self.describe;
        match err.kind() {
            ErrorKind::HttpResponse { status, error_code, .. } => {
                let status = u16::from(*status);
                let code = error_code.as_deref().unwrap_or("");
                let detail = format!("azure {op} answered status={status} code={code} store={store} key={key}");
                match (status, code) {
                    (_, "ContainerNotFound") => ObjectError::NoBucket(store.clone()),
                    (_, "BlobNotFound") | (404, _) => ObjectError::NotFound(key.to_string()),
                    (_, "ServerBusy") | (429, _) => ObjectError::Throttled(detail),
                    (401 | 403, _) => ObjectError::Auth(detail),
                    (_, c) if is_auth_code(c) => ObjectError::Auth(detail),
                    // 412 outside a conditional put: the blob changed between the ranges of a
                    // whole GET (they are pinned to its ETag); reading again sees one version.
                    (408 | 412 | 500..=599, _) => ObjectError::Unavailable(detail),
                    _ => ObjectError::Invalid(detail),
                }
            }
            ErrorKind::Connection | ErrorKind::Io => {
                ObjectError::Unavailable(format!("azure {op} failed: {} store={store} key={key}", error_chain(&err)))
            }
            ErrorKind::Credential => {
                ObjectError::Auth(format!("azure {op} got no token: {} store={store} key={key}", error_chain(&err)))
            }
            ErrorKind::DataConversion => ObjectError::Corrupt(format!(
                "azure {op} answer unreadable: {} store={store} key={key}",
                error_chain(&err)
            )),
            _ => ObjectError::Invalid(format!("azure {op} failed: {} store={store} key={key}", error_chain(&err))),
        }
    }
}

/// Why a put failed: from the SDK (mapped by the caller, which knows whether a conflict means
/// `Exists`), or already a store error.
enum PutFailure {
    Sdk(azure_core::Error),
    Store(ObjectError),
}

#[async_trait]
impl ObjectStore for AzureStore {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        match self.put_any(key, body, false).await {
            Ok(()) => Ok(()),
            Err(PutFailure::Sdk(e)) => Err(self.map_err(e, "put", key)),
            Err(PutFailure::Store(e)) => Err(e),
        }
    }

    async fn put_if_absent(&self, key: &str, body: Bytes) -> Result<PutIfAbsent> {
        match self.put_any(key, body, true).await {
            Ok(()) => Ok(PutIfAbsent::Created),
            Err(PutFailure::Sdk(e)) if matches!(error_code(&e), Some("BlobAlreadyExists" | "ConditionNotMet")) => {
                Ok(PutIfAbsent::Exists)
            }
            // An answer without a code (none seen, but HTTP allows it): the status alone.
            Err(PutFailure::Sdk(e))
                if error_code(&e).is_none() && matches!(e.http_status().map(u16::from), Some(409 | 412)) =>
            {
                Ok(PutIfAbsent::Exists)
            }
            Err(PutFailure::Sdk(e)) => Err(self.map_err(e, "put if absent", key)),
            Err(PutFailure::Store(e)) => Err(e),
        }
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        match range {
            None => self.get_whole(key).await,
            Some(r) if r.start > r.end => {
                Err(ObjectError::Invalid(format!("range ends before it starts key={key} range={r:?}")))
            }
            Some(r) if r.is_empty() => {
                // HTTP cannot ask for zero bytes: check the object and the offset instead.
                let info = self.head(key).await?.ok_or_else(|| ObjectError::NotFound(key.to_string()))?;
                if r.start > info.size_bytes {
                    return Err(ObjectError::Invalid(format!(
                        "range past the end of the object key={key} range={r:?} size_bytes={}",
                        info.size_bytes
                    )));
                }
                Ok(Bytes::new())
            }
            Some(r) => self.get_range(key, r).await,
        }
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        match self.blob(key).get_properties(None).await {
            Ok(answer) => {
                let size = answer.content_length().map_err(|e| self.map_err(e, "head", key))?;
                let size_bytes =
                    size.ok_or_else(|| ObjectError::Corrupt(format!("head without a content length key={key}")))?;
                Ok(Some(ObjectInfo { key: key.to_string(), size_bytes }))
            }
            // A HEAD answer has no body: the code comes from `x-ms-error-code`, if sent.
            Err(e) => match self.map_err(e, "head", key) {
                ObjectError::NotFound(_) => Ok(None),
                other => Err(other),
            },
        }
    }

    async fn list(&self, prefix: &str, next: Option<String>, limit: usize) -> Result<ListPage> {
        let full_prefix = format!("{}{prefix}", self.key_prefix);
        let max_results = limit.clamp(1, MAX_LIST_RESULTS) as i32;
        let options = BlobContainerClientListBlobsOptions {
            prefix: (!full_prefix.is_empty()).then_some(full_prefix),
            marker: next,
            maxresults: Some(max_results),
            ..BlobContainerClientListBlobsOptions::default()
        };
        let pager = self.container.list_blobs(Some(options)).map_err(|e| self.map_err(e, "list", prefix))?;
        let mut pages = pager.into_pages();
        let Some(answer) = pages.try_next().await.map_err(|e| self.map_err(e, "list", prefix))? else {
            return Ok(ListPage::default());
        };
        let page = answer.into_model().map_err(|e| self.map_err(e, "list", prefix))?;
        let mut objects = Vec::with_capacity(page.blob_items.len());
        for item in page.blob_items {
            let name = item.name.unwrap_or_default();
            let Some(key) = name.strip_prefix(&self.key_prefix) else {
                return Err(ObjectError::Corrupt(format!(
                    "listed a name outside the prefix name={name} prefix={prefix}"
                )));
            };
            let size_bytes = item
                .properties
                .and_then(|p| p.content_length)
                .ok_or_else(|| ObjectError::Corrupt(format!("listing without a content length name={name}")))?;
            objects.push(ObjectInfo { key: key.to_string(), size_bytes });
        }
        Ok(ListPage { objects, next: page.next_marker.filter(|m| !m.is_empty()) })
    }

    async fn delete(&self, key: &str) -> Result<()> {
        match self.blob(key).delete(None).await {
            Ok(_) => Ok(()),
            Err(e) => match self.map_err(e, "delete", key) {
                ObjectError::NotFound(_) => Ok(()),
                other => Err(other),
            },
        }
    }
}

fn invalid_config(detail: String) -> ObjectError {
    ObjectError::Invalid(format!("azure config: {detail}"))
}

/// The HTTP client: reqwest on rustls with the ring provider and the platform's roots, set
/// up here rather than through a process-wide default provider.
fn http_client(endpoint: &str) -> Result<reqwest::Client> {
    use rustls_platform_verifier::BuilderVerifierExt;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .and_then(|b| b.with_platform_verifier())
        .map_err(|e| invalid_config(format!("tls setup failed: {e} endpoint={endpoint}")))?
        .with_no_client_auth();
    reqwest::Client::builder()
        .tls_backend_preconfigured(tls)
        .connect_timeout(Duration::from_secs(10))
        .read_timeout(Duration::from_secs(120))
        .build()
        .map_err(|e| invalid_config(format!("http client setup failed: {e} endpoint={endpoint}")))
}

/// The storage error code of an HTTP error answer (`x-ms-error-code` or the XML body).
fn error_code(err: &azure_core::Error) -> Option<&str> {
    match err.kind() {
        ErrorKind::HttpResponse { error_code, .. } => error_code.as_deref(),
        _ => None,
    }
}

fn is_auth_code(code: &str) -> bool {
    code.starts_with("Authentication")
        || code.starts_with("Authorization")
        || matches!(
            code,
            "InvalidAuthenticationInfo" | "NoAuthenticationInformation" | "InsufficientAccountPermissions"
        )
}

/// An error and its sources, `: `-joined (the SDK's message alone often hides the cause).
fn error_chain(err: &azure_core::Error) -> String {
    let mut text = err.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// The object's size from a GET answer: the total of `Content-Range` (`bytes a-b/total`),
/// or `Content-Length` for an answer without a range (an empty blob).
fn object_size(headers: &azure_core::http::headers::Headers) -> Option<u64> {
    if let Some(range) = headers.get_optional_str(&HeaderName::from_static("content-range")) {
        return range.rsplit_once('/').and_then(|(_, total)| total.trim().parse().ok());
    }
    headers.get_optional_str(&HeaderName::from_static("content-length")).and_then(|v| v.trim().parse().ok())
}

/// Signs each request with the account key (Shared Key). A per-try policy: it runs after
/// every header is set and again on each try, with a fresh `x-ms-date`.
struct SharedKeyPolicy {
    account: String,
    key: Vec<u8>,
}

impl fmt::Debug for SharedKeyPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedKeyPolicy").field("account", &self.account).finish_non_exhaustive()
    }
}

#[async_trait]
impl Policy for SharedKeyPolicy {
    async fn send(&self, ctx: &Context, request: &mut Request, next: &[Arc<dyn Policy>]) -> PolicyResult {
        let now = azure_core::time::OffsetDateTime::now_utc();
        request.insert_header("x-ms-date", azure_core::time::to_rfc7231(&now));
        let signature = hmac_sha256(&self.key, shared_key_string_to_sign(&self.account, request).as_bytes());
        let value = format!("SharedKey {}:{}", self.account, azure_core::base64::encode(signature));
        request.insert_header("authorization", value);
        let Some((first, rest)) = next.split_first() else {
            return Err(azure_core::Error::with_message(ErrorKind::Other, "shared key policy is last in the pipeline"));
        };
        first.send(ctx, request, rest).await
    }
}

/// HMAC-SHA256 of `data` under `key`.
pub(crate) fn hmac_sha256(key: &[u8], data: &[u8]) -> Vec<u8> {
    // Invariant: HMAC takes keys of any length, so `new_from_slice` cannot fail.
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("hmac accepts keys of any length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

/// The Shared Key string to sign (service version 2015-02-21 on): verb, the standard headers
/// (an empty or zero Content-Length as empty), the `x-ms-` headers, the canonical resource.
fn shared_key_string_to_sign(account: &str, request: &Request) -> String {
    let header = |name: &'static str| request.headers().get_optional_str(&HeaderName::from_static(name)).unwrap_or("");
    let content_length = match request.body().len() {
        Some(0) | None => String::new(),
        Some(n) => n.to_string(),
    };
    let mut text = format!("{}\n", request.method().as_ref().to_ascii_uppercase());
    for value in [header("content-encoding"), header("content-language"), &content_length, header("content-md5")] {
        text.push_str(value);
        text.push('\n');
    }
    for name in
        ["content-type", "date", "if-modified-since", "if-match", "if-none-match", "if-unmodified-since", "range"]
    {
        text.push_str(header(name));
        text.push('\n');
    }
    let mut ms_headers: Vec<(String, &str)> = request
        .headers()
        .iter()
        .map(|(name, value)| (name.as_str().to_ascii_lowercase(), value.as_str()))
        .filter(|(name, _)| name.starts_with("x-ms-"))
        .collect();
    ms_headers.sort();
    for (name, value) in ms_headers {
        text.push_str(&format!("{name}:{}\n", value.trim()));
    }
    text.push_str(&format!("/{account}{}", request.url().path()));
    let mut params: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for (name, value) in request.url().query_pairs() {
        params.entry(name.to_ascii_lowercase()).or_default().push(value.into_owned());
    }
    for (name, mut values) in params {
        values.sort();
        text.push_str(&format!("\n{name}:{}", values.join(",")));
    }
    text
}

/// Entra ID credentials tried in order; the first that gives a token is used from then on.
#[derive(Debug)]
struct DefaultChain {
    sources: Vec<Arc<dyn TokenCredential>>,
}

impl DefaultChain {
    fn new(client_options: &ClientOptions) -> Result<Arc<Self>> {
        let mut sources: Vec<Arc<dyn TokenCredential>> = Vec::new();
        // Workload identity only where its environment is set (else `new` refuses).
        let mut workload = WorkloadIdentityCredentialOptions::default();
        workload.credential_options.client_options = client_options.clone();
        if let Ok(c) = WorkloadIdentityCredential::new(Some(workload)) {
            sources.push(c);
        }
        let managed = ManagedIdentityCredentialOptions {
            client_options: client_options.clone(),
            ..ManagedIdentityCredentialOptions::default()
        };
        if let Ok(c) = ManagedIdentityCredential::new(Some(managed)) {
            sources.push(c);
        }
        if let Ok(c) = DeveloperToolsCredential::new(None) {
            sources.push(c);
        }
        if sources.is_empty() {
            return Err(ObjectError::Auth("azure: no entra id credential can be built here".to_string()));
        }
        Ok(Arc::new(DefaultChain { sources }))
    }
}

#[async_trait]
impl TokenCredential for DefaultChain {
    async fn get_token(
        &self,
        scopes: &[&str],
        options: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let mut failures = Vec::new();
        for source in &self.sources {
            match source.get_token(scopes, options.clone()).await {
                Ok(token) => return Ok(token),
                Err(e) => failures.push(e.to_string()),
            }
        }
        Err(azure_core::Error::with_message(
            ErrorKind::Credential,
            format!("no entra id credential gave a token scope={STORAGE_SCOPE} tried={}", failures.join("; ")),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use azure_core::http::Method;

    #[test]
    fn string_to_sign_follows_the_shared_key_layout() {
        let url = Url::parse("http://127.0.0.1:10000/devstoreaccount1/c/chunks/ab?comp=block&blockid=QUJD&timeout=5")
            .expect("literal url parses");
        let mut request = Request::new(url, Method::Put);
        request.insert_header("x-ms-version", "2026-02-06");
        request.insert_header("x-ms-date", "Sun, 22 Nov 2026 06:34:15 GMT");
        request.insert_header("if-none-match", "*");
        request.set_body(Bytes::from_static(b"hello"));
        let text = shared_key_string_to_sign("devstoreaccount1", &request);
        assert_eq!(
            text,
            "PUT\n\n\n5\n\n\n\n\n\n*\n\n\n\
             x-ms-date:Sun, 22 Nov 2026 06:34:15 GMT\nx-ms-version:2026-02-06\n\
             /devstoreaccount1/devstoreaccount1/c/chunks/ab\nblockid:QUJD\ncomp:block\ntimeout:5"
        );
    }

    #[test]
    fn object_size_reads_content_range_then_length() {
        let mut headers = azure_core::http::headers::Headers::new();
        headers.insert("content-length", "10");
        assert_eq!(object_size(&headers), Some(10));
        headers.insert("content-range", "bytes 5-14/300");
        assert_eq!(object_size(&headers), Some(300));
    }

    #[test]
    fn config_is_checked() {
        let base = AzureConfig::new("acct", "c", AzureCredential::Sas("sv=x".into()));
        let bad = [
            AzureConfig { block_size_bytes: 0, ..base.clone() },
            AzureConfig { block_parallelism: 0, ..base.clone() },
            AzureConfig { container: String::new(), ..base.clone() },
            AzureConfig { endpoint: Some("not a url".into()), ..base.clone() },
            AzureConfig { credential: AzureCredential::SharedKey("!!".into()), ..base.clone() },
            AzureConfig {
                credential: AzureCredential::Default,
                endpoint: Some("http://127.0.0.1:1/a".into()),
                ..base.clone()
            },
        ];
        for config in bad {
            assert!(matches!(AzureStore::new(config), Err(ObjectError::Invalid(_))));
        }
        let store = AzureStore::new(AzureConfig { prefix: "/tp/".into(), ..base.clone() }).expect("valid config");
        assert_eq!(store.describe(), "azure://acct/c/tp");
        // Entra ID on the default https endpoint: built without any I/O (tokens come later).
        AzureStore::new(AzureConfig { credential: AzureCredential::Default, ..base }).expect("entra id config");
    }
}
