//! Object metadata in the inode's xattr map (one map that every front end sees).
//!
//! - User metadata `x-amz-meta-NAME: v` is stored under `name` (lowercased, as HTTP header
//!   names are case-insensitive), and every key not starting with `:` is returned as user
//!   metadata (when it is a valid header name and value).
//! - System attributes use keys starting with `:` (never a valid header name): `:etag` (hex
//!   MD5 of the body), `:etag-mtime` (the file's mtime in ns when `:etag` was computed: a
//!   write through another front end changes mtime and so retires the stored ETag),
//!   `:content-type`, `:content-encoding`, `:content-disposition`, `:cache-control`,
//!   `:content-language`, `:expires` (an HTTP date).
//! - A file without a valid `:etag` (written through NFS or `tidepool fs`) gets a synthetic ETag
//!   `"tp-<ino>-<mtime>-<size>"` (hex): stable until the file changes, and not 32 hex digits, so
//!   clients never mistake it for an MD5.

use std::collections::BTreeMap;

use s3s::dto::{Metadata, Timestamp, TimestampFormat};
use tidepool_fs::FileAttr;

pub const ETAG: &str = ":etag";
pub const ETAG_MTIME: &str = ":etag-mtime";
pub const CONTENT_TYPE: &str = ":content-type";
pub const CONTENT_ENCODING: &str = ":content-encoding";
pub const CONTENT_DISPOSITION: &str = ":content-disposition";
pub const CACHE_CONTROL: &str = ":cache-control";
pub const CONTENT_LANGUAGE: &str = ":content-language";
pub const EXPIRES: &str = ":expires";

/// The standard headers an object keeps.
#[derive(Debug, Clone, Default)]
pub struct SystemHeaders {
    pub content_type: Option<String>,
    pub content_encoding: Option<String>,
    pub content_disposition: Option<String>,
    pub cache_control: Option<String>,
    pub content_language: Option<String>,
    pub expires: Option<Timestamp>,
}

impl SystemHeaders {
    pub fn from_xattrs(x: &BTreeMap<String, String>) -> Self {
        let get = |k: &str| x.get(k).cloned();
        SystemHeaders {
            content_type: get(CONTENT_TYPE),
            content_encoding: get(CONTENT_ENCODING),
            content_disposition: get(CONTENT_DISPOSITION),
            cache_control: get(CACHE_CONTROL),
            content_language: get(CONTENT_LANGUAGE),
            expires: x.get(EXPIRES).and_then(|s| Timestamp::parse(TimestampFormat::HttpDate, s).ok()),
        }
    }
}

/// The xattr map of a new object: user metadata, system headers, and the ETag bound to `mtime`.
pub fn to_xattrs(user: Option<&Metadata>, sys: &SystemHeaders) -> BTreeMap<String, String> {
    let mut x = BTreeMap::new();
    for (k, v) in user.into_iter().flatten() {
        let k = k.to_ascii_lowercase();
        if !k.is_empty() && !k.starts_with(':') {
            x.insert(k, v.clone());
        }
    }
    let mut put = |k: &str, v: &Option<String>| {
        if let Some(v) = v {
            x.insert(k.to_owned(), v.clone());
        }
    };
    put(CONTENT_TYPE, &sys.content_type);
    put(CONTENT_ENCODING, &sys.content_encoding);
    put(CONTENT_DISPOSITION, &sys.content_disposition);
    put(CACHE_CONTROL, &sys.cache_control);
    put(CONTENT_LANGUAGE, &sys.content_language);
    if let Some(t) = &sys.expires {
        let mut buf = Vec::new();
        if t.format(TimestampFormat::HttpDate, &mut buf).is_ok()
            && let Ok(s) = String::from_utf8(buf)
        {
            x.insert(EXPIRES.to_owned(), s);
        }
    }
    x
}

/// Record the ETag of the body just committed (file mtime `mtime`).
pub fn set_etag(x: &mut BTreeMap<String, String>, md5_hex: &str, mtime: i64) {
    x.insert(ETAG.to_owned(), md5_hex.to_owned());
    x.insert(ETAG_MTIME.to_owned(), mtime.to_string());
}

/// The ETag value (unquoted) of an object.
pub fn etag(attr: &FileAttr, x: &BTreeMap<String, String>) -> String {
    match (x.get(ETAG), x.get(ETAG_MTIME)) {
        (Some(e), Some(m)) if *m == attr.mtime.to_string() => e.clone(),
        _ => format!("tp-{:x}-{:x}-{:x}", attr.ino, attr.mtime, attr.size),
    }
}

/// The user metadata to return: keys not starting with `:` that are valid header names with
/// valid header values (anything else, set through another front end, is not shown).
pub fn user_metadata(x: &BTreeMap<String, String>) -> Option<Metadata> {
    let token = |c: u8| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c);
    let m: Metadata = x
        .iter()
        .filter(|(k, v)| {
            !k.is_empty() && k.bytes().all(token) && v.bytes().all(|c| c == b'\t' || (b' '..=b'~').contains(&c))
        })
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    (!m.is_empty()).then_some(m)
}

/// A file's mtime as an S3 timestamp.
pub fn timestamp(nanos: i64) -> Timestamp {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(nanos as i128).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    Timestamp::from(t)
}

/// Whole seconds of a timestamp (HTTP dates have second precision).
pub fn unix_secs(t: &Timestamp) -> i64 {
    time::OffsetDateTime::from(t.clone()).unix_timestamp()
}
