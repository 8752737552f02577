//! Who may call: SigV4 verification is done by s3s given a secret per access key; this file
//! supplies the secrets ([`KeyProvider`]) and refuses anonymous requests.

use std::sync::{Arc, Mutex};

use hyper::{HeaderMap, Uri};
use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::{S3Error, S3Result, s3_error};

/// Where secrets come from. The binary passes the keys of the meta group (`cli/src/keys.rs`,
/// managed with `tidepool keys`); tests pass [`StaticKeys`].
pub trait KeyProvider: Send + Sync {
    /// The secret of `access_key`, or `None` if no such key exists (or it was revoked).
    fn secret(&self, access_key: &str) -> Option<String>;
}

/// A fixed set of keys.
#[derive(Default)]
pub struct StaticKeys {
    keys: Vec<(String, String)>,
}

impl StaticKeys {
    pub fn single(access_key: impl Into<String>, secret: impl Into<String>) -> Self {
        StaticKeys { keys: vec![(access_key.into(), secret.into())] }
    }
}

impl KeyProvider for StaticKeys {
    fn secret(&self, access_key: &str) -> Option<String> {
        self.keys.iter().find(|(a, _)| a == access_key).map(|(_, s)| s.clone())
    }
}

pub(crate) struct Auth {
    pub keys: Arc<dyn KeyProvider>,
}

#[async_trait::async_trait]
impl S3Auth for Auth {
    async fn get_secret_key(&self, access_key: &str) -> S3Result<SecretKey> {
        match self.keys.secret(access_key) {
            Some(s) => Ok(SecretKey::from(s)),
            None => Err(s3_error!(InvalidAccessKeyId, "the access key id {access_key:?} does not exist")),
        }
    }
}

/// Slot in a request's extensions where the access check writes the S3 operation name, so the
/// HTTP layer (`server.rs`) can count requests by operation.
#[derive(Clone, Default)]
pub(crate) struct OpSlot(pub Arc<Mutex<Option<String>>>);

/// Runs for every request once s3s has checked its signature (if any) and resolved the operation.
pub(crate) struct Access {
    /// The region this endpoint serves ([`crate::S3Options::region`]).
    pub region: String,
}

#[async_trait::async_trait]
impl S3Access for Access {
    async fn check(&self, cx: &mut S3AccessContext<'_>) -> S3Result<()> {
        let op = cx.s3_op().name().to_owned();
        if let Some(slot) = cx.extensions_mut().get::<OpSlot>()
            && let Ok(mut g) = slot.0.lock()
        {
            *g = Some(op);
        }
        match cx.credentials() {
            Some(_) => check_region(cx.headers(), cx.uri(), &self.region),
            None => Err(anonymous()),
        }
    }
}

pub(crate) fn anonymous() -> S3Error {
    s3_error!(AccessDenied, "anonymous requests are not allowed: sign requests with an access key")
}

/// The region of a SigV4 credential scope (`<key>/<date>/<region>/<service>/aws4_request`),
/// from the `Authorization` header, or from the `X-Amz-Credential` query parameter of a
/// presigned URL (`true`). `None` for requests that carry no SigV4 scope (SigV2).
fn credential_region(headers: &HeaderMap, uri: &Uri) -> Option<(String, bool)> {
    let scope_region = |cred: &str| cred.split('/').nth(2).map(str::to_owned);
    if let Some(auth) = headers.get(hyper::header::AUTHORIZATION).and_then(|v| v.to_str().ok())
        && let Some(rest) = auth.strip_prefix("AWS4-HMAC-SHA256")
    {
        let cred = rest.split(',').find_map(|p| p.trim().strip_prefix("Credential="))?;
        return scope_region(cred).map(|r| (r, false));
    }
    let query = uri.query()?;
    let cred = query.split('&').find_map(|p| p.strip_prefix("X-Amz-Credential="))?;
    let cred = crate::rename::percent_decode(cred).ok()?;
    scope_region(&cred).map(|r| (r, true))
}

/// A signed request must be signed for this endpoint's region, as S3 answers: 400
/// `AuthorizationHeaderMalformed` (header signatures) or `AuthorizationQueryParametersError`
/// (presigned URLs). s3s verifies the signature with whatever region the scope names, so the
/// check is here. SigV2 names no region and is not checked.
pub(crate) fn check_region(headers: &HeaderMap, uri: &Uri, expected: &str) -> S3Result<()> {
    match credential_region(headers, uri) {
        Some((region, _)) if region == expected => Ok(()),
        Some((region, false)) => Err(s3_error!(
            AuthorizationHeaderMalformed,
            "The authorization header is malformed; the region '{region}' is wrong; expecting '{expected}'"
        )),
        Some((region, true)) => Err(s3_error!(
            AuthorizationQueryParametersError,
            "Error parsing the X-Amz-Credential parameter; the region '{region}' is wrong; expecting '{expected}'"
        )),
        None => Ok(()),
    }
}
