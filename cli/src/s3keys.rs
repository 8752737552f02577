//! The S3 key pair of a node until `tidepool keys` lands: `TIDEPOOL_S3_ACCESS_KEY_ID` and
//! `TIDEPOOL_S3_SECRET_ACCESS_KEY` when both are set (scripts, containers), else a pair
//! generated on first start and kept in `<data_dir>/s3-credentials` (mode 0600).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use rand::Rng;
use rand::distributions::Alphanumeric;

use crate::datadir::anyhow_free::Result;

pub const FILE: &str = "s3-credentials";

pub struct S3Key {
    pub access_key_id: String,
    pub secret_access_key: String,
    /// Where the pair came from, for the banner.
    pub source: String,
}

/// The key pair from `env` (both variables or neither), else from the data folder's file,
/// created on first use.
pub fn load_or_create(data_dir: &Path, env: impl Fn(&str) -> Option<String>) -> Result<S3Key> {
    let id = env("TIDEPOOL_S3_ACCESS_KEY_ID").filter(|s| !s.is_empty());
    let secret = env("TIDEPOOL_S3_SECRET_ACCESS_KEY").filter(|s| !s.is_empty());
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => {
            return Ok(S3Key { access_key_id, secret_access_key, source: "TIDEPOOL_S3_* environment".into() });
        }
        (None, None) => {}
        _ => {
            return Err("set both TIDEPOOL_S3_ACCESS_KEY_ID and TIDEPOOL_S3_SECRET_ACCESS_KEY, or neither".into());
        }
    }
    let path = data_dir.join(FILE);
    if path.exists() {
        let text = std::fs::read_to_string(&path)?;
        let get = |k: &str| text.lines().find_map(|l| l.strip_prefix(k).map(str::trim).map(str::to_owned));
        return match (get("access_key_id="), get("secret_access_key=")) {
            (Some(a), Some(s)) if !a.is_empty() && !s.is_empty() => {
                Ok(S3Key { access_key_id: a, secret_access_key: s, source: path.display().to_string() })
            }
            _ => {
                Err(format!("{} is damaged (expected access_key_id= and secret_access_key= lines)", path.display())
                    .into())
            }
        };
    }
    let mut rng = rand::rngs::OsRng;
    let mut pick = |n: usize| -> String { (&mut rng).sample_iter(&Alphanumeric).take(n).map(char::from).collect() };
    let access_key_id = format!("TP{}", pick(18).to_ascii_uppercase());
    let secret_access_key = pick(40);
    write_private(&path, &format!("access_key_id={access_key_id}\nsecret_access_key={secret_access_key}\n"))?;
    Ok(S3Key { access_key_id, secret_access_key, source: format!("{} (new)", path.display()) })
}

/// Write a 0600 file crash-safely: temp file, fsync, rename, fsync the folder.
fn write_private(path: &Path, text: &str) -> Result<()> {
    let tmp: PathBuf = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(text.as_bytes())?;
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
    fn env_pair_file_pair_and_half_a_pair() {
        let dir = tempfile::tempdir().unwrap();
        let none = |_: &str| None;
        let a = load_or_create(dir.path(), none).unwrap();
        assert!(a.access_key_id.starts_with("TP") && a.access_key_id.len() == 20 && a.secret_access_key.len() == 40);
        let mode = std::fs::metadata(dir.path().join(FILE)).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let b = load_or_create(dir.path(), none).unwrap();
        assert_eq!((a.access_key_id, a.secret_access_key), (b.access_key_id, b.secret_access_key), "kept");
        let env = |k: &str| Some(format!("v-{k}"));
        let c = load_or_create(dir.path(), env).unwrap();
        assert_eq!(c.access_key_id, "v-TIDEPOOL_S3_ACCESS_KEY_ID");
        let half = |k: &str| (k == "TIDEPOOL_S3_ACCESS_KEY_ID").then(|| "x".to_string());
        assert!(load_or_create(dir.path(), half).is_err());
    }
}
