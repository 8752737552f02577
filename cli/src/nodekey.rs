//! The node key: `<data_dir>/node.key`, 32 random bytes made when the data folder is
//! initialised (or on the first open of a folder made before it existed), mode 0600, written
//! crash-safely. It never leaves the node. It seals the S3 secrets kept in the meta group
//! (AES-256-GCM, a random 96-bit nonce per seal, the access key id as associated data so a
//! sealed secret cannot be moved to another id), and the admin token of the HTTP endpoint is
//! derived from it (`tidepool keys` reads the file, so only who can read the data folder can
//! manage keys).
//!
//! When nodes form a cluster, the meta group is shared and so must be the key that seals its
//! secrets: a joining node gets the leader's key in the join answer (sealed under a key
//! derived from the cluster secret, `cluster::ClusterToken::wrap_key`) and stores it as its
//! own `node.key` ([`NodeKey::install`]), so every node of a cluster has the same key.

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use rand::RngCore;

pub const FILE: &str = "node.key";
const KEY_LEN: usize = 32;
const NONCE_LEN: usize = 12;
/// What the admin token is derived from (HMAC-SHA256 under the node key).
const ADMIN_LABEL: &[u8] = b"tidepool-admin-v1";

#[derive(Debug, thiserror::Error)]
pub enum NodeKeyError {
    #[error("node key {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("node key {path} is damaged: {len} bytes, expected {KEY_LEN}")]
    BadLength { path: String, len: usize },
}

/// A sealed secret that does not open: wrong node key, tampered or truncated bytes.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error("sealed secret does not open under this node's key (wrong key, or corrupt)")]
pub struct UnsealError;

pub struct NodeKey {
    key: [u8; KEY_LEN],
}

impl std::fmt::Debug for NodeKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NodeKey(..)")
    }
}

impl NodeKey {
    pub fn path(data_dir: &Path) -> PathBuf {
        data_dir.join(FILE)
    }

    /// Read `<data_dir>/node.key`.
    pub fn read(data_dir: &Path) -> Result<NodeKey, NodeKeyError> {
        let path = Self::path(data_dir);
        let io = |source| NodeKeyError::Io { path: path.display().to_string(), source };
        let bytes = std::fs::read(&path).map_err(io)?;
        let key: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| NodeKeyError::BadLength { path: path.display().to_string(), len: bytes.len() })?;
        Ok(NodeKey { key })
    }

    /// Read the node key, creating it first if the folder has none. Returns the key and
    /// whether it was created.
    pub fn load_or_create(data_dir: &Path) -> Result<(NodeKey, bool), NodeKeyError> {
        let path = Self::path(data_dir);
        if path.exists() {
            return Ok((Self::read(data_dir)?, false));
        }
        let mut key = [0u8; KEY_LEN];
        rand::rngs::OsRng.fill_bytes(&mut key);
        write_private(&path, &key).map_err(|source| NodeKeyError::Io { path: path.display().to_string(), source })?;
        Ok((NodeKey { key }, true))
    }

    /// The raw key, to hand to a joining node (sealed: see `cluster::ClusterToken::wrap_key`).
    pub fn bytes(&self) -> &[u8; KEY_LEN] {
        &self.key
    }

    /// Replace `<data_dir>/node.key` with `key` (a joining node takes the cluster's key).
    pub fn install(data_dir: &Path, key: [u8; KEY_LEN]) -> Result<NodeKey, NodeKeyError> {
        let path = Self::path(data_dir);
        write_private(&path, &key).map_err(|source| NodeKeyError::Io { path: path.display().to_string(), source })?;
        Ok(NodeKey { key })
    }

    #[cfg(test)]
    pub fn from_bytes(key: [u8; KEY_LEN]) -> NodeKey {
        NodeKey { key }
    }

    fn cipher(&self) -> Aes256Gcm {
        Aes256Gcm::new(&self.key.into())
    }

    /// `nonce || AES-256-GCM(secret)` with `id` as associated data.
    pub fn seal(&self, id: &str, secret: &str) -> Vec<u8> {
        let mut nonce = [0u8; NONCE_LEN];
        rand::rngs::OsRng.fill_bytes(&mut nonce);
        // Invariant: AES-GCM encryption fails only for messages over 64 GiB.
        let ct = self
            .cipher()
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: secret.as_bytes(), aad: id.as_bytes() })
            .expect("AES-GCM seals a short secret");
        let mut out = Vec::with_capacity(NONCE_LEN + ct.len());
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        out
    }

    /// Inverse of [`NodeKey::seal`]; any tampering (or another key, or another id) is an error.
    pub fn unseal(&self, id: &str, sealed: &[u8]) -> Result<String, UnsealError> {
        if sealed.len() < NONCE_LEN {
            return Err(UnsealError);
        }
        let (nonce, ct) = sealed.split_at(NONCE_LEN);
        let pt = self
            .cipher()
            .decrypt(Nonce::from_slice(nonce), Payload { msg: ct, aad: id.as_bytes() })
            .map_err(|_| UnsealError)?;
        String::from_utf8(pt).map_err(|_| UnsealError)
    }

    /// The bearer token of the admin routes: hex of HMAC-SHA256(node key, label).
    pub fn admin_token(&self) -> String {
        use hmac::{KeyInit as _, Mac};
        // Invariant: HMAC takes a key of any length.
        let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(&self.key).expect("HMAC takes any key length");
        mac.update(ADMIN_LABEL);
        mac.finalize().into_bytes().iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Whether `presented` is the admin token, compared in constant time.
    pub fn check_admin_token(&self, presented: &str) -> bool {
        use subtle::ConstantTimeEq;
        let want = self.admin_token();
        want.len() == presented.len() && bool::from(want.as_bytes().ct_eq(presented.as_bytes()))
    }
}

