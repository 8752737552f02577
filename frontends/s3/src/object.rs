//! Object operations: PUT (staged, then published over the key in one commit; Content-MD5 and
//! additional checksums checked on the way), DELETE (pruning empty parents), DeleteObjects,
//! CopyObject. GET and HEAD are in `read.rs`.
//!
//! The path of a PUT: the body streams into `Fs::stage_owned` in `block_size` pieces (MD5 and
//! size on the way; each whole block is also kept in the read cache as written, no copy) -> parents are created -> ONE `Fs::publish` makes a new file with those blocks and
//! the metadata (ETag included) take the key, replacing an object there (the commit point:
//! before it nothing is visible, after it the whole object is). CopyObject does the same.
//! Multipart Complete goes through [`TidepoolS3::publish`] too ([`Content::Parts`]): a
//! temporary file in `/.tidepool/tmp/` gets the parts' extents (`Fs::concat`) and the
//! metadata, then is renamed over the key.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;

use futures_util::StreamExt;
use md5::{Digest, Md5};
use s3s::dto::*;
use s3s::{S3Request, S3Response, S3Result, s3_error};
use tidepool_fs::{ErrorKind, FileAttr, InodeKind, Staged};

use crate::checksum::{self, Alg};
use crate::digest::Digester;
use crate::error::{conflict, fs_error, invalid_key, no_such_key};
use crate::meta::{self, SystemHeaders};
use crate::names::{KeyPath, parse_key};
use crate::{TidepoolS3, lookup_opt};

/// Largest single PUT / CopyObject / part, as S3.
pub(crate) const MAX_OBJECT_BYTES: u64 = 5 << 30;
/// Times a PUT retries when a concurrent DELETE pruned the parent folder it just created.
const PUBLISH_ATTEMPTS: usize = 4;

/// The body of a [`TidepoolS3::publish`].
pub(crate) enum Content {
    /// A streamed or copied body: made the object by one `Fs::publish`.
    Staged(Staged),
    /// Multipart parts (files of the upload), joined in order by one `Fs::concat` into a
    /// temporary file that is renamed over the key: no copy.
    Parts(Vec<u64>),
}

/// A body staged for a PUT, a part or a copy.
pub(crate) struct StagedBody {
    pub staged: Staged,
    /// Hex MD5 (the ETag).
    pub md5: String,
    pub size: u64,
    /// The additional checksum's digest, when one was asked for.
    pub digest: Option<Vec<u8>>,
}

/// The five `x-amz-checksum-*` fields of an input, as one [`Checksum`].
macro_rules! checksum_fields {
    ($i:expr) => {
        s3s::dto::Checksum {
            checksum_crc32: $i.checksum_crc32.clone(),
            checksum_crc32c: $i.checksum_crc32c.clone(),
            checksum_crc64nvme: $i.checksum_crc64nvme.clone(),
            checksum_sha1: $i.checksum_sha1.clone(),
            checksum_sha256: $i.checksum_sha256.clone(),
            checksum_type: None,
        }
    };
}
pub(crate) use checksum_fields;

/// Copy the five checksum fields of `c` into the same-named fields of an output.
macro_rules! set_checksum_fields {
    ($out:expr, $c:expr) => {{
        let c: s3s::dto::Checksum = $c;
        $out.checksum_crc32 = c.checksum_crc32;
        $out.checksum_crc32c = c.checksum_crc32c;
        $out.checksum_crc64nvme = c.checksum_crc64nvme;
        $out.checksum_sha1 = c.checksum_sha1;
        $out.checksum_sha256 = c.checksum_sha256;
    }};
}
pub(crate) use set_checksum_fields;

/// The four `x-amz-copy-source-if-*` conditions of a CopyObject or UploadPartCopy.
pub(crate) struct CopyConditions<'a> {
    pub if_match: Option<&'a ETagCondition>,
    pub if_none_match: Option<&'a ETagCondition>,
    pub if_modified_since: Option<&'a Timestamp>,
    pub if_unmodified_since: Option<&'a Timestamp>,
}

