//! The data folder: a superblock file that names the format version, and a lock so that
//! two processes never open one folder.
//!
//! `tidepool.super` is three lines: a magic line, a JSON body, and the crc32c of the body.
//! It is written once, last, when a folder is initialised (temp file, fsync, rename, fsync
//! dir): a folder with a superblock is a tidepool node; one without is initialised only if
//! it is empty or holds nothing but what an interrupted initialisation leaves. A folder
//! with an unknown version or a corrupt superblock is refused and never written to.

use std::fs::File;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::nodekey::NodeKey;

pub const SUPERBLOCK: &str = "tidepool.super";
const MAGIC: &str = "TIDEPOOL-DATA";
pub const FORMAT_VERSION: u32 = 1;
/// What an interrupted initialisation may leave behind (plus a user's settings file).
const INIT_NAMES: &[&str] =
    &["nvme.img", "meta", "objects", "node.key", "node.key.tmp", "LOCK", "tidepool.toml", "tidepool.super.tmp"];

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("data folder i/o error path={path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a tidepool data folder (it is not empty and has no {SUPERBLOCK}); refusing to touch it")]
    Foreign { path: String },
    #[error("corrupt superblock path={path}: {reason}; refusing to start (nothing was changed)")]
    Corrupt { path: String, reason: String },
    #[error(
        "data folder format version {found} is not supported by this tidepool (it reads version {FORMAT_VERSION}) path={path}; nothing was changed"
    )]
    Version { path: String, found: u32 },
    #[error("data folder in use by another tidepool process path={path}")]
    Locked { path: String },
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Superblock {
    pub format_version: u32,
    pub node_id: u64,
    pub cluster_id: String,
    pub created_unix: u64,
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> DataDirError + '_ {
    move |source| DataDirError::Io { path: path.display().to_string(), source }
}

/// An open, locked data folder. The lock is released on drop.
pub struct DataDir {
    pub path: PathBuf,
    pub superblock: Superblock,
    /// True when this open initialised the folder.
    pub fresh: bool,
    /// `node.key`: seals the S3 secrets, derives the admin token (see `nodekey`).
    pub node_key: std::sync::Arc<NodeKey>,
    _lock: File,
}

impl DataDir {
    /// Open (or initialise, when allowed) the folder. `init` runs after the lock is held and
    /// before the superblock is written, so everything it creates is covered by the rule above.
    #[cfg(test)]
    pub fn open(path: &Path, init: impl FnOnce(&Path) -> anyhow_free::Result<()>) -> anyhow_free::Result<Self> {
        Self::open_as(path, None, init)
    }

    /// [`DataDir::open`]; a folder initialised here takes `identity` (node id, cluster id: a
    /// node joining a cluster) instead of node 1 of a new cluster. An existing folder keeps
    /// its own (the caller checks it against the cluster it means to be part of).
    pub fn open_as(
        path: &Path,
        identity: Option<(u64, String)>,
        init: impl FnOnce(&Path) -> anyhow_free::Result<()>,
    ) -> anyhow_free::Result<Self> {
        std::fs::create_dir_all(path).map_err(io_err(path))?;
        let sb_path = path.join(SUPERBLOCK);
        // A foreign folder is refused before anything (even the lock file) is created in it.
        if !sb_path.exists() {
            check_not_foreign(path)?;
        }
        let lock = lock(path)?;
        if sb_path.exists() {
            let superblock = read_superblock(&sb_path)?;
            // Folders made before node keys existed get one on their first open.
            let (node_key, created) = NodeKey::load_or_create(path)?;
            if created {
                tracing::info!(path = %NodeKey::path(path).display(), "created the node key");
            }
            return Ok(DataDir {
                path: path.to_path_buf(),
                superblock,
                fresh: false,
                node_key: node_key.into(),
                _lock: lock,
            });
        }
        // Interrupted initialisation (or a new folder): start over.
        for n in ["nvme.img", "meta", "objects", "node.key", "node.key.tmp"] {
            let p = path.join(n);
            if p.is_dir() {
                std::fs::remove_dir_all(&p).map_err(io_err(&p))?;
            } else if p.exists() {
                std::fs::remove_file(&p).map_err(io_err(&p))?;
            }
        }
        init(path)?;
        let (node_key, _) = NodeKey::load_or_create(path)?;
        let (node_id, cluster_id) = identity.unwrap_or_else(|| (1, new_cluster_id()));
        let superblock = Superblock {
            format_version: FORMAT_VERSION,
            node_id,
            cluster_id,
            created_unix: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0),
        };
        write_superblock(&sb_path, &superblock)?;
        Ok(DataDir { path: path.to_path_buf(), superblock, fresh: true, node_key: node_key.into(), _lock: lock })
    }
}

fn check_not_foreign(path: &Path) -> Result<(), DataDirError> {
    for entry in std::fs::read_dir(path).map_err(io_err(path))? {
        let name = entry.map_err(io_err(path))?.file_name();
        if !INIT_NAMES.iter().any(|n| name == std::ffi::OsStr::new(n)) {
            return Err(DataDirError::Foreign { path: path.display().to_string() });
        }
    }
    Ok(())
}

