//! Object metadata in the inode's xattr map (one map that every front end sees).
//!
//! - User metadata `x-amz-meta-NAME: v` is stored under `name` (lowercased, as HTTP header
//!   names are case-insensitive), and every key not starting with `:` is returned as user
//!   metadata (when it is a valid header name and value).
//! - System attributes use keys starting with `:` (never a valid header name): `:etag` (hex
//!   MD5 of the body), `:etag-mtime` (the file's mtime in ns when `:etag` was computed: a
//!   write through another front end changes mtime and so retires the stored ETag),
//!   `:content-type`, `:content-encoding`, `:content-disposition`, `:cache-control`,
//!   `:content-language`, `:expires` (an HTTP date); `:bucket-created` on a bucket's folder
//!   (creation time, ns); `:mp-parts` (part sizes of a multipart object, [`PartSizes`]);
//!   `:checksum-<alg>` and `:checksum-type` (the object's additional checksum,
//!   [`crate::checksum`]). Like the ETag, the last two hold only while `:etag-mtime` does.
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
/// On a bucket's folder: its creation time (ns since the epoch), set by CreateBucket.
pub const BUCKET_CREATED: &str = ":bucket-created";

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

/// `Content-Encoding` without `aws-chunked`, which names how the request body was framed
/// (SigV4 streaming), not the object: S3 does not keep it.
pub fn without_aws_chunked(v: Option<String>) -> Option<String> {
    let v = v?;
    let rest: Vec<&str> =
        v.split(',').map(str::trim).filter(|e| !e.is_empty() && !e.eq_ignore_ascii_case("aws-chunked")).collect();
    (!rest.is_empty()).then(|| rest.join(","))
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

/// Key of a multipart object's part sizes; continued in `:mp-parts.2`, `:mp-parts.3`, ... when
/// the encoding is longer than one metadata value holds.
pub const MP_PARTS: &str = ":mp-parts";
/// Longest piece of the part-size encoding under one key (the meta group allows 64 KiB).
const MP_PARTS_PIECE: usize = 60 << 10;
/// Version prefix of the part-size encoding.
const MP_PARTS_V1: &str = "1:";

/// The part sizes of a multipart object, recorded at CompleteMultipartUpload so that GET and
/// HEAD with `partNumber` know each part's range. Encoded as `1:` then runs `SIZE*COUNT` (or
/// `SIZE` for a run of one) joined by `,`: all parts but the last usually have one size, so
/// this is a few bytes; 10,000 distinct sizes take ~110 KB, split over several keys.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartSizes(pub Vec<u64>);

impl PartSizes {
    pub fn count(&self) -> usize {
        self.0.len()
    }

    /// Byte range `[start, end)` of part `n` (1-based), if there is such a part.
    pub fn range(&self, n: usize) -> Option<(u64, u64)> {
        let size = *self.0.get(n.checked_sub(1)?)?;
        let start: u64 = self.0[..n - 1].iter().sum();
        Some((start, start + size))
    }

    fn encode(&self) -> String {
        let mut runs: Vec<(u64, usize)> = Vec::new();
        for &s in &self.0 {
            match runs.last_mut() {
                Some((size, n)) if *size == s => *n += 1,
                _ => runs.push((s, 1)),
            }
        }
        let body: Vec<String> =
            runs.iter().map(|(s, n)| if *n == 1 { s.to_string() } else { format!("{s}*{n}") }).collect();
        format!("{MP_PARTS_V1}{}", body.join(","))
    }

    fn decode(s: &str) -> Option<Self> {
        let mut sizes = Vec::new();
        for run in s.strip_prefix(MP_PARTS_V1)?.split(',') {
            let (size, n) = match run.split_once('*') {
                Some((s, n)) => (s.parse::<u64>().ok()?, n.parse::<usize>().ok()?),
                None => (run.parse::<u64>().ok()?, 1),
            };
            if sizes.len() + n > 10_000 {
                return None;
            }
            sizes.extend(std::iter::repeat_n(size, n));
        }
        (!sizes.is_empty()).then_some(PartSizes(sizes))
    }

    /// Write the encoding into `x` (under [`MP_PARTS`] and its continuations).
    pub fn store(&self, x: &mut BTreeMap<String, String>) {
        let enc = self.encode();
        // The encoding is ASCII, so any byte offset is a char boundary.
        for (i, piece) in enc.as_bytes().chunks(MP_PARTS_PIECE).enumerate() {
            let key = if i == 0 { MP_PARTS.to_owned() } else { format!("{MP_PARTS}.{}", i + 1) };
            x.insert(key, String::from_utf8_lossy(piece).into_owned());
        }
    }

    /// The part sizes of a multipart object, if recorded, still valid (the body is the one
    /// the ETag describes) and adding up to the file's size.
    pub fn load(attr: &FileAttr, x: &BTreeMap<String, String>) -> Option<Self> {
        if !etag_valid(attr, x) {
            return None;
        }
        let mut enc = x.get(MP_PARTS)?.clone();
        for i in 2.. {
            match x.get(&format!("{MP_PARTS}.{i}")) {
                Some(p) => enc.push_str(p),
                None => break,
            }
        }
        Self::decode(&enc).filter(|p| p.0.iter().sum::<u64>() == attr.size)
    }
}

/// Whether the stored `:etag` (and what was recorded with it) describes the current body.
pub fn etag_valid(attr: &FileAttr, x: &BTreeMap<String, String>) -> bool {
    x.contains_key(ETAG) && x.get(ETAG_MTIME).is_some_and(|m| *m == attr.mtime.to_string())
}

/// Whether `k` is a key that describes one body (ETag, part sizes, checksums): dropped when the
/// metadata is carried to a new body (CopyObject with the COPY directive).
pub fn is_body_key(k: &str) -> bool {
    k == ETAG || k == ETAG_MTIME || k.starts_with(MP_PARTS) || k.starts_with(":checksum-")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn part_sizes_round_trip_compactly() {
        let p = PartSizes(vec![8 << 20, 8 << 20, 8 << 20, 1234]);
        assert_eq!(p.encode(), "1:8388608*3,1234");
        assert_eq!(PartSizes::decode(&p.encode()), Some(p.clone()));
        assert_eq!(p.range(1), Some((0, 8 << 20)));
        assert_eq!(p.range(4), Some((24 << 20, (24 << 20) + 1234)));
        assert_eq!((p.range(0), p.range(5)), (None, None));
        for bad in ["", "1:", "2:5", "1:5*x", "1:*3", "1:5,,6", "1:1*10001"] {
            assert_eq!(PartSizes::decode(bad), None, "{bad}");
        }
        // 10,000 distinct sizes: over one metadata value, split and joined again.
        let many = PartSizes((0..10_000u64).map(|i| (5 << 20) + i * 1_000_003).collect());
        let mut x = BTreeMap::new();
        many.store(&mut x);
        assert!(x.len() > 1 && x.values().all(|v| v.len() <= MP_PARTS_PIECE), "{}", x.len());
        let attr = FileAttr {
            ino: 9,
            generation: 1,
            kind: tidepool_fs::InodeKind::File,
            mode: 0o644,
            uid: 0,
            gid: 0,
            size: many.0.iter().sum(),
            nlink: 1,
            parent: 1,
            atime: 5,
            mtime: 5,
            ctime: 5,
        };
        set_etag(&mut x, "e", 5);
        assert_eq!(PartSizes::load(&attr, &x), Some(many));
        set_etag(&mut x, "e", 6);
        assert_eq!(PartSizes::load(&attr, &x), None, "retired with the ETag");
    }
}
