//! From AWS SDK errors to `ObjectError`: one place that decides what an S3 answer means.

use std::error::Error as StdError;

use aws_credential_types::provider::error::CredentialsError;
use aws_sdk_s3::config::http::HttpResponse;
use aws_sdk_s3::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};

use crate::store::ObjectError;

/// A failed S3 call: an `ObjectError`, or one of the two answers a conditional write must
/// tell apart from errors.
#[derive(Debug)]
pub(super) enum Failure {
    /// 412: `If-None-Match: *` found an object.
    PreconditionFailed,
    /// 501: the server does not implement a header we sent (conditional writes).
    NotImplemented(String),
    Error(ObjectError),
}

impl Failure {
    /// For calls that sent no conditional header, where these answers are plain errors.
    pub(super) fn into_error(self) -> ObjectError {
        match self {
            Failure::PreconditionFailed => ObjectError::Invalid("precondition failed on an unconditional call".into()),
            Failure::NotImplemented(detail) => ObjectError::Invalid(detail),
            Failure::Error(e) => e,
        }
    }
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Failure::PreconditionFailed => f.write_str("precondition failed"),
            Failure::NotImplemented(detail) => f.write_str(detail),
            Failure::Error(e) => e.fmt(f),
        }
    }
}

/// What an S3 error answer means, from its code (first) and HTTP status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Kind {
    NotFound,
    NoBucket,
    Auth,
    Throttled,
    Unavailable,
    Invalid,
    PreconditionFailed,
    NotImplemented,
}

pub(super) fn classify(status: Option<u16>, code: Option<&str>) -> Kind {
    match code.unwrap_or_default() {
        "NoSuchKey" | "NotFound" => return Kind::NotFound,
        "NoSuchBucket" => return Kind::NoBucket,
        "InvalidAccessKeyId"
        | "SignatureDoesNotMatch"
        | "AccessDenied"
        | "ExpiredToken"
        | "InvalidToken"
        | "TokenRefreshRequired"
        | "AllAccessDisabled"
        | "AccountProblem"
        | "InvalidSecurity"
        | "MissingSecurityHeader"
        | "RequestTimeTooSkewed" => return Kind::Auth,
        "SlowDown"
        | "Throttling"
        | "ThrottlingException"
        | "RequestLimitExceeded"
        | "TooManyRequests"
        | "RequestThrottled" => return Kind::Throttled,
        // ConditionalRequestConflict / OperationAborted: a concurrent conditional write or
        // upload is in flight on the key; S3 says to try again. NoSuchUpload inside one of
        // our puts means the upload was aborted under us: a fresh attempt starts a new one.
        "InternalError"
        | "ServiceUnavailable"
        | "RequestTimeout"
        | "ConditionalRequestConflict"
        | "OperationAborted"
        | "NoSuchUpload" => return Kind::Unavailable,
        "InvalidRange" => return Kind::Invalid,
        "PreconditionFailed" => return Kind::PreconditionFailed,
        "NotImplemented" => return Kind::NotImplemented,
        _ => {}
    }
    match status {
        Some(404) => Kind::NotFound,
        Some(401 | 403) => Kind::Auth,
        Some(429) => Kind::Throttled,
        Some(412) => Kind::PreconditionFailed,
        Some(501) => Kind::NotImplemented,
        Some(408) => Kind::Unavailable,
        Some(500..=599) => Kind::Unavailable,
        // 400, 416 and every other answer we did not expect: a request the server will not
        // take as it is, so retrying the same request will not help.
        _ => Kind::Invalid,
    }
}

