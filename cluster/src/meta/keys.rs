//! The S3 access key commands: PutAccessKey and DeleteAccessKey. The secret is sealed before
//! it is proposed (the `tidepool` binary does it with the node key), so apply only checks the
//! shape of what it stores. Like `apply.rs`: validate fully, then mutate.

use super::{AccessKey, Applied, MetaError, MetaState};

/// Shortest and longest access key id (AWS: 16 to 128 characters).
pub const ACCESS_KEY_ID_MIN: usize = 16;
pub const ACCESS_KEY_ID_MAX: usize = 128;
/// Longest sealed secret, in bytes (a 40-character secret seals to 68).
pub const SEALED_SECRET_MAX: usize = 1024;
/// Longest access key label, in bytes.
pub const ACCESS_KEY_NAME_MAX: usize = 256;

/// An access key id as AWS makes them: 16 to 128 characters of `A-Z0-9`.
pub fn is_access_key_id(id: &str) -> bool {
    (ACCESS_KEY_ID_MIN..=ACCESS_KEY_ID_MAX).contains(&id.len())
        && id.bytes().all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// The shape every stored key has (apply checks it; so does `check_invariants`).
pub(super) fn check_access_key(id: &str, key: &AccessKey) -> Result<(), MetaError> {
    if !is_access_key_id(id) {
        return Err(MetaError::Invalid("access key id must be 16 to 128 characters of A-Z and 0-9"));
    }
    if key.secret_sealed.is_empty() || key.secret_sealed.len() > SEALED_SECRET_MAX {
        return Err(MetaError::Invalid("sealed secret must be 1 to 1024 bytes"));
    }
    if key.name.len() > ACCESS_KEY_NAME_MAX {
        return Err(MetaError::Invalid("access key name longer than 256 bytes"));
    }
    Ok(())
}

impl MetaState {
    pub(super) fn put_access_key(&mut self, id: &str, key: &AccessKey) -> Result<Applied, MetaError> {
        check_access_key(id, key)?;
        if self.access_keys.contains_key(id) {
            return Err(MetaError::AccessKeyExists(id.to_string()));
        }
        self.access_keys.insert(id.to_string(), key.clone());
        Ok(Applied::default())
    }

    pub(super) fn delete_access_key(&mut self, id: &str) -> Result<Applied, MetaError> {
        match self.access_keys.remove(id) {
            Some(_) => Ok(Applied::default()),
            None => Err(MetaError::NoAccessKey(id.to_string())),
        }
    }

    /// The stored access key `id`, if any.
    pub fn access_key(&self, id: &str) -> Option<&AccessKey> {
        self.access_keys.get(id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::Command;

    fn key(sealed: usize, name: &str) -> AccessKey {
        AccessKey { secret_sealed: vec![7; sealed], created: 5, name: name.into() }
    }

    #[test]
    fn put_delete_and_errors() {
        let mut s = MetaState::new();
        let id = "TPABCDEFGHIJ0123456".to_string() + "7";
        s.apply(&Command::PutAccessKey { id: id.clone(), key: key(40, "ci") }).unwrap();
        assert_eq!(s.access_key(&id).map(|k| k.name.as_str()), Some("ci"));
        let before = s.clone();
        let put = |s: &mut MetaState, id: &str, k: AccessKey| s.apply(&Command::PutAccessKey { id: id.into(), key: k });
        assert_eq!(put(&mut s, &id, key(40, "again")), Err(MetaError::AccessKeyExists(id.clone())));
        for bad in ["TPSHORT", "tplowercase000000000", "TP-DASHES-000000000", &"A".repeat(129)] {
            assert!(matches!(put(&mut s, bad, key(40, "")), Err(MetaError::Invalid(_))), "{bad}");
        }
        assert!(matches!(put(&mut s, "TPEMPTYSEALED0000000", key(0, "")), Err(MetaError::Invalid(_))));
        assert!(matches!(put(&mut s, "TPHUGESEALED00000000", key(1025, "")), Err(MetaError::Invalid(_))));
        assert!(matches!(put(&mut s, "TPLONGNAME0000000000", key(40, &"n".repeat(257))), Err(MetaError::Invalid(_))));
        assert!(put(&mut s, &"A".repeat(128), key(1024, &"n".repeat(256))).is_ok());
        assert_eq!(s.access_keys.len(), 2);
        assert_eq!(
            s.apply(&Command::DeleteAccessKey { id: "TPNOSUCHKEY000000000".into() }),
            Err(MetaError::NoAccessKey("TPNOSUCHKEY000000000".into()))
        );
        s.apply(&Command::DeleteAccessKey { id: id.clone() }).unwrap();
        assert!(s.access_key(&id).is_none());
        assert_eq!(before.access_keys.len(), 1);
        s.check_invariants().unwrap();
    }
}
