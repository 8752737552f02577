//! Multipart upload: Create, UploadPart, UploadPartCopy, Complete, Abort, ListParts,
//! ListMultipartUploads.
//!
//! An upload is a directory `/.tidepool/uploads/<upload-id>/` (outside every bucket, so nothing
//! of it is visible to listings until Complete). Its xattrs hold the destination (`:mp-bucket`,
//! `:mp-key`), the initiation time (`:mp-initiated`, ns) and the object metadata given at
//! Create (user metadata and `:content-type` etc., as [`crate::meta`] stores them). Each part is
//! a file named by its decimal part number, written like a PUT (staged blocks, then one
//! `Fs::publish` into the upload: a same-numbered part is replaced whole), with its MD5 in
//! `:etag`. Parts survive a restart.
//!
//! Complete copies no data: the listed parts are checked (ETags, order, 5 MiB minimum for all
//! but the last), a temporary file in the staging folder gets their extents in one `Fs::concat`
//! commit, the metadata and the multipart ETag (MD5 of the binary part MD5s, `-N`), and is
//! renamed over the key like a PUT. The upload directory (and any part not listed) is removed.
//!
//! Complete and Abort first claim the upload by renaming its directory to `<upload-id>.claimed`
//! (atomic in the metadata): of two concurrent Completes the second finds no upload
//! (`NoSuchUpload`). A Complete that fails before the parts are joined renames it back, so the
//! client can fix its request and retry; a claim left by a crash is released at the next start.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};

use md5::{Digest, Md5};
use s3s::dto::*;
use s3s::{S3Error, S3Request, S3Response, S3Result, s3_error};
use tidepool_fs::{ErrorKind, FileAttr, InodeKind, Staged};

use crate::checksum::{self, Alg};
use crate::error::{fs_error, invalid_key};
use crate::meta::{self, SystemHeaders};
use crate::names::parse_key;
use crate::object::{
    Content, CopyConditions, StagedBody, base64, check_copy_conditions, checksum_fields, from_hex, hex,
    set_checksum_fields,
};
use crate::{TidepoolS3, lookup_opt, remove_tree_contents};

/// Where uploads in progress live.
pub const UPLOADS_DIR: &[u8] = b"/.tidepool/uploads";
/// Smallest part but the last (S3's rule).
pub const MIN_PART_BYTES: u64 = 5 << 20;
/// Part numbers are 1..=10000 (S3's rule).
pub const MAX_PART_NUMBER: i32 = 10_000;
/// Upload directory xattrs.
const MP_BUCKET: &str = ":mp-bucket";
const MP_KEY: &str = ":mp-key";
const MP_INITIATED: &str = ":mp-initiated";
/// The checksum algorithm (`CRC32`, ...) and type (`COMPOSITE` / `FULL_OBJECT`) the upload was
/// created with: every part is hashed with it, and Complete gives the object that checksum.
const MP_CHECKSUM_ALG: &str = ":mp-checksum-algorithm";
const MP_CHECKSUM_TYPE: &str = ":mp-checksum-type";
/// Suffix of an upload directory claimed by a Complete or Abort in progress.
const CLAIMED: &str = ".claimed";

static ID_SEQ: AtomicU64 = AtomicU64::new(0);

/// A fresh upload id: 32 hex digits from two hashers keyed by the OS random source (std's
/// `RandomState`) over the time and a counter: unguessable, URL-safe, a valid file name.
fn new_upload_id() -> String {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    let seq = ID_SEQ.fetch_add(1, Ordering::Relaxed);
    let mut out = String::with_capacity(32);
    for i in 0..2u8 {
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(nanos);
        h.write_u64(seq);
        h.write_u8(i);
        out.push_str(&format!("{:016x}", h.finish()));
    }
    out
}

fn valid_upload_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|c| c.is_ascii_digit() || (b'a'..=b'f').contains(&c))
}

fn no_such_upload(id: &str) -> S3Error {
    s3_error!(NoSuchUpload, "upload {id:?} does not exist: it was never created, or it was completed or aborted")
}

fn check_part_number(n: i32) -> S3Result<()> {
    if !(1..=MAX_PART_NUMBER).contains(&n) {
        return Err(s3_error!(InvalidArgument, "Part number must be an integer between 1 and 10000, inclusive"));
    }
    Ok(())
}

/// An upload found by id, checked against the bucket and key of the request.
struct Upload {
    dir: FileAttr,
    xattrs: BTreeMap<String, String>,
}

