//! Where a cold tier lives, as a user writes it: `file:///path`, `s3://bucket/prefix`,
//! `az://container/prefix`. Parsing only; which credentials, region or account to use comes
//! from the settings, not the URL.

use std::fmt;
use std::path::PathBuf;

use super::{ObjectError, Result};

/// A parsed bucket URL. Prefixes have no leading or trailing `/` (empty: the whole bucket).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BucketUrl {
    /// `file:///abs/path` (or `file://localhost/abs/path`): a local folder.
    File(PathBuf),
    /// `s3://bucket/prefix`.
    S3 { bucket: String, prefix: String },
    /// `az://container/prefix` (also `azure://`).
    Azure { container: String, prefix: String },
}

impl fmt::Display for BucketUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let (scheme, name, prefix) = match self {
            BucketUrl::File(path) => return write!(f, "file://{}", path.display()),
            BucketUrl::S3 { bucket, prefix } => ("s3", bucket, prefix),
            BucketUrl::Azure { container, prefix } => ("az", container, prefix),
        };
        if prefix.is_empty() { write!(f, "{scheme}://{name}") } else { write!(f, "{scheme}://{name}/{prefix}") }
    }
}

/// Parses a bucket URL. No percent-decoding: the path, bucket and prefix are taken as written.
pub fn parse_bucket_url(url: &str) -> Result<BucketUrl> {
    let invalid = |reason: &str| ObjectError::Invalid(format!("bad bucket url: {reason} url={url:?}"));
    let (scheme, rest) = url.split_once("://").ok_or_else(|| invalid("no scheme (want file://, s3:// or az://)"))?;
    match scheme.to_ascii_lowercase().as_str() {
        "file" => {
            let path = rest.strip_prefix("localhost").unwrap_or(rest);
            if !path.starts_with('/') {
                return Err(invalid("a file url needs an absolute path (file:///path)"));
            }
            if path.split('/').any(|s| s == "..") {
                return Err(invalid("a file url may not contain `..`"));
            }
            Ok(BucketUrl::File(PathBuf::from(path)))
        }
        "s3" => {
            let (bucket, prefix) = split_name_prefix(rest);
            check_s3_bucket(bucket).map_err(&invalid)?;
            check_prefix(&prefix).map_err(&invalid)?;
            Ok(BucketUrl::S3 { bucket: bucket.to_owned(), prefix })
        }
        "az" | "azure" => {
            let (container, prefix) = split_name_prefix(rest);
            check_azure_container(container).map_err(&invalid)?;
            check_prefix(&prefix).map_err(&invalid)?;
            Ok(BucketUrl::Azure { container: container.to_owned(), prefix })
        }
        _ => Err(invalid("unknown scheme (want file://, s3:// or az://)")),
    }
}

fn split_name_prefix(rest: &str) -> (&str, String) {
    let (name, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    (name, prefix.trim_matches('/').to_owned())
}

fn check_prefix(prefix: &str) -> Result<(), &'static str> {
    if prefix.split('/').any(|s| s == "." || s == "..") {
        return Err("the prefix may not contain `.` or `..` segments");
    }
    if !prefix.is_empty() && prefix.split('/').any(str::is_empty) {
        return Err("the prefix may not contain an empty segment");
    }
    Ok(())
}

/// S3's bucket naming rules, the parts that catch typos: 3-63 characters of lower-case
/// letters, digits, `.` and `-`, starting and ending with a letter or digit.
fn check_s3_bucket(bucket: &str) -> Result<(), &'static str> {
    let ok_chars = bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let alnum = |b: Option<u8>| b.is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if !(3..=63).contains(&bucket.len()) || !ok_chars {
        return Err("an s3 bucket name is 3-63 lower-case letters, digits, `.` or `-`");
    }
    if !alnum(bucket.bytes().next()) || !alnum(bucket.bytes().last()) {
        return Err("an s3 bucket name starts and ends with a letter or digit");
    }
    Ok(())
}

/// Azure's container naming rules: 3-63 lower-case letters, digits and single `-`, starting
/// and ending with a letter or digit.
fn check_azure_container(container: &str) -> Result<(), &'static str> {
    let ok_chars = container.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !(3..=63).contains(&container.len()) || !ok_chars || container.contains("--") {
        return Err("an azure container name is 3-63 lower-case letters, digits or single `-`");
    }
    if container.starts_with('-') || container.ends_with('-') {
        return Err("an azure container name starts and ends with a letter or digit");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s3(bucket: &str, prefix: &str) -> BucketUrl {
        BucketUrl::S3 { bucket: bucket.into(), prefix: prefix.into() }
    }

    #[test]
    fn parses_each_scheme() {
        assert_eq!(parse_bucket_url("file:///var/lib/cold"), Ok(BucketUrl::File("/var/lib/cold".into())));
        assert_eq!(parse_bucket_url("file://localhost/x"), Ok(BucketUrl::File("/x".into())));
        assert_eq!(parse_bucket_url("s3://my-bucket"), Ok(s3("my-bucket", "")));
        assert_eq!(parse_bucket_url("s3://my-bucket/"), Ok(s3("my-bucket", "")));
        assert_eq!(parse_bucket_url("S3://my.bucket/a/b/"), Ok(s3("my.bucket", "a/b")));
        let az = BucketUrl::Azure { container: "cold".into(), prefix: "fs1".into() };
        assert_eq!(parse_bucket_url("az://cold/fs1"), Ok(az.clone()));
        assert_eq!(parse_bucket_url("azure://cold/fs1/"), Ok(az));
    }

    #[test]
    fn display_round_trips() {
        for url in ["file:///var/lib/cold", "s3://my-bucket", "s3://my-bucket/a/b", "az://cold/fs1"] {
            assert_eq!(parse_bucket_url(url).map(|u| u.to_string()), Ok(url.to_owned()));
        }
    }

    #[test]
    fn rejects_bad_urls() {
        for url in [
            "/var/lib/cold",
            "file://relative/path",
            "file:///a/../b",
            "s3://",
            "s3://ab",
            "s3://Upper",
            "s3://-bucket",
            "s3://bucket/a//b",
            "s3://bucket/a/../b",
            "az://a--b",
            "gs://bucket",
        ] {
            assert!(matches!(parse_bucket_url(url), Err(ObjectError::Invalid(_))), "{url}");
        }
    }
}
