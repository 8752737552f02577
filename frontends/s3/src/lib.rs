//! tidepool-s3: the S3 front end. It owns the S3 view of the namespace (which top-level
//! directories are buckets, how keys map to paths, where object metadata lives, how listings
//! walk the tree in key order) and serves it over HTTP with `s3s`, which parses requests and
//! checks SigV4 signatures (headers, chunked streaming bodies, presigned URLs).
//! It does not own keys (a [`KeyProvider`] is passed in; `tidepool keys` comes later), does not
//! touch the block store or the meta group (only the `tidepool-fs` API: ARCHITECTURE invariant
//! 1), and does not pick concrete parts (the `tidepool` binary wires it).
//!
//! The mapping, and why:
//! - **Buckets are top-level directories** whose names are valid S3 bucket names (3-63 chars,
//!   `a-z0-9.-`, letter or digit at both ends). Other top-level entries, such as the hidden
//!   `/.tidepool`, are not buckets. One namespace, so NFS sees the same tree.
//! - **Keys are paths below the bucket**: `a/b/c` is file `c` in directories `a/b`, created as
//!   needed. Deleting a key removes the now-empty parent directories up to the bucket, so
//!   listings never show "folders" that S3 would not have. A key ending in `/` with an empty
//!   body is a directory marked as a folder object (`:etag` on the directory). Keys that a tree
//!   cannot hold (`a` and `a/b` together, `.`/`..`/empty segments) answer a documented error
//!   ([`names`]); nothing ever resolves outside its bucket.
//! - **A PUT is atomic**: the body streams into staged blocks (MD5 and size computed on the
//!   way), then ONE metadata commit (`Fs::publish`) makes a new file holding them and the
//!   metadata take the key, replacing an object there. Readers see the old object or the new
//!   one; a failed upload leaves nothing visible (its staged blocks are discarded, or freed at
//!   the next start). Multipart Complete builds the object in a temporary file in
//!   `/.tidepool/tmp/` and renames it over the key (leftovers there are removed at start).
//! - **Object metadata lives in the inode's xattr map**, so every front end sees one map: user
//!   metadata `x-amz-meta-NAME` under `name`, system attributes under keys starting with `:`
//!   (never a valid header name): `:etag`, `:content-type`, ... ([`meta`]).
//! - **Listing walks directories in key order**: a directory `d` sorts as `d/` among its
//!   siblings, so entries are merged by that key (`a-b` < `a/` < `a0`) ([`list`]). With the
//!   delimiter `/`, directories below the prefix become common prefixes without being walked.
//!
//! - **Multipart uploads live outside every bucket** in `/.tidepool/uploads/<upload-id>/`, a
//!   part per file; Complete joins the parts' extents into the object in one metadata commit
//!   (`Fs::concat`: no data is copied) and publishes it like a PUT ([`multipart`]).
//! - **RenameObject** (S3 Express One Zone) is one `Fs::rename`; s3s 0.14 has no such operation,
//!   so a custom route serves it after s3s has checked the signature (`rename.rs`).
//! - **One region**: s3s verifies a SigV4 signature with whatever region its scope names; the
//!   access check (`auth.rs`) then refuses any other than [`S3Options::region`], as S3 does.
//! - **Additional checksums** (`x-amz-checksum-*`) are computed while a body is staged and
//!   checked before it is published; s3s parses them but checks none ([`checksum`]).

mod auth;
mod bucket;
pub mod checksum;
mod digest;
mod error;
pub mod list;
#[doc(hidden)] // public for the md5x_bench example only
pub mod md5x;
pub mod meta;
mod metrics;
pub mod multipart;
pub mod names;
mod object;
mod read;
mod rename;
mod server;
mod service;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;

use tidepool_fs::{ErrorKind, Fs, ROOT_INO};

pub use auth::{KeyProvider, StaticKeys};
pub use metrics::S3Metrics;
pub use multipart::UPLOADS_DIR;
pub use server::serve;

