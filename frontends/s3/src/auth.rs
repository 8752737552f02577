//! Who may call: SigV4 verification is done by s3s given a secret per access key; this file
//! supplies the secrets ([`KeyProvider`]) and refuses anonymous requests.

use std::sync::{Arc, Mutex};

use s3s::access::{S3Access, S3AccessContext};
use s3s::auth::{S3Auth, SecretKey};
use s3s::{S3Result, s3_error};

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
pub(crate) struct Access;

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
            Some(_) => Ok(()),
            None => {
                Err(s3_error!(AccessDenied, "anonymous requests are not allowed: sign requests with an access key"))
            }
        }
    }
}