/// A stored part.
struct PartInfo {
    ino: u64,
    size: u64,
    etag: String,
    mtime: i64,
    checksum: Option<checksum::Stored>,
}

/// What a Complete makes of the listed parts.
struct Joined {
    /// The parts' files, in order.
    inos: Vec<u64>,
    /// The multipart ETag: MD5 of the binary part MD5s, `-N`.
    etag: String,
    sizes: meta::PartSizes,
    /// The object's checksum, when the upload was created with an algorithm.
    checksum: Option<checksum::Stored>,
}

impl Upload {
    /// The checksum algorithm of the upload and whether its object checksum is COMPOSITE.
    fn checksum(&self) -> Option<(Alg, bool)> {
        let alg = Alg::parse(self.xattrs.get(MP_CHECKSUM_ALG)?)?;
        let composite = self.xattrs.get(MP_CHECKSUM_TYPE).map(String::as_str) != Some(ChecksumType::FULL_OBJECT);
        Some((alg, composite))
    }
}

/// The checksum algorithm and type of a CreateMultipartUpload, checked as S3 does.
fn upload_checksum(
    alg: Option<&ChecksumAlgorithm>,
    typ: Option<&ChecksumType>,
) -> S3Result<Option<(Alg, &'static str)>> {
    let Some(alg) = alg else {
        return match typ {
            Some(_) => Err(s3_error!(
                InvalidRequest,
                "The x-amz-checksum-type header can only be used with the x-amz-checksum-algorithm header."
            )),
            None => Ok(None),
        };
    };
    let alg = Alg::from_dto(alg)?;
    let typ = match typ.map(ChecksumType::as_str) {
        None => alg.default_multipart_type(),
        Some(t) if t.eq_ignore_ascii_case(ChecksumType::COMPOSITE) => ChecksumType::COMPOSITE,
        Some(t) if t.eq_ignore_ascii_case(ChecksumType::FULL_OBJECT) => ChecksumType::FULL_OBJECT,
        Some(t) => return Err(s3_error!(InvalidRequest, "Value for x-amz-checksum-type header is invalid: {t:?}")),
    };
    let ok = if typ == ChecksumType::FULL_OBJECT { alg.is_crc() } else { alg != Alg::Crc64Nvme };
    if !ok {
        return Err(s3_error!(
            InvalidRequest,
            "The {typ} checksum type cannot be used with the {} checksum algorithm.",
            alg.name()
        ));
    }
    Ok(Some((alg, typ)))
}

