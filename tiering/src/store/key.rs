//! The key rules every backend checks before it talks to its bucket, so a bad key is the same
//! `Invalid` answer everywhere (and can never climb out of the local backend's folder).

use super::{ObjectError, Result};

/// The longest key, in bytes, relative to the store's prefix.
pub const MAX_KEY_BYTES: usize = 1024;

/// Checks `key` against the trait's rules: not empty, at most [`MAX_KEY_BYTES`] bytes, no
/// leading `/`, no empty segment (so no `//` and no trailing `/`), no `.` or `..` segment, no
/// NUL. Anything else (spaces, unicode) is allowed.
pub fn check_key(key: &str) -> Result<()> {
    let reason = if key.is_empty() {
        Some("is empty")
    } else if key.len() > MAX_KEY_BYTES {
        Some("is longer than 1024 bytes")
    } else if key.starts_with('/') {
        Some("starts with a slash")
    } else if key.contains('\0') {
        Some("contains a nul byte")
    } else if key.split('/').any(str::is_empty) {
        Some("has an empty segment")
    } else if key.split('/').any(|s| s == "." || s == "..") {
        Some("has a dot segment")
    } else {
        None
    };
    match reason {
        Some(reason) => Err(ObjectError::Invalid(format!("object key {reason} key={key:?}"))),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_ordinary_keys() {
        for key in ["a", "chunks/0f/abc", "manifests/LATEST", "with space/ünï cödé ✓", "a.b/..c/d.."] {
            assert_eq!(check_key(key), Ok(()), "{key}");
        }
        assert_eq!(check_key(&"k".repeat(MAX_KEY_BYTES)), Ok(()));
    }

    #[test]
    fn rejects_bad_keys() {
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        for key in ["", "/a", "a//b", "a/", "..", "a/../b", "./a", "a/.", "a\0b", long.as_str()] {
            assert!(matches!(check_key(key), Err(ObjectError::Invalid(_))), "{key:?}");
        }
    }
}