impl TidepoolS3 {
    pub(crate) async fn op_put_object(&self, req: S3Request<PutObjectInput>) -> S3Result<S3Response<PutObjectOutput>> {
        let mut input = req.input;
        let body = input.body.take();
        let checked = async {
            let ck = checksum::requested(&checksum_fields!(input), input.checksum_algorithm.as_ref(), &req.headers)?;
            let bucket = self.require_bucket(&input.bucket)?;
            let key = parse_key(&input.key)?;
            if let Some(len) = input.content_length
                && len as u64 > MAX_OBJECT_BYTES
            {
                return Err(s3_error!(EntityTooLarge, "a single PUT is at most 5 GiB; use multipart upload"));
            }
            self.check_put_conditions(
                &input.bucket,
                &input.key,
                input.if_match.as_ref(),
                input.if_none_match.as_ref(),
            )?;
            Ok((bucket, key, ck))
        }
        .await;
        let (bucket, key, ck) = match checked {
            Ok(v) => v,
            Err(e) => {
                drain_body(body).await;
                return Err(e);
            }
        };
        let sys = SystemHeaders {
            content_type: input.content_type.clone(),
            content_encoding: meta::without_aws_chunked(input.content_encoding.clone()),
            content_disposition: input.content_disposition.clone(),
            cache_control: input.cache_control.clone(),
            content_language: input.content_language.clone(),
            expires: input.expires.clone(),
        };
        let mut xattrs = meta::to_xattrs(input.metadata.as_ref(), &sys);
        let alg = ck.as_ref().map(|c| c.alg);
        let StagedBody { staged, md5, size, digest } = self.stage_optional_body(body, alg).await?;
        let verified =
            self.check_digests(input.content_md5.as_deref(), &md5, ck.as_ref(), digest, req.trailing_headers.as_ref());
        let stored = match verified {
            Ok(v) => v,
            Err(e) => {
                self.fs.discard_staged(staged).await;
                return Err(e);
            }
        };
        if let Some(c) = &stored {
            c.store(&mut xattrs);
        }
        let attr = if key.folder {
            if size > 0 {
                self.fs.discard_staged(staged).await;
                return Err(invalid_key(&input.key, "a key ending in '/' is a folder and takes an empty body"));
            }
            self.publish_folder(bucket.ino, &input.key, &key, xattrs, &md5).await?
        } else {
            self.publish(bucket.ino, &input.key, &key, Content::Staged(staged), &md5, xattrs).await?
        };
        self.metrics.bytes_in(size);
        tracing::debug!(bucket = input.bucket, key = input.key, size, ino = attr.ino, "put");
        let mut out = PutObjectOutput { e_tag: Some(ETag::Strong(md5)), size: Some(size as i64), ..Default::default() };
        if let Some(c) = stored {
            out.checksum_type = Some(c.checksum_type());
            set_checksum_fields!(out, c.fields());
        }
        Ok(S3Response::new(out))
    }

    /// Check a received body against `Content-MD5` and the additional checksum asked for (its
    /// header value, or its trailer now that the body is read): `BadDigest` on a mismatch.
    /// Returns the checksum to keep with the body.
    pub(crate) fn check_digests(
        &self,
        content_md5: Option<&str>,
        md5: &str,
        ck: Option<&checksum::Requested>,
        digest: Option<Vec<u8>>,
        trailers: Option<&s3s::TrailingHeaders>,
    ) -> S3Result<Option<checksum::Stored>> {
        if let Some(want) = content_md5
            && *want != base64(&from_hex(md5))
        {
            return Err(s3_error!(BadDigest, "The Content-MD5 you specified did not match what we received."));
        }
        match (ck, digest) {
            (Some(c), Some(d)) => {
                let value = checksum::verify(c, trailers, &d)?;
                Ok(Some(checksum::Stored { alg: c.alg, value, composite: false }))
            }
            _ => Ok(None),
        }
    }