impl TidepoolS3 {
    /// Create the uploads folder, and release the claims a crash left (see the module doc).
    pub(crate) async fn init_uploads(fs: &tidepool_fs::Fs) -> tidepool_fs::Result<u64> {
        let dir = fs.mkdir_all(UPLOADS_DIR, 0o700).await?;
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (entries, eof) = fs.readdir(dir.ino, after.as_deref(), 1000)?;
            for e in &entries {
                let name = String::from_utf8_lossy(&e.name).into_owned();
                let x = fs.get_xattrs(e.attr.ino)?;
                if let Some(id) = name.strip_suffix(CLAIMED)
                    && x.contains_key(MP_KEY)
                    && fs.lookup(dir.ino, id.as_bytes()).is_err()
                {
                    fs.rename(dir.ino, &e.name, dir.ino, id.as_bytes()).await?;
                } else if !x.contains_key(MP_KEY) || e.attr.kind != InodeKind::Dir {
                    // Created but never described (a crash inside Create): not an upload.
                    if e.attr.kind == InodeKind::Dir {
                        remove_tree_contents(fs, e.attr.ino).await?;
                        fs.rmdir(dir.ino, &e.name).await?;
                    } else {
                        fs.unlink(dir.ino, &e.name).await?;
                    }
                }
            }
            if eof || entries.is_empty() {
                return Ok(dir.ino);
            }
            after = entries.last().map(|e| e.name.clone());
        }
    }

    /// The upload `id` for `bucket`/`key`, or `NoSuchUpload`.
    fn find_upload(&self, bucket: &str, key: &str, id: &str) -> S3Result<Upload> {
        self.require_bucket(bucket)?;
        if !valid_upload_id(id) {
            return Err(no_such_upload(id));
        }
        let dir = lookup_opt(&self.fs, self.uploads_ino, id.as_bytes())
            .map_err(|e| fs_error(e, id))?
            .filter(|a| a.kind == InodeKind::Dir)
            .ok_or_else(|| no_such_upload(id))?;
        let xattrs = self.fs.get_xattrs(dir.ino).map_err(|e| fs_error(e, id))?;
        if xattrs.get(MP_BUCKET).map(String::as_str) != Some(bucket)
            || xattrs.get(MP_KEY).map(String::as_str) != Some(key)
        {
            return Err(no_such_upload(id));
        }
        Ok(Upload { dir, xattrs })
    }

    /// The parts of upload directory `dir`, by part number.
    fn parts_of(&self, dir: u64, what: &str) -> S3Result<BTreeMap<i32, PartInfo>> {
        let mut parts = BTreeMap::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (entries, eof) = self.fs.readdir(dir, after.as_deref(), 1000).map_err(|e| fs_error(e, what))?;
            for e in &entries {
                let Some(n) = std::str::from_utf8(&e.name).ok().and_then(|s| s.parse::<i32>().ok()) else {
                    continue;
                };
                if e.attr.kind != InodeKind::File {
                    continue;
                }
                let x = self.fs.get_xattrs(e.attr.ino).map_err(|e| fs_error(e, what))?;
                let etag = meta::etag(&e.attr, &x);
                let checksum = checksum::Stored::load(&e.attr, &x);
                parts.insert(n, PartInfo { ino: e.attr.ino, size: e.attr.size, etag, mtime: e.attr.mtime, checksum });
            }
            if eof || entries.is_empty() {
                return Ok(parts);
            }
            after = entries.last().map(|e| e.name.clone());
        }
    }

    pub(crate) async fn op_create_multipart_upload(
        &self,
        req: S3Request<CreateMultipartUploadInput>,
    ) -> S3Result<S3Response<CreateMultipartUploadOutput>> {
        let input = req.input;
        self.require_bucket(&input.bucket)?;
        let key = parse_key(&input.key)?;
        if key.folder {
            return Err(invalid_key(&input.key, "a key ending in '/' is a folder and takes an empty body"));
        }
        let ck = upload_checksum(input.checksum_algorithm.as_ref(), input.checksum_type.as_ref())?;
        let sys = SystemHeaders {
            content_type: input.content_type.clone(),
            content_encoding: input.content_encoding.clone(),
            content_disposition: input.content_disposition.clone(),
            cache_control: input.cache_control.clone(),
            content_language: input.content_language.clone(),
            expires: input.expires.clone(),
        };
        let mut xattrs = meta::to_xattrs(input.metadata.as_ref(), &sys);
        if let Some((alg, typ)) = ck {
            xattrs.insert(MP_CHECKSUM_ALG.into(), alg.upper().into());
            xattrs.insert(MP_CHECKSUM_TYPE.into(), typ.into());
        }
        xattrs.insert(MP_BUCKET.into(), input.bucket.clone());
        xattrs.insert(MP_KEY.into(), input.key.clone());
        let id = new_upload_id();
        let dir = self.fs.mkdir(self.uploads_ino, id.as_bytes(), 0o700, 0, 0).await.map_err(|e| fs_error(e, &id))?;
        xattrs.insert(MP_INITIATED.into(), dir.mtime.to_string());
        if let Err(e) = self.fs.replace_xattrs(dir.ino, xattrs).await {
            let _ = self.fs.rmdir(self.uploads_ino, id.as_bytes()).await;
            return Err(fs_error(e, &input.key));
        }
        tracing::debug!(bucket = input.bucket, key = input.key, upload_id = id, "multipart upload created");
        Ok(S3Response::new(CreateMultipartUploadOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(id),
            checksum_algorithm: ck.map(|(a, _)| a.dto()),
            checksum_type: ck.map(|(_, t)| ChecksumType::from_static(t)),
            ..Default::default()
        }))
    }

    /// Make `staged` part `n` of the upload in directory `dir`: one `Fs::publish` makes a file
    /// of the blocks and the ETag take the part's name (replacing a part of that number).
    async fn put_part(
        &self,
        dir: u64,
        id: &str,
        n: i32,
        staged: Staged,
        md5: &str,
        ck: Option<&checksum::Stored>,
    ) -> S3Result<FileAttr> {
        let with_etag = |now| {
            let mut x = BTreeMap::new();
            meta::set_etag(&mut x, md5, now);
            if let Some(c) = ck {
                c.store(&mut x);
            }
            x
        };
        match self.fs.publish(dir, n.to_string().as_bytes(), staged, with_etag, 0o644, 0, 0).await {
            Ok(attr) => Ok(attr),
            // The upload was completed or aborted meanwhile.
            Err(e) if e.kind() == ErrorKind::NotFound => Err(no_such_upload(id)),
            Err(e) => Err(fs_error(e, id)),
        }
    }

    pub(crate) async fn op_upload_part(
        &self,
        req: S3Request<UploadPartInput>,
    ) -> S3Result<S3Response<UploadPartOutput>> {
        let mut input = req.input;
        let body = input.body.take();
        let found = check_part_number(input.part_number)
            .and_then(|()| self.find_upload(&input.bucket, &input.key, &input.upload_id))
            .and_then(|up| {
                let ck =
                    checksum::requested(&checksum_fields!(input), input.checksum_algorithm.as_ref(), &req.headers)?;
                // Parts of an upload created with an algorithm are all hashed with it.
                let alg = match (up.checksum(), &ck) {
                    (Some((want, _)), Some(c)) if c.alg != want => {
                        return Err(s3_error!(
                            InvalidRequest,
                            "Checksum Type mismatch occurred, expected checksum Type: {}, actual checksum Type: {}",
                            want.name(),
                            c.alg.name()
                        ));
                    }
                    (Some((want, _)), _) => Some(want),
                    (None, c) => c.as_ref().map(|c| c.alg),
                };
                Ok((up, ck, alg))
            });
        let (up, ck, alg) = match found {
            Ok(v) => v,
            Err(e) => {
                crate::object::drain_body(body).await;
                return Err(e);
            }
        };
        let StagedBody { staged, md5, size, digest } = self.stage_optional_body(body, alg).await?;
        let verified = match &ck {
            Some(_) => self.check_digests(
                input.content_md5.as_deref(),
                &md5,
                ck.as_ref(),
                digest,
                req.trailing_headers.as_ref(),
            ),
            // Not asked by the client, computed for the upload's algorithm.
            None => self
                .check_digests(input.content_md5.as_deref(), &md5, None, None, None)
                .map(|_| alg.zip(digest).map(|(alg, d)| checksum::Stored { alg, value: base64(&d), composite: false })),
        };
        let stored = match verified {
            Ok(v) => v,
            Err(e) => {
                self.fs.discard_staged(staged).await;
                return Err(e);
            }
        };
        self.put_part(up.dir.ino, &input.upload_id, input.part_number, staged, &md5, stored.as_ref()).await?;
        self.metrics.bytes_in(size);
        let mut out = UploadPartOutput { e_tag: Some(ETag::Strong(md5)), ..Default::default() };
        if let Some(c) = stored {
            set_checksum_fields!(out, c.fields());
        }
        Ok(S3Response::new(out))
    }

    pub(crate) async fn op_upload_part_copy(
        &self,
        req: S3Request<UploadPartCopyInput>,
    ) -> S3Result<S3Response<UploadPartCopyOutput>> {
        let input = req.input;
        check_part_number(input.part_number)?;
        let up = self.find_upload(&input.bucket, &input.key, &input.upload_id)?;
        let (src_bucket, src_key) = match &input.copy_source {
            CopySource::Bucket { bucket, key, version_id: None } => (bucket.to_string(), key.to_string()),
            CopySource::Bucket { .. } => return Err(s3_error!(NotImplemented, "versions are not supported")),
            _ => return Err(s3_error!(NotImplemented, "access point and outpost copy sources are not supported")),
        };
        let (sattr, sx) = self.find_object(&src_bucket, &src_key)?;
        let src_etag = meta::etag(&sattr, &sx);
        check_copy_conditions(
            &src_etag,
            sattr.mtime,
            &CopyConditions {
                if_match: input.copy_source_if_match.as_ref(),
                if_none_match: input.copy_source_if_none_match.as_ref(),
                if_modified_since: input.copy_source_if_modified_since.as_ref(),
                if_unmodified_since: input.copy_source_if_unmodified_since.as_ref(),
            },
        )?;
        let size = if sattr.kind == InodeKind::File { sattr.size } else { 0 };
        let (start, len) = match &input.copy_source_range {
            None => (0, size),
            Some(r) => parse_copy_range(r, size)?,
        };
        if len > crate::object::MAX_OBJECT_BYTES {
            return Err(s3_error!(InvalidRequest, "a part is at most 5 GiB"));
        }
        let alg = up.checksum().map(|(a, _)| a);
        let StagedBody { staged, md5, digest, .. } = self.stage_copy(sattr.ino, start, len, &src_key, alg).await?;
        let stored = alg.zip(digest).map(|(alg, d)| checksum::Stored { alg, value: base64(&d), composite: false });
        let attr =
            self.put_part(up.dir.ino, &input.upload_id, input.part_number, staged, &md5, stored.as_ref()).await?;
        let mut result = CopyPartResult {
            e_tag: Some(ETag::Strong(md5)),
            last_modified: Some(meta::timestamp(attr.mtime)),
            ..Default::default()
        };
        if let Some(c) = stored {
            set_checksum_fields!(result, c.fields());
        }
        Ok(S3Response::new(UploadPartCopyOutput { copy_part_result: Some(result), ..Default::default() }))
    }

    /// Claim upload `id` (rename its directory to `<id>.claimed`); `NoSuchUpload` if another
    /// Complete or Abort got it first.
    async fn claim(&self, id: &str) -> S3Result<Vec<u8>> {
        let claimed = format!("{id}{CLAIMED}").into_bytes();
        match self.fs.rename(self.uploads_ino, id.as_bytes(), self.uploads_ino, &claimed).await {
            Ok(()) => Ok(claimed),
            Err(e) if e.kind() == ErrorKind::NotFound => Err(no_such_upload(id)),
            Err(e) => Err(fs_error(e, id)),
        }
    }

    /// Give a claimed upload back (its Complete failed before the parts were joined).
    async fn unclaim(&self, id: &str, claimed: &[u8]) {
        if let Err(e) = self.fs.rename(self.uploads_ino, claimed, self.uploads_ino, id.as_bytes()).await {
            tracing::warn!(error = %e, upload_id = id, "cannot release a claimed upload; released at next start");
        }
    }

    /// Remove a claimed upload directory and the parts still in it (their blocks are freed).
    async fn remove_upload(&self, dir: u64, claimed: &[u8]) {
        let res = async {
            remove_tree_contents(&self.fs, dir).await?;
            self.fs.rmdir(self.uploads_ino, claimed).await
        }
        .await;
        if let Err(e) = res {
            tracing::warn!(error = %e, "cannot remove an upload folder");
        }
    }

    /// The parts named by a Complete, checked against the stored ones (present, same ETag, 5 MiB
    /// but the last, same checksum if one is given), and what the object gets from them.
    fn check_listed_parts(&self, up: &Upload, id: &str, listed: &[CompletedPart]) -> S3Result<Joined> {
        let upload_ck = up.checksum();
        let stored = self.parts_of(up.dir.ino, id)?;
        let mut inos = Vec::with_capacity(listed.len());
        let mut sizes = Vec::with_capacity(listed.len());
        let mut digests = Vec::with_capacity(listed.len());
        let mut md5s = Md5::new();
        for (i, p) in listed.iter().enumerate() {
            let n = p.part_number.unwrap_or_default();
            let part = stored.get(&n).ok_or_else(|| {
                s3_error!(InvalidPart, "part {n} was not uploaded (or was replaced); ListParts shows what is there")
            })?;
            let etag_ok = p.e_tag.as_ref().is_some_and(|e| e.value().trim_matches('"') == part.etag);
            if !etag_ok {
                return Err(s3_error!(InvalidPart, "the ETag given for part {n} does not match the stored part"));
            }
            if i + 1 < listed.len() && part.size < MIN_PART_BYTES {
                return Err(s3_error!(
                    EntityTooSmall,
                    "part {n} is {} bytes; every part but the last must be at least 5 MiB",
                    part.size
                ));
            }
            check_part_checksum(n, p, part.checksum.as_ref())?;
            if let Some((alg, true)) = upload_ck
                && checksum::field(&checksum_fields!(p), alg).is_none()
            {
                return Err(s3_error!(
                    InvalidRequest,
                    "The upload was created using a {} checksum. The complete request must include the checksum for each part. It was missing for part {n} in the request.",
                    alg.name()
                ));
            }
            if let Some((alg, _)) = upload_ck {
                let d = part.checksum.as_ref().filter(|c| c.alg == alg).and_then(checksum::Stored::raw);
                let d = d.ok_or_else(|| {
                    s3_error!(InvalidPart, "part {n} has no {} checksum; upload it again", alg.upper())
                })?;
                digests.push((d, part.size));
            }
            md5s.update(from_hex(&part.etag));
            inos.push(part.ino);
            sizes.push(part.size);
        }
        Ok(Joined {
            inos,
            etag: format!("{}-{}", hex(&md5s.finalize()), listed.len()),
            sizes: meta::PartSizes(sizes),
            checksum: upload_ck.map(|(alg, composite)| checksum::multipart(alg, composite, &digests)),
        })
    }

    pub(crate) async fn op_complete_multipart_upload(
        &self,
        req: S3Request<CompleteMultipartUploadInput>,
    ) -> S3Result<S3Response<CompleteMultipartUploadOutput>> {
        let input = req.input;
        let input_ck = checksum_fields!(input);
        let id = input.upload_id.clone();
        let listed: Vec<CompletedPart> = input.multipart_upload.and_then(|m| m.parts).unwrap_or_default();
        if listed.is_empty() {
            return Err(s3_error!(MalformedXML, "CompleteMultipartUpload needs at least one part"));
        }
        let mut prev = 0;
        for p in &listed {
            let n = p.part_number.ok_or_else(|| s3_error!(MalformedXML, "a part without PartNumber"))?;
            check_part_number(n)?;
            if n <= prev {
                return Err(s3_error!(
                    InvalidPartOrder,
                    "The list of parts was not in ascending order. Parts must be ordered by part number."
                ));
            }
            prev = n;
        }
        let bucket = self.require_bucket(&input.bucket)?;
        let key = parse_key(&input.key)?;
        let up = self.find_upload(&input.bucket, &input.key, &id)?;
        self.check_put_conditions(&input.bucket, &input.key, input.if_match.as_ref(), input.if_none_match.as_ref())?;
        let claimed = self.claim(&id).await?;

        // Check the listed parts against the stored ones; nothing is changed yet.
        let checked = self.check_listed_parts(&up, &id, &listed).and_then(|c| {
            check_object_checksum(&input_ck, input.checksum_type.as_ref(), c.checksum.as_ref())?;
            Ok(c)
        });
        let Joined { inos, etag, sizes, checksum: object_ck } = match checked {
            Ok(v) => v,
            Err(e) => {
                self.unclaim(&id, &claimed).await;
                return Err(e);
            }
        };
        let mut xattrs: BTreeMap<String, String> =
            up.xattrs.into_iter().filter(|(k, _)| !k.starts_with(":mp-")).collect();
        // GET / HEAD with partNumber answer each part's range from these.
        sizes.store(&mut xattrs);
        if let Some(c) = &object_ck {
            c.store(&mut xattrs);
        }
        let first = inos[0];
        let res = self.publish(bucket.ino, &input.key, &key, Content::Parts(inos), &etag, xattrs).await;
        match &res {
            // The join is all or nothing: if the first part is still there, none was joined and
            // the upload stays usable; once joined, the parts are gone and the upload goes.
            Err(_) if self.fs.getattr(first).is_ok() => self.unclaim(&id, &claimed).await,
            _ => self.remove_upload(up.dir.ino, &claimed).await,
        }
        let attr = res?;
        tracing::debug!(
            bucket = input.bucket,
            key = input.key,
            upload_id = id,
            size = attr.size,
            "multipart completed"
        );
        let mut out = CompleteMultipartUploadOutput {
            bucket: Some(input.bucket.clone()),
            key: Some(input.key.clone()),
            e_tag: Some(ETag::Strong(etag)),
            location: Some(format!("/{}/{}", input.bucket, input.key)),
            ..Default::default()
        };
        if let Some(c) = object_ck {
            out.checksum_type = Some(c.checksum_type());
            set_checksum_fields!(out, c.fields());
        }
        Ok(S3Response::new(out))
    }

    pub(crate) async fn op_abort_multipart_upload(
        &self,
        req: S3Request<AbortMultipartUploadInput>,
    ) -> S3Result<S3Response<AbortMultipartUploadOutput>> {
        let input = req.input;
        let up = self.find_upload(&input.bucket, &input.key, &input.upload_id)?;
        let claimed = self.claim(&input.upload_id).await?;
        self.remove_upload(up.dir.ino, &claimed).await;
        Ok(S3Response::new(AbortMultipartUploadOutput::default()))
    }

    pub(crate) async fn op_list_parts(&self, req: S3Request<ListPartsInput>) -> S3Result<S3Response<ListPartsOutput>> {
        let input = req.input;
        let up = self.find_upload(&input.bucket, &input.key, &input.upload_id)?;
        let max = input.max_parts.unwrap_or(1000).clamp(0, 1000);
        let marker = input.part_number_marker.unwrap_or(0);
        let stored = self.parts_of(up.dir.ino, &input.upload_id)?;
        let mut parts = Vec::new();
        let mut truncated = false;
        for (n, p) in stored.range(marker.saturating_add(1)..) {
            if parts.len() as i32 >= max {
                truncated = true;
                break;
            }
            let mut part = Part {
                part_number: Some(*n),
                e_tag: Some(ETag::Strong(p.etag.clone())),
                size: Some(p.size as i64),
                last_modified: Some(meta::timestamp(p.mtime)),
                ..Default::default()
            };
            if let Some(c) = &p.checksum {
                set_checksum_fields!(part, c.fields());
            }
            parts.push(part);
        }
        Ok(S3Response::new(ListPartsOutput {
            bucket: Some(input.bucket),
            key: Some(input.key),
            upload_id: Some(input.upload_id),
            max_parts: Some(max),
            part_number_marker: Some(marker),
            next_part_number_marker: parts.last().and_then(|p| p.part_number),
            is_truncated: Some(truncated),
            storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
            checksum_algorithm: up.checksum().map(|(a, _)| a.dto()),
            checksum_type: up.checksum().map(|(_, composite)| {
                ChecksumType::from_static(if composite { ChecksumType::COMPOSITE } else { ChecksumType::FULL_OBJECT })
            }),
            parts: Some(parts),
            ..Default::default()
        }))
    }

    pub(crate) async fn op_list_multipart_uploads(
        &self,
        req: S3Request<ListMultipartUploadsInput>,
    ) -> S3Result<S3Response<ListMultipartUploadsOutput>> {
        let input = req.input;
        self.require_bucket(&input.bucket)?;
        let max = input.max_uploads.unwrap_or(1000).clamp(0, 1000) as usize;
        let prefix = input.prefix.clone().unwrap_or_default();
        let delim = input.delimiter.clone().filter(|d| !d.is_empty());
        // Every upload of the bucket under the prefix, in (key, initiated, id) order.
        let mut all: Vec<(String, i64, String)> = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (entries, eof) =
                self.fs.readdir(self.uploads_ino, after.as_deref(), 1000).map_err(|e| fs_error(e, "uploads"))?;
            for e in &entries {
                let Ok(id) = std::str::from_utf8(&e.name) else { continue };
                if !valid_upload_id(id) {
                    continue; // claimed: being completed or aborted
                }
                let x = self.fs.get_xattrs(e.attr.ino).map_err(|e| fs_error(e, id))?;
                if x.get(MP_BUCKET) != Some(&input.bucket) {
                    continue;
                }
                let Some(key) = x.get(MP_KEY).filter(|k| k.starts_with(&prefix)) else { continue };
                let initiated = x.get(MP_INITIATED).and_then(|t| t.parse().ok()).unwrap_or(e.attr.mtime);
                all.push((key.clone(), initiated, id.to_owned()));
            }
            if eof || entries.is_empty() {
                break;
            }
            after = entries.last().map(|e| e.name.clone());
        }
        all.sort();
        let key_marker = input.key_marker.clone().filter(|k| !k.is_empty());
        let id_marker = input.upload_id_marker.clone().filter(|k| !k.is_empty());
        let mut uploads = Vec::new();
        let mut prefixes: Vec<String> = Vec::new();
        let mut truncated = false;
        let (mut next_key, mut next_id) = (None, None);
        for (key, initiated, id) in all {
            if let Some(km) = &key_marker {
                // After the marker: later keys, or with an upload-id marker the same key's later uploads.
                let later_same_key = id_marker.as_ref().is_some_and(|im| key == *km && id > *im);
                if key <= *km && !later_same_key {
                    continue;
                }
            }
            let common = delim.as_ref().and_then(|d| {
                key[prefix.len()..].find(d.as_str()).map(|i| key[..prefix.len() + i + d.len()].to_owned())
            });
            if let Some(cp) = &common
                && prefixes.last() == Some(cp)
            {
                continue;
            }
            if uploads.len() + prefixes.len() >= max {
                truncated = true;
                break;
            }
            match common {
                Some(cp) => {
                    next_key = Some(cp.clone());
                    next_id = None;
                    prefixes.push(cp);
                }
                None => {
                    next_key = Some(key.clone());
                    next_id = Some(id.clone());
                    uploads.push(MultipartUpload {
                        key: Some(key),
                        upload_id: Some(id),
                        initiated: Some(meta::timestamp(initiated)),
                        storage_class: Some(StorageClass::from_static(StorageClass::STANDARD)),
                        ..Default::default()
                    });
                }
            }
        }
        Ok(S3Response::new(ListMultipartUploadsOutput {
            bucket: Some(input.bucket),
            prefix: input.prefix,
            delimiter: input.delimiter,
            key_marker: input.key_marker,
            upload_id_marker: input.upload_id_marker,
            max_uploads: Some(max as i32),
            is_truncated: Some(truncated),
            next_key_marker: if truncated { next_key } else { None },
            next_upload_id_marker: if truncated { next_id } else { None },
            uploads: Some(uploads),
            common_prefixes: (!prefixes.is_empty())
                .then(|| prefixes.into_iter().map(|p| CommonPrefix { prefix: Some(p) }).collect()),
            ..Default::default()
        }))
    }
}

