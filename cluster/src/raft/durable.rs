//! Small file helpers shared by the log and the snapshot file: crash-safe replacement of a
//! whole file and I/O error mapping. No format knowledge lives here.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use super::RaftError;

/// Maps an `io::Error` on `path` to [`RaftError::Io`].
pub(crate) fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> RaftError + '_ {
    move |source| RaftError::Io { path: path.display().to_string(), source }
}

/// fsyncs a directory so that a rename or a file creation inside it is durable.
pub(crate) fn sync_dir(dir: &Path) -> Result<(), RaftError> {
    File::open(dir).and_then(|d| d.sync_all()).map_err(io_err(dir))
}

/// Replaces `dir/name` with `bytes` crash-safely: write `name.tmp`, fsync it, rename it over
/// `name`, fsync `dir`.
///
/// Commit point: the rename. A crash before it leaves the old file (and maybe a stale `.tmp`,
/// overwritten next time); a crash after it leaves the new file, complete, because its bytes
/// were fsynced before the rename and the directory is fsynced right after.
pub(crate) fn replace_file(dir: &Path, name: &str, bytes: &[u8]) -> Result<PathBuf, RaftError> {
    let path = dir.join(name);
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = OpenOptions::new().write(true).create(true).truncate(true).open(&tmp).map_err(io_err(&tmp))?;
    f.write_all(bytes).map_err(io_err(&tmp))?;
    f.sync_all().map_err(io_err(&tmp))?;
    drop(f);
    std::fs::rename(&tmp, &path).map_err(io_err(&path))?;
    sync_dir(dir)?;
    Ok(path)
}