/// Settings of the S3 front end.
#[derive(Debug, Clone)]
pub struct S3Options {
    /// The region of this endpoint: answered by GetBucketLocation / HeadBucket / ListBuckets,
    /// and the only region a SigV4 signature may name (else `AuthorizationHeaderMalformed`).
    /// Default `us-east-1`.
    pub region: String,
}

impl Default for S3Options {
    fn default() -> Self {
        S3Options { region: "us-east-1".into() }
    }
}

/// Where multipart Complete builds an object before renaming it over its key.
pub const STAGING_DIR: &[u8] = b"/.tidepool/tmp";

/// The S3 implementation over one filesystem. Clones share everything (the RenameObject
/// route holds one).
#[derive(Clone)]
pub struct TidepoolS3 {
    fs: Arc<Fs>,
    opts: S3Options,
    metrics: Arc<S3Metrics>,
    staging_ino: u64,
    /// `/.tidepool/uploads`: multipart uploads in progress.
    uploads_ino: u64,
    /// Temporary file names in the staging folder: `<start nanos>-<counter>`.
    tmp_seq: Arc<AtomicU64>,
    tmp_prefix: String,
}

impl TidepoolS3 {
    /// Create the staging folder (removing what a previous run left there).
    pub async fn new(fs: Arc<Fs>, opts: S3Options, metrics: Arc<S3Metrics>) -> tidepool_fs::Result<Self> {
        let staging = fs.mkdir_all(STAGING_DIR, 0o700).await?;
        let leftovers = remove_tree_contents(&fs, staging.ino).await?;
        if leftovers > 0 {
            tracing::info!(count = leftovers, "removed unfinished uploads from the staging folder");
        }
        let uploads_ino = Self::init_uploads(&fs).await?;
        let start = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        Ok(TidepoolS3 {
            fs,
            opts,
            metrics,
            staging_ino: staging.ino,
            uploads_ino,
            tmp_seq: Arc::new(AtomicU64::new(0)),
            tmp_prefix: format!("{:x}", start.as_nanos()),
        })
    }

    pub fn metrics(&self) -> &Arc<S3Metrics> {
        &self.metrics
    }
}

/// Build the HTTP service: the S3 implementation, SigV4 auth with `keys`, and an access check
/// that refuses anonymous requests and records each request's operation for the metrics.
pub fn build_service(s3: TidepoolS3, keys: Arc<dyn KeyProvider>) -> s3s::service::S3Service {
    let route = rename::RenameRoute { s3: s3.clone() };
    let region = s3.opts.region.clone();
    let mut b = s3s::service::S3ServiceBuilder::new(s3);
    b.set_route(route);
    b.set_auth(auth::Auth { keys });
    b.set_access(auth::Access { region });
    b.build()
}

/// Remove everything below directory `dir` (not `dir` itself); returns the number of entries
/// removed at the top level.
async fn remove_tree_contents(fs: &Fs, dir: u64) -> tidepool_fs::Result<u64> {
    let mut removed = 0;
    loop {
        let (entries, _) = fs.readdir(dir, None, 256)?;
        if entries.is_empty() {
            return Ok(removed);
        }
        for e in entries {
            if e.attr.kind == tidepool_fs::InodeKind::Dir {
                Box::pin(remove_tree_contents(fs, e.attr.ino)).await?;
                fs.rmdir(dir, &e.name).await?;
            } else {
                fs.unlink(dir, &e.name).await?;
            }
            removed += 1;
        }
    }
}

/// `lookup` that answers `None` for a name that does not exist or cannot exist.
fn lookup_opt(fs: &Fs, parent: u64, name: &[u8]) -> tidepool_fs::Result<Option<tidepool_fs::FileAttr>> {
    match fs.lookup(parent, name) {
        Ok(a) => Ok(Some(a)),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::NameTooLong | ErrorKind::Invalid) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The directory of bucket `name`, if it is one.
fn bucket_dir(fs: &Fs, name: &str) -> tidepool_fs::Result<Option<tidepool_fs::FileAttr>> {
    if !names::is_bucket_name(name) {
        return Ok(None);
    }
    Ok(lookup_opt(fs, ROOT_INO, name.as_bytes())?.filter(|a| a.kind == tidepool_fs::InodeKind::Dir))
}