    /// PUT with If-None-Match: * (create only) or If-Match (replace only that version).
    pub(crate) fn check_put_conditions(
        &self,
        bucket: &str,
        key: &str,
        if_match: Option<&ETagCondition>,
        if_none_match: Option<&ETagCondition>,
    ) -> S3Result<()> {
        if if_match.is_none() && if_none_match.is_none() {
            return Ok(());
        }
        let current = match self.find_object(bucket, key) {
            Ok((a, x)) => Some(meta::etag(&a, &x)),
            Err(e) if *e.code() == s3s::S3ErrorCode::NoSuchKey => None,
            Err(e) => return Err(e),
        };
        if let Some(cond) = if_none_match
            && let Some(cur) = &current
            && etag_matches(cond, cur)
        {
            return Err(s3_error!(PreconditionFailed, "the object exists (If-None-Match)"));
        }
        if let Some(cond) = if_match {
            match &current {
                None => return Err(no_such_key(key)),
                Some(cur) if !etag_matches(cond, cur) => {
                    return Err(s3_error!(PreconditionFailed, "the object's ETag differs (If-Match)"));
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Stream a request body into staged blocks of `block_size`, computing MD5, size and the
    /// digest of `alg` (an additional checksum; both on their own thread past 1 MiB, see
    /// [`Digester`]). One block is written while the next is received.
    /// [`Self::stage_body`], or the empty body's figures when the request has none.
    pub(crate) async fn stage_optional_body(
        &self,
        body: Option<StreamingBlob>,
        alg: Option<Alg>,
    ) -> S3Result<StagedBody> {
        match body {
            Some(body) => self.stage_body(body, alg).await,
            None => Ok(StagedBody {
                staged: Staged::default(),
                md5: hex(&Md5::digest(b"")),
                size: 0,
                digest: alg.map(|a| a.digest(b"")),
            }),
        }
    }

    pub(crate) async fn stage_body(&self, mut body: StreamingBlob, alg: Option<Alg>) -> S3Result<StagedBody> {
        let bs = self.fs.options().block_size;
        let mut digests = Digester::new(alg);
        let mut size = 0u64;
        let mut staged = Staged::default();
        let mut buf: Vec<u8> = Vec::with_capacity(bs);
        let mut inflight: Option<tokio::task::JoinHandle<tidepool_fs::Result<Staged>>> = None;
        let result: S3Result<()> = async {
            loop {
                let chunk = match body.next().await {
                    None => break,
                    Some(Ok(c)) => c,
                    Some(Err(e)) => return Err(s3_error!(IncompleteBody, "reading the request body failed: {e}")),
                };
                size += chunk.len() as u64;
                if size > MAX_OBJECT_BYTES {
                    return Err(s3_error!(EntityTooLarge, "a single PUT is at most 5 GiB; use multipart upload"));
                }
                digests.update(&chunk, size).await.map_err(|_| digest_failed())?;
                let mut rest: &[u8] = &chunk;
                while !rest.is_empty() {
                    let take = rest.len().min(bs - buf.len());
                    buf.extend_from_slice(&rest[..take]);
                    rest = &rest[take..];
                    if buf.len() == bs {
                        let full = std::mem::replace(&mut buf, Vec::with_capacity(bs));
                        if let Some(prev) = inflight.take() {
                            staged.append(join_stage(prev).await?);
                        }
                        let fs = self.fs.clone();
                        // Handed over: the block also goes into the read cache as written.
                        inflight = Some(tokio::spawn(async move { fs.stage_owned(full).await }));
                    }
                }
            }
            if let Some(prev) = inflight.take() {
                staged.append(join_stage(prev).await?);
            }
            if !buf.is_empty() {
                let tail = std::mem::take(&mut buf);
                staged.append(self.fs.stage_owned(tail).await.map_err(|e| fs_error(e, "upload"))?);
            }
            Ok(())
        }
        .await;
        let result = match result {
            Ok(()) => digests.finish().await.map_err(|_| digest_failed()),
            Err(e) => Err(e),
        };
        match result {
            Ok(d) => {
                let (md5, digest) = d.finish();
                Ok(StagedBody { staged, md5, size, digest })
            }
            Err(e) => {
                if let Some(prev) = inflight.take()
                    && let Ok(s) = join_stage(prev).await
                {
                    staged.append(s);
                }
                self.fs.discard_staged(staged).await;
                Err(e)
            }
        }
    }

    pub(crate) fn tmp_name(&self) -> Vec<u8> {
        let n = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.tmp_prefix).into_bytes()
    }

    /// Make `content` the object `key` (ETag added to `xattrs`). On failure nothing is visible.
    pub(crate) async fn publish(
        &self,
        bucket_ino: u64,
        key_str: &str,
        key: &KeyPath<'_>,
        content: Content,
        md5: &str,
        xattrs: BTreeMap<String, String>,
    ) -> S3Result<FileAttr> {
        match content {
            Content::Staged(staged) => self.publish_staged(bucket_ino, key_str, key, staged, md5, xattrs).await,
            Content::Parts(parts) => self.publish_parts(bucket_ino, key_str, key, parts, md5, xattrs).await,
        }
    }

    /// A PUT or COPY body: parents are made, then ONE `Fs::publish` lays the blocks and the
    /// xattrs into a new file that takes the key (replacing an object there) — the commit
    /// point. On failure the staged blocks are discarded and parents made for it pruned.
    async fn publish_staged(
        &self,
        bucket_ino: u64,
        key_str: &str,
        key: &KeyPath<'_>,
        mut staged: Staged,
        md5: &str,
        xattrs: BTreeMap<String, String>,
    ) -> S3Result<FileAttr> {
        let fs = &self.fs;
        let (parents, name) = key.split_last();
        let mut attempt = 0;
        let err = loop {
            attempt += 1;
            let parent = match self.make_parents(bucket_ino, parents, key_str).await {
                Ok(p) => p,
                Err(e) => break e,
            };
            match lookup_opt(fs, parent, name) {
                Ok(Some(existing)) if existing.kind != InodeKind::File => {
                    break conflict(key_str, "a folder of that name holds other keys");
                }
                Ok(_) => {}
                Err(e) => break fs_error(e, key_str),
            }
            let with_etag = |now| {
                let mut x = xattrs.clone();
                meta::set_etag(&mut x, md5, now);
                x
            };
            match fs.try_publish(parent, name, staged, with_etag, 0o644, 0, 0).await {
                Ok(attr) => return Ok(attr),
                Err((e, back)) => {
                    staged = back;
                    match e.kind() {
                        // A concurrent DELETE pruned the parent we just made: make it again.
                        ErrorKind::NotFound if attempt < PUBLISH_ATTEMPTS => continue,
                        ErrorKind::NotFound => {
                            break s3_error!(OperationAborted, "{key_str:?}: parent folders kept being removed; retry");
                        }
                        ErrorKind::IsDir => break conflict(key_str, "a folder of that name holds other keys"),
                        _ => break fs_error(e, key_str),
                    }
                }
            }
        };
        fs.discard_staged(staged).await;
        self.prune(bucket_ino, parents).await;
        Err(err)
    }

    /// Multipart Complete: a temporary file in `/.tidepool/tmp/` gets the parts' extents (one
    /// `Fs::concat`, no copy) and the xattrs, then is renamed over the key (the commit point).
    /// On failure nothing is visible and the temporary file is removed.
    async fn publish_parts(
        &self,
        bucket_ino: u64,
        key_str: &str,
        key: &KeyPath<'_>,
        parts: Vec<u64>,
        md5: &str,
        mut xattrs: BTreeMap<String, String>,
    ) -> S3Result<FileAttr> {
        let fs = &self.fs;
        let tmp = self.tmp_name();
        let file = fs.create(self.staging_ino, &tmp, 0o644, 0, 0).await.map_err(|e| fs_error(e, key_str))?;
        let res = async {
            let attr = fs.concat(file.ino, &parts).await.map_err(|e| fs_error(e, key_str))?;
            meta::set_etag(&mut xattrs, md5, attr.mtime);
            fs.replace_xattrs(file.ino, xattrs).await.map_err(|e| fs_error(e, key_str))?;
            let (parents, name) = key.split_last();
            for attempt in 1..=PUBLISH_ATTEMPTS {
                let parent = self.make_parents(bucket_ino, parents, key_str).await?;
                if let Some(existing) = lookup_opt(fs, parent, name).map_err(|e| fs_error(e, key_str))?
                    && existing.kind != InodeKind::File
                {
                    return Err(conflict(key_str, "a folder of that name holds other keys"));
                }
                match fs.rename(self.staging_ino, &tmp, parent, name).await {
                    Ok(()) => return Ok(attr),
                    // A concurrent DELETE pruned the parent we just made: make it again.
                    Err(e) if e.kind() == ErrorKind::NotFound && attempt < PUBLISH_ATTEMPTS => continue,
                    Err(e) if e.kind() == ErrorKind::IsDir => {
                        return Err(conflict(key_str, "a folder of that name holds other keys"));
                    }
                    Err(e) => return Err(fs_error(e, key_str)),
                }
            }
            Err(s3_error!(OperationAborted, "{key_str:?}: parent folders kept being removed; retry"))
        }
        .await;
        if res.is_err() {
            if let Err(e) = fs.unlink(self.staging_ino, &tmp).await {
                tracing::warn!(error = %e, "cannot remove a failed upload's temporary file; removed at next start");
            }
            self.prune(bucket_ino, key.split_last().0).await;
        }
        res
    }

    /// A folder marker: the directory (created as needed) carries the object's xattrs.
    async fn publish_folder(
        &self,
        bucket_ino: u64,
        key_str: &str,
        key: &KeyPath<'_>,
        mut xattrs: BTreeMap<String, String>,
        md5: &str,
    ) -> S3Result<FileAttr> {
        let dir = self.make_parents(bucket_ino, &key.segments, key_str).await?;
        let attr = self.fs.getattr(dir).map_err(|e| fs_error(e, key_str))?;
        meta::set_etag(&mut xattrs, md5, attr.mtime);
        self.fs.replace_xattrs(dir, xattrs).await.map_err(|e| fs_error(e, key_str))?;
        Ok(attr)
    }

    /// `mkdir -p` of `segments` below the bucket; a segment that is an object is a conflict.
    pub(crate) async fn make_parents(&self, bucket_ino: u64, segments: &[&[u8]], key: &str) -> S3Result<u64> {
        let mut cur = bucket_ino;
        for seg in segments {
            cur = match lookup_opt(&self.fs, cur, seg).map_err(|e| fs_error(e, key))? {
                Some(a) if a.kind == InodeKind::Dir => a.ino,
                Some(_) => {
                    let prefix = String::from_utf8_lossy(seg);
                    return Err(conflict(key, &format!("{prefix:?} is an object, so it cannot hold keys")));
                }
                None => match self.fs.mkdir(cur, seg, 0o755, 0, 0).await {
                    Ok(a) => a.ino,
                    Err(e) if e.kind() == ErrorKind::Exists => match lookup_opt(&self.fs, cur, seg) {
                        Ok(Some(a)) if a.kind == InodeKind::Dir => a.ino,
                        _ => return Err(conflict(key, "a parent was created as an object concurrently")),
                    },
                    Err(e) => return Err(fs_error(e, key)),
                },
            };
        }
        Ok(cur)
    }

    /// Remove the empty directories of `segments` (deepest first) that are not folder
    /// markers, up to (not including) the bucket. Best effort: stops at the first that stays.
    pub(crate) async fn prune(&self, bucket_ino: u64, segments: &[&[u8]]) {
        let mut inos = vec![bucket_ino];
        for seg in segments {
            match lookup_opt(&self.fs, *inos.last().unwrap_or(&bucket_ino), seg) {
                Ok(Some(a)) if a.kind == InodeKind::Dir => inos.push(a.ino),
                _ => break,
            }
        }
        for i in (1..inos.len()).rev() {
            let dir = inos[i];
            let marker = self.fs.get_xattrs(dir).map(|x| x.contains_key(meta::ETAG)).unwrap_or(true);
            let empty = self.fs.readdir(dir, None, 1).map(|(e, _)| e.is_empty()).unwrap_or(false);
            if marker || !empty || self.fs.rmdir(inos[i - 1], segments[i - 1]).await.is_err() {
                return;
            }
        }
    }

    /// The object at `key`: a file, or a folder-marker directory for a key ending in `/`.
    pub(crate) fn find_object(&self, bucket: &str, key: &str) -> S3Result<(FileAttr, BTreeMap<String, String>)> {
        let b = self.require_bucket(bucket)?;
        let kp = parse_key(key)?;
        let mut cur = b;
        for seg in &kp.segments {
            if cur.kind != InodeKind::Dir {
                return Err(no_such_key(key));
            }
            cur = lookup_opt(&self.fs, cur.ino, seg).map_err(|e| fs_error(e, key))?.ok_or_else(|| no_such_key(key))?;
        }
        let x = self.fs.get_xattrs(cur.ino).map_err(|e| fs_error(e, key))?;
        let ok = match cur.kind {
            InodeKind::File => !kp.folder,
            InodeKind::Dir => kp.folder && x.contains_key(meta::ETAG),
            InodeKind::Symlink => false,
        };
        if !ok {
            return Err(no_such_key(key));
        }
        Ok((cur, x))
    }

    pub(crate) async fn op_delete_object(
        &self,
        req: S3Request<DeleteObjectInput>,
    ) -> S3Result<S3Response<DeleteObjectOutput>> {
        self.delete_key(&req.input.bucket, &req.input.key).await?;
        Ok(S3Response::new(DeleteObjectOutput::default()))
    }

    /// Delete one key; a missing key is success (as S3). Empty parents are pruned.
    async fn delete_key(&self, bucket: &str, key_str: &str) -> S3Result<()> {
        let b = self.require_bucket(bucket)?;
        let key = parse_key(key_str)?;
        let (parents, name) = key.split_last();
        let mut parent = b.ino;
        for seg in parents {
            match lookup_opt(&self.fs, parent, seg).map_err(|e| fs_error(e, key_str))? {
                Some(a) if a.kind == InodeKind::Dir => parent = a.ino,
                _ => return Ok(()),
            }
        }
        let Some(target) = lookup_opt(&self.fs, parent, name).map_err(|e| fs_error(e, key_str))? else {
            return Ok(());
        };
        match (target.kind, key.folder) {
            (InodeKind::File, false) => match self.fs.unlink(parent, name).await {
                Ok(()) => {}
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(fs_error(e, key_str)),
            },
            (InodeKind::Dir, true) => {
                let x = self.fs.get_xattrs(target.ino).map_err(|e| fs_error(e, key_str))?;
                if !x.contains_key(meta::ETAG) {
                    return Ok(());
                }
                // The marker goes; the folder stays while it holds other keys.
                let rest: BTreeMap<String, String> = x.into_iter().filter(|(k, _)| !k.starts_with(':')).collect();
                self.fs.replace_xattrs(target.ino, rest).await.map_err(|e| fs_error(e, key_str))?;
                self.prune(b.ino, &key.segments).await;
                return Ok(());
            }
            _ => return Ok(()),
        }
        self.prune(b.ino, parents).await;
        Ok(())
    }

    pub(crate) async fn op_delete_objects(
        &self,
        req: S3Request<DeleteObjectsInput>,
    ) -> S3Result<S3Response<DeleteObjectsOutput>> {
        let input = req.input;
        self.require_bucket(&input.bucket)?;
        let quiet = input.delete.quiet.unwrap_or(false);
        let (mut deleted, mut errors) = (Vec::new(), Vec::new());
        for obj in input.delete.objects {
            match self.delete_key(&input.bucket, &obj.key).await {
                Ok(()) if quiet => {}
                Ok(()) => deleted.push(DeletedObject { key: Some(obj.key), ..Default::default() }),
                Err(e) => errors.push(Error {
                    code: Some(e.code().as_str().to_owned()),
                    message: e.message().map(str::to_owned),
                    key: Some(obj.key),
                    version_id: None,
                }),
            }
        }
        Ok(S3Response::new(DeleteObjectsOutput {
            deleted: Some(deleted),
            errors: (!errors.is_empty()).then_some(errors),
            ..Default::default()
        }))
    }

    pub(crate) async fn op_copy_object(
        &self,
        req: S3Request<CopyObjectInput>,
    ) -> S3Result<S3Response<CopyObjectOutput>> {
        let input = req.input;
        let (src_bucket, src_key) = match &input.copy_source {
            CopySource::Bucket { bucket, key, version_id: None } => (bucket.to_string(), key.to_string()),
            CopySource::Bucket { .. } => return Err(s3_error!(NotImplemented, "versions are not supported")),
            _ => return Err(s3_error!(NotImplemented, "access point and outpost copy sources are not supported")),
        };
        let (sattr, sx) = self.find_object(&src_bucket, &src_key)?;
        let src_etag = meta::etag(&sattr, &sx);
        let conds = CopyConditions {
            if_match: input.copy_source_if_match.as_ref(),
            if_none_match: input.copy_source_if_none_match.as_ref(),
            if_modified_since: input.copy_source_if_modified_since.as_ref(),
            if_unmodified_since: input.copy_source_if_unmodified_since.as_ref(),
        };
        check_copy_conditions(&src_etag, sattr.mtime, &conds)?;
        let replace = input.metadata_directive.as_ref().is_some_and(|d| d.as_str() == MetadataDirective::REPLACE);
        if src_bucket == input.bucket && src_key == input.key && !replace {
            return Err(s3_error!(
                InvalidRequest,
                "This copy request is illegal because it is trying to copy an object to itself without changing the object's metadata, storage class, website redirect location or encryption attributes."
            ));
        }
        let dst_bucket = self.require_bucket(&input.bucket)?;
        let key = parse_key(&input.key)?;
        let size = if sattr.kind == InodeKind::File { sattr.size } else { 0 };
        if size > MAX_OBJECT_BYTES {
            return Err(s3_error!(InvalidRequest, "a copy source is at most 5 GiB; use UploadPartCopy"));
        }
        // The copy gets a checksum of the algorithm asked for, else of the source's.
        let alg = match &input.checksum_algorithm {
            Some(a) => Some(Alg::from_dto(a)?),
            None => checksum::Stored::load(&sattr, &sx).map(|c| c.alg),
        };
        let mut xattrs = if replace {
            let sys = SystemHeaders {
                content_type: input.content_type.clone(),
                content_encoding: input.content_encoding.clone(),
                content_disposition: input.content_disposition.clone(),
                cache_control: input.cache_control.clone(),
                content_language: input.content_language.clone(),
                expires: input.expires.clone(),
            };
            meta::to_xattrs(input.metadata.as_ref(), &sys)
        } else {
            // The copy is a new single-part body: what described the source's body goes.
            sx.into_iter().filter(|(k, _)| !meta::is_body_key(k)).collect()
        };
        let StagedBody { staged, md5, digest, .. } = self.stage_copy(sattr.ino, 0, size, &src_key, alg).await?;
        let stored = alg.zip(digest).map(|(alg, d)| checksum::Stored { alg, value: base64(&d), composite: false });
        if let Some(c) = &stored {
            c.store(&mut xattrs);
        }
        let attr = if key.folder {
            if size > 0 {
                self.fs.discard_staged(staged).await;
                return Err(invalid_key(&input.key, "a key ending in '/' is a folder and takes an empty body"));
            }
            self.publish_folder(dst_bucket.ino, &input.key, &key, xattrs, &md5).await?
        } else {
            self.publish(dst_bucket.ino, &input.key, &key, Content::Staged(staged), &md5, xattrs).await?
        };
        let mut result = CopyObjectResult {
            e_tag: Some(ETag::Strong(md5)),
            last_modified: Some(meta::timestamp(attr.mtime)),
            ..Default::default()
        };
        if let Some(c) = stored {
            result.checksum_type = Some(c.checksum_type());
            set_checksum_fields!(result, c.fields());
        }
        Ok(S3Response::new(CopyObjectOutput { copy_object_result: Some(result), ..Default::default() }))
    }

    /// Read `len` bytes at `start` of file `ino` into staged blocks, with their MD5 and the
    /// digest of `alg`.
    pub(crate) async fn stage_copy(
        &self,
        ino: u64,
        start: u64,
        len: u64,
        what: &str,
        alg: Option<Alg>,
    ) -> S3Result<StagedBody> {
        let bs = self.fs.options().block_size;
        let mut md5 = Md5::new();
        let mut hasher = alg.map(Alg::hasher);
        let mut staged = Staged::default();
        let mut off = start;
        let end = start + len;
        while off < end {
            let n = (end - off).min(bs as u64) as usize;
            let res = async {
                let data = self.fs.read(ino, off, n).await?;
                if data.len() != n {
                    return Err(tidepool_fs::FsError::Invalid("copy source changed while it was read"));
                }
                md5.update(&data);
                if let Some(h) = &mut hasher {
                    h.update(&data);
                }
                self.fs.stage(&data).await
            }
            .await;
            match res {
                Ok(s) => staged.append(s),
                Err(e) => {
                    self.fs.discard_staged(staged).await;
                    return Err(fs_error(e, what));
                }
            }
            off += n as u64;
        }
        Ok(StagedBody { staged, md5: hex(&md5.finalize()), size: len, digest: hasher.map(|h| h.finalize()) })
    }
}

async fn join_stage(h: tokio::task::JoinHandle<tidepool_fs::Result<Staged>>) -> S3Result<Staged> {
    match h.await {
        Ok(r) => r.map_err(|e| fs_error(e, "upload")),
        Err(e) => Err(s3_error!(InternalError, "staging task failed: {e}")),
    }
}

pub(crate) fn etag_matches(cond: &ETagCondition, etag: &str) -> bool {
    match cond {
        ETagCondition::Any => true,
        ETagCondition::ETag(e) => e.value() == etag,
    }
}

/// CopyObject's and UploadPartCopy's x-amz-copy-source-if-* headers: every failure is 412.
pub(crate) fn check_copy_conditions(etag: &str, mtime: i64, input: &CopyConditions<'_>) -> S3Result<()> {
    let secs = mtime.div_euclid(1_000_000_000);
    let failed = || s3_error!(PreconditionFailed, "a copy-source condition failed");
    if let Some(c) = input.if_match {
        if !etag_matches(c, etag) {
            return Err(failed());
        }
    } else if let Some(t) = input.if_unmodified_since
        && secs > meta::unix_secs(t)
    {
        return Err(failed());
    }
    if let Some(c) = input.if_none_match {
        if etag_matches(c, etag) {
            return Err(failed());
        }
    } else if let Some(t) = input.if_modified_since
        && secs <= meta::unix_secs(t)
    {
        return Err(failed());
    }
    Ok(())
}

fn digest_failed() -> s3s::S3Error {
    s3_error!(InternalError, "hashing the request body failed")
}

pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub(crate) fn from_hex(s: &str) -> Vec<u8> {
    (0..s.len() / 2).filter_map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).ok()).collect()
}

pub(crate) fn base64(b: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for c in b.chunks(3) {
        let n = (c[0] as u32) << 16 | (*c.get(1).unwrap_or(&0) as u32) << 8 | *c.get(2).unwrap_or(&0) as u32;
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// How much of a refused request's body is read before the error answer (see [`drain_body`]).
const DRAIN_ON_ERROR_BYTES: u64 = 8 << 20;

/// Read and drop (a bounded part of) a request body before answering an early error.
/// A client that sent `Expect: 100-continue` and stopped waiting for the `100` (botocore
/// waits one second, longer is common under load) sends the body anyway; answering and
/// closing the connection with those bytes unread makes the kernel reset it, and the client
/// loses the error response (seen as a bare 404 in the boto3 tests under load). Draining a
/// small body lets the error arrive whole; a larger one is cut off after
/// [`DRAIN_ON_ERROR_BYTES`], as S3 cuts off an upload it refuses.
pub(crate) async fn drain_body(body: Option<StreamingBlob>) {
    let Some(mut body) = body else { return };
    let mut read = 0u64;
    while read <= DRAIN_ON_ERROR_BYTES {
        match body.next().await {
            Some(Ok(chunk)) => read += chunk.len() as u64,
            _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn base64_of_md5() {
        assert_eq!(super::base64(b"f"), "Zg==");
        assert_eq!(super::base64(b"fo"), "Zm8=");
        assert_eq!(super::base64(b"foo"), "Zm9v");
        assert_eq!(super::base64(&super::from_hex("d41d8cd98f00b204e9800998ecf8427e")), "1B2M2Y8AsgTpgAmY7PhCfg==");
    }
}
