//! S3 access keys in the meta group: thin proposals and reads. The secret is sealed by the
//! caller (the `tidepool` binary, with the node key) before it gets here; this layer never
//! sees it in the clear.

use tidepool_cluster::meta::{AccessKey, Command};

use crate::{Fs, Result};

/// What `tidepool keys list` shows of a key: never its secret.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct AccessKeyInfo {
    pub id: String,
    pub name: String,
    /// Nanoseconds since the Unix epoch.
    pub created: i64,
}

impl Fs {
    /// Store a new access key (`id`: 16-128 characters of `A-Z0-9`). `Exists` if the id is taken;
    /// `Invalid` for a bad id, label or sealed secret.
    pub async fn put_access_key(&self, id: &str, secret_sealed: Vec<u8>, name: &str) -> Result<()> {
        self.check_writable()?;
        let key = AccessKey { secret_sealed, created: self.now(), name: name.to_string() };
        self.commit(Command::PutAccessKey { id: id.to_string(), key }).await?;
        Ok(())
    }

    /// Revoke an access key: requests signed with it fail from now on. `NotFound` if there is none.
    pub async fn delete_access_key(&self, id: &str) -> Result<()> {
        self.check_writable()?;
        self.commit(Command::DeleteAccessKey { id: id.to_string() }).await?;
        Ok(())
    }

    /// Every access key, by id (no secrets).
    pub fn access_keys(&self) -> Vec<AccessKeyInfo> {
        self.meta.read(|s| {
            s.access_keys
                .iter()
                .map(|(id, k)| AccessKeyInfo { id: id.clone(), name: k.name.clone(), created: k.created })
                .collect()
        })
    }

    /// The sealed secret of access key `id`, as applied now (a revoked key is `None` at once).
    pub fn access_key_sealed(&self, id: &str) -> Option<Vec<u8>> {
        self.meta.read(|s| s.access_key(id).map(|k| k.secret_sealed.clone()))
    }
}
