//! Bucket names and object keys, and which of them a directory tree can hold.
//!
//! Rules (README "S3 names"):
//! - A bucket is a top-level directory with a valid S3 bucket name: 3-63 bytes of `a-z`,
//!   `0-9`, `.` and `-`, starting and ending with a letter or digit, not shaped like an IP
//!   address.
//! - A key is at most 1024 bytes (else `KeyTooLongError`); each `/`-separated segment at most
//!   255 bytes (`KeyTooLongError`, naming the segment).
//! - Segments `.` and `..`, empty segments (`a//b`, a leading `/`) and NUL bytes are refused with
//!   `InvalidArgument`: a key never resolves to a path outside its bucket.
//! - A key ending in `/` is a folder marker: a directory, listed as an object of size 0.
//! - A key that the tree cannot hold next to existing keys (`a/b` when `a` is an object, `a`
//!   when `a/...` keys exist) answers `409 KeyConflict` (see [`crate::error::conflict`]).

use s3s::S3Error;

use crate::error::invalid_key;

/// Longest key S3 accepts.
pub const KEY_MAX: usize = 1024;

pub fn is_bucket_name(name: &str) -> bool {
    let b = name.as_bytes();
    let ok_chars = b.iter().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'.' || *c == b'-');
    let alnum = |c: &u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    (3..=63).contains(&b.len())
        && ok_chars
        && b.first().is_some_and(alnum)
        && b.last().is_some_and(alnum)
        && !name.contains("..")
        && name.parse::<std::net::Ipv4Addr>().is_err()
}

/// A key as a path below its bucket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyPath<'a> {
    /// Path segments; never empty, never `.` / `..`, each at most 255 bytes.
    pub segments: Vec<&'a [u8]>,
    /// The key ends with `/`: a folder marker (a directory).
    pub folder: bool,
}

impl KeyPath<'_> {
    /// The parent directories' segments and the last name.
    pub fn split_last(&self) -> (&[&[u8]], &[u8]) {
        let (last, parents) = self.segments.split_last().expect("a KeyPath has at least one segment (parse_key)");
        (parents, last)
    }
}

pub fn parse_key(key: &str) -> Result<KeyPath<'_>, S3Error> {
    if key.len() > KEY_MAX {
        return Err(s3s::s3_error!(KeyTooLongError, "key is {} bytes; the limit is {KEY_MAX}", key.len()));
    }
    if key.is_empty() {
        return Err(invalid_key(key, "the key is empty"));
    }
    if key.contains('\0') {
        return Err(invalid_key(key, "NUL bytes are not allowed in keys"));
    }
    let (body, folder) = match key.strip_suffix('/') {
        Some(b) => (b, true),
        None => (key, false),
    };
    let mut segments = Vec::new();
    for seg in body.split('/') {
        match seg {
            "" => return Err(invalid_key(key, "empty path segments (a leading '/', '//' or a key of only '/')")),
            "." | ".." => return Err(invalid_key(key, "'.' and '..' segments")),
            s if s.len() > tidepool_fs::NAME_MAX => {
                return Err(s3s::s3_error!(
                    KeyTooLongError,
                    "key segment of {} bytes; each '/'-separated segment is at most {} bytes",
                    s.len(),
                    tidepool_fs::NAME_MAX
                ));
            }
            s => segments.push(s.as_bytes()),
        }
    }
    Ok(KeyPath { segments, folder })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names() {
        for ok in ["abc", "my-bucket", "a.b.c", "0bucket", &"x".repeat(63)] {
            assert!(is_bucket_name(ok), "{ok}");
        }
        for bad in ["ab", "Abc", "-abc", "abc-", ".tidepool", "a_b", "a..b", "192.168.1.1", &"x".repeat(64), ""] {
            assert!(!is_bucket_name(bad), "{bad}");
        }
    }

    #[test]
    fn keys() {
        let k = parse_key("a/b/c").unwrap();
        assert_eq!(k.segments, vec![b"a" as &[u8], b"b", b"c"]);
        assert!(!k.folder);
        let k = parse_key("dir/").unwrap();
        assert_eq!((k.segments.len(), k.folder), (1, true));
        for bad in ["", "/", "/a", "a//b", "a/./b", "../x", "a/..", "a/../", "x\0y", "//"] {
            let e = parse_key(bad).unwrap_err();
            assert_eq!(*e.code(), s3s::S3ErrorCode::InvalidArgument, "{bad:?}");
        }
        assert_eq!(*parse_key(&"k".repeat(1025)).unwrap_err().code(), s3s::S3ErrorCode::KeyTooLongError);
        assert!(parse_key(&"k".repeat(255)).is_ok());
        assert_eq!(*parse_key(&"k".repeat(256)).unwrap_err().code(), s3s::S3ErrorCode::KeyTooLongError);
        assert!(parse_key(&format!("{}/{}", "k".repeat(255), "j".repeat(255))).is_ok());
        assert!(parse_key("a/.b/..c/...").is_ok());
    }
}