/// A part listed in Complete with a checksum must have been uploaded with that checksum.
fn check_part_checksum(n: i32, listed: &CompletedPart, stored: Option<&checksum::Stored>) -> S3Result<()> {
    let given = checksum_fields!(listed);
    for alg in Alg::ALL {
        let Some(v) = checksum::field(&given, alg) else { continue };
        if stored.is_none_or(|c| c.alg != alg || c.value != *v) {
            return Err(s3_error!(
                InvalidPart,
                "The {} checksum given for part {n} does not match the uploaded part.",
                alg.upper()
            ));
        }
    }
    Ok(())
}

/// A whole-object checksum (or type) sent with Complete must match what the upload gives.
fn check_object_checksum(
    given: &Checksum,
    typ: Option<&ChecksumType>,
    object: Option<&checksum::Stored>,
) -> S3Result<()> {
    if let Some(t) = typ
        && object.is_none_or(|c| !c.checksum_type().as_str().eq_ignore_ascii_case(t.as_str()))
    {
        return Err(s3_error!(
            InvalidRequest,
            "The upload was created using the {} checksum mode. The complete request must use the same checksum mode.",
            object.map_or("no", |c| if c.composite { "COMPOSITE" } else { "FULL_OBJECT" })
        ));
    }
    for alg in Alg::ALL {
        let Some(v) = checksum::field(given, alg) else { continue };
        match object {
            Some(c) if c.alg == alg => {
                // A COMPOSITE value may be sent with or without its `-N`.
                let ours = c.value.as_str();
                let bare = ours.rsplit_once('-').map_or(ours, |(b, _)| b);
                if v != ours && !(c.composite && v == bare) {
                    return Err(checksum::bad_digest(alg));
                }
            }
            _ => {
                return Err(s3_error!(
                    InvalidRequest,
                    "The upload was created without the {} checksum algorithm; Complete cannot name it.",
                    alg.upper()
                ));
            }
        }
    }
    Ok(())
}