/// Maps a failed SDK call `op` on `key` in `bucket`.
pub(super) fn failure<E>(err: SdkError<E, HttpResponse>, op: &str, bucket: &str, key: &str) -> Failure
where
    E: ProvideErrorMetadata + StdError + Send + Sync + 'static,
{
    // A service error is said by its answer (status, code, message); the SDK's error context
    // would print the whole raw response in Debug form. Anything else (connect, timeout,
    // credentials) by its context chain, which is what explains it.
    let detail = |what: &str| match &err {
        SdkError::ServiceError(_) => format!(
            "s3 {op} {what} bucket={bucket} key={key:?} status={} code={}{}",
            err.raw_response().map_or(0, |r| r.status().as_u16()),
            err.code().unwrap_or("none"),
            err.message().map(|m| format!(" message={m:?}")).unwrap_or_default()
        ),
        _ => format!("s3 {op} {what} bucket={bucket} key={key:?} error={}", DisplayErrorContext(&err)),
    };
    let kind = match &err {
        SdkError::ServiceError(_) => {
            let status = err.raw_response().map(|r| r.status().as_u16());
            classify(status, err.code())
        }
        SdkError::ConstructionFailure(_) => Kind::Invalid,
        SdkError::TimeoutError(_) => Kind::Unavailable,
        SdkError::DispatchFailure(d) if d.is_user() => Kind::Invalid,
        SdkError::DispatchFailure(_) => credentials_kind(&err).unwrap_or(Kind::Unavailable),
        // A response that could not be read whole (the server hung up mid-answer).
        SdkError::ResponseError(_) => Kind::Unavailable,
        _ => Kind::Unavailable,
    };
    let e = match kind {
        Kind::NotFound => ObjectError::NotFound(key.to_owned()),
        Kind::NoBucket => ObjectError::NoBucket(bucket.to_owned()),
        Kind::Auth => ObjectError::Auth(detail("refused")),
        Kind::Throttled => ObjectError::Throttled(detail("throttled")),
        Kind::Unavailable => ObjectError::Unavailable(detail("failed")),
        Kind::Invalid => ObjectError::Invalid(detail("rejected")),
        Kind::PreconditionFailed => return Failure::PreconditionFailed,
        Kind::NotImplemented => return Failure::NotImplemented(detail("not implemented")),
    };
    Failure::Error(e)
}

/// A call that never left because no credentials could be had: missing or misconfigured
/// ones are `Auth`; a provider that timed out or failed (IMDS down) is `Unavailable`.
fn credentials_kind(err: &(dyn StdError + 'static)) -> Option<Kind> {
    let mut source = err.source();
    while let Some(e) = source {
        if let Some(c) = e.downcast_ref::<CredentialsError>() {
            return Some(match c {
                CredentialsError::CredentialsNotLoaded(_) | CredentialsError::InvalidConfiguration(_) => Kind::Auth,
                _ => Kind::Unavailable,
            });
        }
        source = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_win_over_statuses() {
        assert_eq!(classify(Some(404), Some("NoSuchKey")), Kind::NotFound);
        assert_eq!(classify(Some(404), Some("NoSuchBucket")), Kind::NoBucket);
        assert_eq!(classify(Some(404), Some("NoSuchUpload")), Kind::Unavailable);
        assert_eq!(classify(Some(503), Some("SlowDown")), Kind::Throttled);
        assert_eq!(classify(Some(403), Some("SignatureDoesNotMatch")), Kind::Auth);
        assert_eq!(classify(Some(403), Some("InvalidAccessKeyId")), Kind::Auth);
        assert_eq!(classify(Some(416), Some("InvalidRange")), Kind::Invalid);
        assert_eq!(classify(Some(412), Some("PreconditionFailed")), Kind::PreconditionFailed);
        assert_eq!(classify(Some(409), Some("ConditionalRequestConflict")), Kind::Unavailable);
        assert_eq!(classify(Some(501), Some("NotImplemented")), Kind::NotImplemented);
    }

    #[test]
    fn statuses_without_codes() {
        assert_eq!(classify(Some(404), None), Kind::NotFound);
        assert_eq!(classify(Some(403), None), Kind::Auth);
        assert_eq!(classify(Some(429), None), Kind::Throttled);
        for status in [500, 502, 503, 504, 408] {
            assert_eq!(classify(Some(status), None), Kind::Unavailable, "{status}");
        }
        for status in [400, 416, 409, 301] {
            assert_eq!(classify(Some(status), Some("Whatever")), Kind::Invalid, "{status}");
        }
        assert_eq!(classify(None, None), Kind::Invalid);
    }
}
