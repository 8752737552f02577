//! RenameObject as S3 Express One Zone defines it: `PUT /bucket/dest-key?renameObject` with
//! `x-amz-rename-source: /bucket/source-key` (URL-encoded; same bucket only), optional
//! `If-Match` / `If-None-Match` / `If-Modified-Since` / `If-Unmodified-Since` on the
//! destination and `x-amz-rename-source-if-*` on the source (every failed condition is 412).
//! It is one `Fs::rename` (atomic, no data moved), after creating the destination's parent
//! folders; the source's emptied parents are pruned as a DELETE does. The object keeps its
//! ETag and metadata.
//!
//! s3s 0.14 has no RenameObject operation, so an [`S3Route`] takes these requests. s3s runs
//! routes after it has checked the signature, and the route's access check refuses requests
//! without verified credentials, so RenameObject is authenticated like every operation.

use hyper::http::Extensions;
use hyper::{HeaderMap, Method, Uri};
use s3s::dto::{ETagCondition, Timestamp, TimestampFormat};
use s3s::route::S3Route;
use s3s::{Body, S3Request, S3Response, S3Result, s3_error};
use tidepool_fs::{ErrorKind, InodeKind};

use crate::auth::OpSlot;
use crate::error::{conflict, fs_error, invalid_key, no_such_key};
use crate::meta;
use crate::names::parse_key;
use crate::object::{CopyConditions, check_copy_conditions};
use crate::{TidepoolS3, lookup_opt};

const RENAME_SOURCE: &str = "x-amz-rename-source";
/// Times a rename retries when a concurrent DELETE pruned the parent folder it just created.
const ATTEMPTS: usize = 4;

/// The custom route serving RenameObject.
pub(crate) struct RenameRoute {
    pub s3: TidepoolS3,
}

fn is_rename(method: &Method, uri: &Uri) -> bool {
    method == Method::PUT
        && uri.query().is_some_and(|q| q.split('&').any(|p| p == "renameObject" || p.starts_with("renameObject=")))
}

#[async_trait::async_trait]
impl S3Route for RenameRoute {
    fn is_match(&self, method: &Method, uri: &Uri, _headers: &HeaderMap, extensions: &mut Extensions) -> bool {
        let yes = is_rename(method, uri);
        if yes
            && let Some(slot) = extensions.get::<OpSlot>()
            && let Ok(mut g) = slot.0.lock()
        {
            *g = Some("RenameObject".into());
        }
        yes
    }

    /// As every operation: verified credentials, signed for this endpoint's region.
    async fn check_access(&self, req: &mut S3Request<Body>) -> S3Result<()> {
        match req.credentials {
            Some(_) => crate::auth::check_region(&req.headers, &req.uri, &self.s3.opts.region),
            None => Err(crate::auth::anonymous()),
        }
    }

    async fn call(&self, req: S3Request<Body>) -> S3Result<S3Response<Body>> {
        self.s3.op_rename_object(&req.uri, &req.headers).await?;
        Ok(S3Response::new(Body::empty()))
    }
}

/// `%XX` decoding of a path or header value; the result must be UTF-8.
pub(crate) fn percent_decode(s: &str) -> S3Result<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = b.get(i + 1..i + 3).and_then(|h| std::str::from_utf8(h).ok());
            let v = hex.and_then(|h| u8::from_str_radix(h, 16).ok()).ok_or_else(|| s3_error!(InvalidURI))?;
            out.push(v);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| s3_error!(InvalidURI, "not UTF-8"))
}

/// `/bucket/key` (leading `/` optional) as (bucket, key).
fn split_bucket_key(path: &str) -> Option<(String, String)> {
    let p = path.strip_prefix('/').unwrap_or(path);
    let (b, k) = p.split_once('/')?;
    (!b.is_empty() && !k.is_empty()).then(|| (b.to_owned(), k.to_owned()))
}

fn header<'h>(h: &'h HeaderMap, name: &str) -> S3Result<Option<&'h str>> {
    match h.get(name) {
        None => Ok(None),
        Some(v) => v.to_str().map(Some).map_err(|_| s3_error!(InvalidArgument, "header {name} is not ASCII")),
    }
}

fn etag_cond(h: &HeaderMap, name: &str) -> S3Result<Option<ETagCondition>> {
    match header(h, name)? {
        None => Ok(None),
        Some(v) => ETagCondition::parse_http_header(v.as_bytes())
            .map(Some)
            .map_err(|_| s3_error!(InvalidArgument, "header {name} is not an ETag or *")),
    }
}

fn date(h: &HeaderMap, name: &str) -> S3Result<Option<Timestamp>> {
    match header(h, name)? {
        None => Ok(None),
        Some(v) => Timestamp::parse(TimestampFormat::HttpDate, v)
            .map(Some)
            .map_err(|_| s3_error!(InvalidArgument, "header {name} is not an HTTP date")),
    }
}