/// `x-amz-copy-source-range: bytes=first-last` (both inclusive, within the source).
fn parse_copy_range(r: &str, size: u64) -> S3Result<(u64, u64)> {
    let bad = || {
        s3_error!(
            InvalidArgument,
            "x-amz-copy-source-range must be bytes=first-last within the source object ({size} bytes)"
        )
    };
    let (a, b) = r.trim().strip_prefix("bytes=").and_then(|s| s.split_once('-')).ok_or_else(bad)?;
    let (first, last): (u64, u64) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
    if first > last {
        return Err(bad());
    }
    if last >= size {
        return Err(s3_error!(InvalidRange, "the copy source range {r:?} is outside the source ({size} bytes)"));
    }
    Ok((first, last - first + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_ids_are_fresh_hex() {
        let a = new_upload_id();
        let b = new_upload_id();
        assert!(valid_upload_id(&a) && valid_upload_id(&b) && a != b, "{a} {b}");
        assert!(!valid_upload_id("../x") && !valid_upload_id(&format!("{a}{CLAIMED}")));
    }

    #[test]
    fn copy_ranges() {
        assert_eq!(parse_copy_range("bytes=0-9", 10).unwrap(), (0, 10));
        assert_eq!(parse_copy_range("bytes=5-5", 10).unwrap(), (5, 1));
        assert_eq!(*parse_copy_range("bytes=5-10", 10).unwrap_err().code(), s3s::S3ErrorCode::InvalidRange);
        for bad in ["0-9", "bytes=9-1", "bytes=-3", "bytes=a-b", "bytes=1-"] {
            assert_eq!(*parse_copy_range(bad, 10).unwrap_err().code(), s3s::S3ErrorCode::InvalidArgument, "{bad}");
        }
    }
}