fn lock(dir: &Path) -> Result<File, DataDirError> {
    let p = dir.join("LOCK");
    let f = File::options().create(true).truncate(false).write(true).open(&p).map_err(io_err(&p))?;
    // SAFETY: flock on a valid, owned fd.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(DataDirError::Locked { path: dir.display().to_string() });
    }
    Ok(f)
}

pub fn new_cluster_id() -> String {
    let mut b = [0u8; 16];
    rand::Rng::fill(&mut rand::thread_rng(), &mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

pub fn read_superblock(path: &Path) -> Result<Superblock, DataDirError> {
    let corrupt = |reason: &str| DataDirError::Corrupt { path: path.display().to_string(), reason: reason.into() };
    let bytes = std::fs::read(path).map_err(io_err(path))?;
    let text = std::str::from_utf8(&bytes).map_err(|_| corrupt("not text"))?;
    let mut lines = text.lines();
    if lines.next() != Some(MAGIC) {
        return Err(corrupt("bad magic line"));
    }
    let body = lines.next().ok_or_else(|| corrupt("missing body"))?;
    let crc_line = lines.next().ok_or_else(|| corrupt("missing checksum"))?;
    let want = crc_line
        .strip_prefix("crc32c=")
        .and_then(|h| u32::from_str_radix(h, 16).ok())
        .ok_or_else(|| corrupt("bad checksum line"))?;
    if crc32c::crc32c(body.as_bytes()) != want {
        return Err(corrupt("checksum mismatch"));
    }
    // Read the version alone first, so a newer layout of the body still gives a version error.
    #[derive(Deserialize)]
    struct V {
        format_version: u32,
    }
    let v: V = serde_json::from_str(body).map_err(|e| corrupt(&format!("bad body: {e}")))?;
    if v.format_version != FORMAT_VERSION {
        return Err(DataDirError::Version { path: path.display().to_string(), found: v.format_version });
    }
    serde_json::from_str(body).map_err(|e| corrupt(&format!("bad body: {e}")))
}

pub fn write_superblock(path: &Path, sb: &Superblock) -> Result<(), DataDirError> {
    let body = serde_json::to_string(sb)
        .map_err(|e| DataDirError::Corrupt { path: path.display().to_string(), reason: e.to_string() })?;
    let text = format!("{MAGIC}\n{body}\ncrc32c={:08x}\n", crc32c::crc32c(body.as_bytes()));
    write_atomic(path, text.as_bytes()).map_err(io_err(path))
}

/// Replace `path` crash-safely: temp file, fsync, rename, fsync the folder.
pub fn write_atomic(path: &Path, data: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("super.tmp");
    let mut f = File::create(&tmp)?;
    f.write_all(data)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(())
}

/// A boxed error for the binary's top level: every layer's typed error, shown with `{}`.
pub mod anyhow_free {
    pub type Error = Box<dyn std::error::Error + Send + Sync + 'static>;
    pub type Result<T> = std::result::Result<T, Error>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_then_reopen_and_refusals() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().join("data");
        let dd = DataDir::open(&d, |_| Ok(())).unwrap();
        assert!(dd.fresh);
        assert!(matches!(
            DataDir::open(&d, |_| Ok(())).map(|_| ()).unwrap_err().downcast::<DataDirError>().map(|b| *b),
            Ok(DataDirError::Locked { .. })
        ));
        drop(dd);
        assert!(!DataDir::open(&d, |_| Ok(())).unwrap().fresh);
        assert_eq!(read_superblock(&d.join(SUPERBLOCK)).unwrap().node_id, 1);
        // A joining node's folder takes the given identity; an existing folder keeps its own.
        let j = dir.path().join("joiner");
        let jd = DataDir::open_as(&j, Some((77, "c0ffee".into())), |_| Ok(())).unwrap();
        assert_eq!((jd.superblock.node_id, jd.superblock.cluster_id.as_str()), (77, "c0ffee"));
        drop(jd);
        let jd = DataDir::open_as(&j, Some((78, "other".into())), |_| Ok(())).unwrap();
        assert_eq!((jd.superblock.node_id, jd.superblock.cluster_id.as_str(), jd.fresh), (77, "c0ffee", false));

        let sb = d.join(SUPERBLOCK);
        let text = std::fs::read_to_string(&sb).unwrap();
        std::fs::write(&sb, text.replace("\"format_version\":1", "\"format_version\":7")).unwrap();
        let e = DataDir::open(&d, |_| Ok(())).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("checksum"), "{e}");
        let body = text.lines().nth(1).unwrap().replace("\"format_version\":1", "\"format_version\":7");
        std::fs::write(&sb, format!("{MAGIC}\n{body}\ncrc32c={:08x}\n", crc32c::crc32c(body.as_bytes()))).unwrap();
        let e = DataDir::open(&d, |_| Ok(())).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("format version 7"), "{e}");
        // Refused, never overwritten.
        assert!(std::fs::read_to_string(&sb).unwrap().contains("\"format_version\":7"));

        let foreign = dir.path().join("foreign");
        std::fs::create_dir_all(&foreign).unwrap();
        std::fs::write(foreign.join("precious.txt"), b"x").unwrap();
        let e = DataDir::open(&foreign, |_| Ok(())).map(|_| ()).unwrap_err().to_string();
        assert!(e.contains("not a tidepool data folder"), "{e}");
        assert!(foreign.join("precious.txt").exists());
    }
}