/// Write a 0600 file crash-safely: temp file, fsync, rename, fsync the folder.
pub fn write_private(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_round_trip_and_tamper() {
        let k = NodeKey::from_bytes([7; 32]);
        let id = "TPAAAAAAAAAAAAAAAAAA";
        let secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY";
        let a = k.seal(id, secret);
        let b = k.seal(id, secret);
        assert_ne!(a, b, "a fresh nonce per seal");
        assert_eq!(a.len(), 12 + secret.len() + 16);
        assert!(!a.windows(secret.len()).any(|w| w == secret.as_bytes()), "not in the clear");
        assert_eq!(k.unseal(id, &a).as_deref(), Ok(secret));
        for i in 0..a.len() {
            let mut t = a.clone();
            t[i] ^= 0x40;
            assert_eq!(k.unseal(id, &t), Err(UnsealError), "flip at {i}");
        }
        assert_eq!(k.unseal(id, &a[..a.len() - 1]), Err(UnsealError));
        assert_eq!(k.unseal(id, &a[..5]), Err(UnsealError));
        assert_eq!(k.unseal(id, &[]), Err(UnsealError));
        assert_eq!(k.unseal("TPBBBBBBBBBBBBBBBBBB", &a), Err(UnsealError), "bound to its id");
        assert_eq!(NodeKey::from_bytes([8; 32]).unseal(id, &a), Err(UnsealError), "another node's key");
    }

    #[test]
    fn key_file_is_created_once_private_and_checked() {
        let dir = tempfile::tempdir().unwrap();
        let (k, created) = NodeKey::load_or_create(dir.path()).unwrap();
        assert!(created);
        let mode = std::fs::metadata(dir.path().join(FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let (k2, created) = NodeKey::load_or_create(dir.path()).unwrap();
        assert!(!created);
        assert_eq!(k.admin_token(), k2.admin_token());
        assert_eq!(k.admin_token().len(), 64);
        assert!(k.check_admin_token(&k2.admin_token()));
        assert!(!k.check_admin_token(""));
        assert!(!k.check_admin_token(&"0".repeat(64)));
        std::fs::write(dir.path().join(FILE), b"short").unwrap();
        let e = NodeKey::read(dir.path()).unwrap_err().to_string();
        assert!(e.contains("damaged: 5 bytes"), "{e}");
    }
}