impl TidepoolS3 {
    pub(crate) async fn op_rename_object(&self, uri: &Uri, headers: &HeaderMap) -> S3Result<()> {
        let (bucket, key_str) = split_bucket_key(&percent_decode(uri.path())?)
            .ok_or_else(|| s3_error!(InvalidRequest, "RenameObject is PUT /bucket/key?renameObject"))?;
        let src = header(headers, RENAME_SOURCE)?
            .ok_or_else(|| s3_error!(InvalidRequest, "RenameObject needs the {RENAME_SOURCE} header"))?;
        let (src_bucket, src_key) = split_bucket_key(&percent_decode(src)?)
            .ok_or_else(|| s3_error!(InvalidArgument, "{RENAME_SOURCE} must be /bucket/key"))?;
        if src_bucket != bucket {
            return Err(s3_error!(InvalidRequest, "RenameObject renames within one bucket"));
        }
        let b = self.require_bucket(&bucket)?;
        let key = parse_key(&key_str)?;
        let skey = parse_key(&src_key)?;
        if key.folder || skey.folder {
            return Err(invalid_key(&key_str, "folder markers (keys ending in '/') cannot be renamed"));
        }

        // Conditions on the source (as CopyObject's), then on the destination.
        let (sattr, sx) = self.find_object(&bucket, &src_key)?;
        let (s_match, s_none) = (
            etag_cond(headers, "x-amz-rename-source-if-match")?,
            etag_cond(headers, "x-amz-rename-source-if-none-match")?,
        );
        let (s_mod, s_unmod) = (
            date(headers, "x-amz-rename-source-if-modified-since")?,
            date(headers, "x-amz-rename-source-if-unmodified-since")?,
        );
        let conds = CopyConditions {
            if_match: s_match.as_ref(),
            if_none_match: s_none.as_ref(),
            if_modified_since: s_mod.as_ref(),
            if_unmodified_since: s_unmod.as_ref(),
        };
        check_copy_conditions(&meta::etag(&sattr, &sx), sattr.mtime, &conds)?;
        let (d_match, d_none) = (etag_cond(headers, "if-match")?, etag_cond(headers, "if-none-match")?);
        self.check_put_conditions(&bucket, &key_str, d_match.as_ref(), d_none.as_ref())?;
        let (d_mod, d_unmod) = (date(headers, "if-modified-since")?, date(headers, "if-unmodified-since")?);
        if d_mod.is_some() || d_unmod.is_some() {
            let failed = || s3_error!(PreconditionFailed, "a destination condition failed");
            let (dattr, _) = self.find_object(&bucket, &key_str).map_err(|_| failed())?;
            let secs = dattr.mtime.div_euclid(1_000_000_000);
            if d_mod.as_ref().is_some_and(|t| secs <= meta::unix_secs(t))
                || d_unmod.as_ref().is_some_and(|t| secs > meta::unix_secs(t))
            {
                return Err(failed());
            }
        }

        let (src_parents, src_name) = skey.split_last();
        let (parents, name) = key.split_last();
        let src_parent = sattr.parent;
        let mut result = Err(s3_error!(OperationAborted, "{key_str:?}: parent folders kept being removed; retry"));
        for attempt in 1..=ATTEMPTS {
            let parent = self.make_parents(b.ino, parents, &key_str).await?;
            if let Some(existing) = lookup_opt(&self.fs, parent, name).map_err(|e| fs_error(e, &key_str))?
                && existing.kind != InodeKind::File
            {
                result = Err(conflict(&key_str, "a folder of that name holds other keys"));
                break;
            }
            match self.fs.rename(src_parent, src_name, parent, name).await {
                Ok(()) => {
                    result = Ok(());
                    break;
                }
                // The source went (a concurrent DELETE or rename), or it is no longer that inode.
                Err(e)
                    if e.kind() == ErrorKind::NotFound
                        && lookup_opt(&self.fs, src_parent, src_name).ok().flatten().is_none() =>
                {
                    result = Err(no_such_key(&src_key));
                    break;
                }
                // A concurrent DELETE pruned the destination's parent we just made: make it again.
                Err(e) if e.kind() == ErrorKind::NotFound && attempt < ATTEMPTS => continue,
                Err(e) if e.kind() == ErrorKind::IsDir => {
                    result = Err(conflict(&key_str, "a folder of that name holds other keys"));
                    break;
                }
                Err(e) => {
                    result = Err(fs_error(e, &key_str));
                    break;
                }
            }
        }
        match &result {
            Ok(()) => self.prune(b.ino, src_parents).await,
            Err(_) => self.prune(b.ino, parents).await,
        }
        tracing::debug!(bucket, src = src_key, dst = key_str, ok = result.is_ok(), "rename");
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_only_put_with_rename_query() {
        let u = |s: &str| s.parse::<Uri>().unwrap();
        assert!(is_rename(&Method::PUT, &u("/b/k?renameObject")));
        assert!(is_rename(&Method::PUT, &u("/b/k?x-id=RenameObject&renameObject=")));
        assert!(!is_rename(&Method::GET, &u("/b/k?renameObject")));
        assert!(!is_rename(&Method::PUT, &u("/b/k?renameObjects")));
        assert!(!is_rename(&Method::PUT, &u("/b/k")));
    }

    #[test]
    fn sources() {
        assert_eq!(split_bucket_key("/b/a/c"), Some(("b".into(), "a/c".into())));
        assert_eq!(split_bucket_key("b/k"), Some(("b".into(), "k".into())));
        assert_eq!(split_bucket_key("/b/"), None);
        assert_eq!(split_bucket_key("/b"), None);
        assert_eq!(percent_decode("/b/%C3%A4%20x+y").unwrap(), "/b/ä x+y");
        assert!(percent_decode("%zz").is_err() && percent_decode("%FF").is_err());
    }
}
