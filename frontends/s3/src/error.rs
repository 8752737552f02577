//! Filesystem errors as S3 errors: one exhaustive `match` on `tidepool_fs::ErrorKind`, plus the
//! tidepool-specific errors for names a tree cannot hold.

use s3s::{S3Error, S3ErrorCode, s3_error};
use tidepool_fs::{ErrorKind, FsError};

/// An fs error met while serving `what` (a bucket or key, for the message).
pub fn fs_error(e: FsError, what: &str) -> S3Error {
    let (code, msg) = match e.kind() {
        ErrorKind::NotFound => (S3ErrorCode::NoSuchKey, format!("{what}: not found")),
        ErrorKind::Exists => (S3ErrorCode::OperationAborted, format!("{what}: created concurrently; retry")),
        ErrorKind::NotDir | ErrorKind::IsDir | ErrorKind::NotEmpty => {
            return conflict(what, "a path segment is an object where a folder is needed, or the reverse");
        }
        ErrorKind::NameTooLong => (S3ErrorCode::KeyTooLongError, format!("{what}: a segment is too long")),
        ErrorKind::Invalid => (S3ErrorCode::InvalidArgument, format!("{what}: {e}")),
        ErrorKind::NoSpace => (S3ErrorCode::Custom("InsufficientStorage".into()), format!("{what}: {e}")),
        ErrorKind::Unavailable => (S3ErrorCode::ServiceUnavailable, format!("{what}: {e}; retry")),
        ErrorKind::Corrupt => (S3ErrorCode::InternalError, format!("{what}: data error: {e}")),
        ErrorKind::ReadOnly => (
            S3ErrorCode::AccessDenied,
            format!(
                "{what}: the filesystem is read-only (spun down: writes resume on a node started with `tidepool up --from`)"
            ),
        ),
        ErrorKind::Internal => (S3ErrorCode::InternalError, format!("{what}: {e}")),
    };
    if matches!(code, S3ErrorCode::InternalError) {
        tracing::error!(error = %e, what, "s3 request failed");
    }
    let status = match e.kind() {
        ErrorKind::NoSpace => Some(hyper::StatusCode::INSUFFICIENT_STORAGE),
        // Not 503: a spun-down namespace stays read-only, so clients must not retry.
        ErrorKind::ReadOnly => Some(hyper::StatusCode::FORBIDDEN),
        _ => None,
    };
    let mut err = S3Error::with_message(code, msg);
    if let Some(s) = status {
        err.set_status_code(s);
    }
    err
}

/// A key the directory tree cannot hold next to existing keys: `409 KeyConflict`.
pub fn conflict(key: &str, why: &str) -> S3Error {
    let mut e = S3Error::with_message(
        S3ErrorCode::Custom("KeyConflict".into()),
        format!(
            "key {key:?} conflicts with an existing key: {why} (tidepool stores keys as paths; see README 'S3 names')"
        ),
    );
    e.set_status_code(hyper::StatusCode::CONFLICT);
    e
}

/// A key that tidepool refuses by its name rules: `400 InvalidArgument`.
pub fn invalid_key(key: &str, why: &str) -> S3Error {
    s3_error!(InvalidArgument, "key {key:?} is not supported: {why} (see README 'S3 names')")
}

pub fn no_such_bucket(bucket: &str) -> S3Error {
    s3_error!(NoSuchBucket, "bucket {bucket:?} does not exist")
}

pub fn no_such_key(key: &str) -> S3Error {
    s3_error!(NoSuchKey, "key {key:?} does not exist")
}
