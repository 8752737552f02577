//! Bucket operations: buckets are top-level directories with valid bucket names.

use s3s::dto::*;
use s3s::{S3Request, S3Response, S3Result, s3_error};
use tidepool_fs::{ErrorKind, InodeKind, ROOT_INO};

use crate::error::{fs_error, no_such_bucket};
use crate::{TidepoolS3, bucket_dir, meta, names};

impl TidepoolS3 {
    pub(crate) fn require_bucket(&self, bucket: &str) -> S3Result<tidepool_fs::FileAttr> {
        bucket_dir(&self.fs, bucket).map_err(|e| fs_error(e, bucket))?.ok_or_else(|| no_such_bucket(bucket))
    }

    pub(crate) async fn op_list_buckets(
        &self,
        _req: S3Request<ListBucketsInput>,
    ) -> S3Result<S3Response<ListBucketsOutput>> {
        let mut buckets = Vec::new();
        let mut after: Option<Vec<u8>> = None;
        loop {
            let (page, eof) = self.fs.readdir(ROOT_INO, after.as_deref(), 1000).map_err(|e| fs_error(e, "/"))?;
            after = page.last().map(|e| e.name.clone());
            for e in page {
                if e.attr.kind != InodeKind::Dir {
                    continue;
                }
                let Ok(name) = String::from_utf8(e.name) else { continue };
                if names::is_bucket_name(&name) {
                    let created = self.bucket_created(&e.attr).await;
                    buckets.push(Bucket {
                        name: Some(name),
                        creation_date: Some(meta::timestamp(created)),
                        bucket_region: Some(self.opts.region.clone()),
                    });
                }
            }
            if eof {
                break;
            }
        }
        let owner = Owner { display_name: Some("tidepool".into()), id: Some("tidepool".into()) };
        Ok(S3Response::new(ListBucketsOutput { buckets: Some(buckets), owner: Some(owner), ..Default::default() }))
    }

    /// A bucket's creation time: recorded at CreateBucket (`:bucket-created`, ns), since a
    /// folder's ctime and mtime move whenever entries are added. A folder made another way
    /// (NFS `mkdir`, or before the key existed) gets the oldest of its times, recorded now so
    /// that it stays (best effort: on a read-only filesystem it is computed each time).
    async fn bucket_created(&self, dir: &tidepool_fs::FileAttr) -> i64 {
        if let Ok(Some(t)) = self.fs.get_xattr(dir.ino, meta::BUCKET_CREATED)
            && let Ok(t) = t.parse()
        {
            return t;
        }
        let oldest = dir.ctime.min(dir.mtime).min(dir.atime);
        if let Err(e) = self.fs.set_xattr(dir.ino, meta::BUCKET_CREATED, &oldest.to_string()).await {
            tracing::debug!(error = %e, ino = dir.ino, "cannot record a bucket's creation time");
        }
        oldest
    }

    pub(crate) async fn op_create_bucket(
        &self,
        req: S3Request<CreateBucketInput>,
    ) -> S3Result<S3Response<CreateBucketOutput>> {
        let bucket = &req.input.bucket;
        if !names::is_bucket_name(bucket) {
            return Err(s3_error!(InvalidBucketName, "{bucket:?} is not a valid bucket name"));
        }
        match self.fs.mkdir(ROOT_INO, bucket.as_bytes(), 0o755, 0, 0).await {
            Ok(dir) => {
                // A crash before this commit leaves the bucket to `bucket_created`'s fallback.
                let created = dir.ctime.to_string();
                self.fs.set_xattr(dir.ino, meta::BUCKET_CREATED, &created).await.map_err(|e| fs_error(e, bucket))?;
                Ok(S3Response::new(CreateBucketOutput { location: Some(format!("/{bucket}")) }))
            }
            Err(e) if e.kind() == ErrorKind::Exists => match bucket_dir(&self.fs, bucket) {
                Ok(Some(_)) => Err(s3_error!(BucketAlreadyOwnedByYou, "bucket {bucket:?} exists")),
                _ => Err(s3_error!(BucketAlreadyExists, "{bucket:?} exists in the namespace and is not a folder")),
            },
            Err(e) => Err(fs_error(e, bucket)),
        }
    }

    pub(crate) async fn op_head_bucket(
        &self,
        req: S3Request<HeadBucketInput>,
    ) -> S3Result<S3Response<HeadBucketOutput>> {
        self.require_bucket(&req.input.bucket)?;
        Ok(S3Response::new(HeadBucketOutput { bucket_region: Some(self.opts.region.clone()), ..Default::default() }))
    }

    pub(crate) async fn op_get_bucket_location(
        &self,
        req: S3Request<GetBucketLocationInput>,
    ) -> S3Result<S3Response<GetBucketLocationOutput>> {
        self.require_bucket(&req.input.bucket)?;
        // us-east-1 is answered as an empty LocationConstraint, as S3 does.
        let location_constraint =
            (self.opts.region != "us-east-1").then(|| BucketLocationConstraint::from(self.opts.region.clone()));
        Ok(S3Response::new(GetBucketLocationOutput { location_constraint }))
    }

    pub(crate) async fn op_delete_bucket(
        &self,
        req: S3Request<DeleteBucketInput>,
    ) -> S3Result<S3Response<DeleteBucketOutput>> {
        let bucket = &req.input.bucket;
        let dir = self.require_bucket(bucket)?;
        let (entries, _) = self.fs.readdir(dir.ino, None, 1).map_err(|e| fs_error(e, bucket))?;
        if !entries.is_empty() {
            return Err(s3_error!(BucketNotEmpty, "bucket {bucket:?} is not empty"));
        }
        match self.fs.rmdir(ROOT_INO, bucket.as_bytes()).await {
            Ok(()) => Ok(S3Response::new(DeleteBucketOutput {})),
            Err(e) if e.kind() == ErrorKind::NotEmpty => {
                Err(s3_error!(BucketNotEmpty, "bucket {bucket:?} is not empty"))
            }
            Err(e) if e.kind() == ErrorKind::NotFound => Err(no_such_bucket(bucket)),
            Err(e) => Err(fs_error(e, bucket)),
        }
    }
}
