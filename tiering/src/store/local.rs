//! `LocalStore`: a local folder as an object store (`file:///path`), the embedded default.
//!
//! An object is the file `<root>/<key>` (key segments are folders). Writes are crash-safe:
//! the body goes to a temp file in `<root>/.tmp/`, is fsynced, then renamed (`put`) or
//! hard-linked (`put_if_absent`) into place, and the parent folder is fsynced. The rename or
//! link is the commit point: a crash before it leaves only a temp file (never listed; removed
//! by a later open once stale), a crash after it leaves the whole object.
//!
//! Limits of a folder that a bucket does not have: a key cannot be both an object and a
//! folder of other keys (`a` and `a/b`): the second write is `Invalid`. The first segment
//! `.tmp` is reserved. Symbolic links in the tree are not followed by `list`.

use std::fs::{self, File};
use std::io::{self, ErrorKind, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use async_trait::async_trait;
use bytes::Bytes;

use super::key::check_key;
use super::{ListPage, ObjectError, ObjectInfo, ObjectStore, PutIfAbsent, Result};

/// The folder under the root that holds temp files; never a key.
const TMP_DIR: &str = ".tmp";

/// Temp files older than this are removed when a store is opened. Old enough that no write
/// of a live store on the same folder (another process, another node in a test) is still
/// using one: a put of a 64 MiB object takes well under a second.
pub const DEFAULT_STALE_TMP_AFTER: Duration = Duration::from_secs(15 * 60);

/// How many times a write re-creates its parent folders when a concurrent delete removed
/// them (empty) between the `mkdir` and the rename.
const PARENT_RACE_ATTEMPTS: usize = 8;

/// A local folder as an object store. Cheap to clone (the state is shared).
#[derive(Debug, Clone)]
pub struct LocalStore {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    root: PathBuf,
    tmp: PathBuf,
}

impl LocalStore {
    /// Opens (creating it if needed) the folder `root` as a store and removes temp files older
    /// than [`DEFAULT_STALE_TMP_AFTER`] left by crashed writes.
    pub fn new(root: PathBuf) -> Result<Self> {
        Self::with_stale_tmp_after(root, DEFAULT_STALE_TMP_AFTER)
    }

    /// As [`LocalStore::new`], removing temp files older than `stale_tmp_after` (zero: all of
    /// them; only safe when no other store writes into the same folder).
    pub fn with_stale_tmp_after(root: PathBuf, stale_tmp_after: Duration) -> Result<Self> {
        let tmp = root.join(TMP_DIR);
        fs::create_dir_all(&tmp).map_err(|e| io_err("create store folder", &tmp, &e))?;
        clean_tmp(&tmp, stale_tmp_after)?;
        Ok(LocalStore { inner: Arc::new(Inner { root, tmp }) })
    }

    /// The store's folder.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T>
    where
        T: Send + 'static,
        F: FnOnce(&Inner) -> Result<T> + Send + 'static,
    {
        let inner = Arc::clone(&self.inner);
        match tokio::task::spawn_blocking(move || f(&inner)).await {
            Ok(result) => result,
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => Err(ObjectError::Io(format!("local store task did not finish: {e}"))),
        }
    }
}

#[async_trait]
impl ObjectStore for LocalStore {
    fn describe(&self) -> String {
        format!("file://{}", self.inner.root.display())
    }

    async fn put(&self, key: &str, body: Bytes) -> Result<()> {
        let key = checked(key)?;
        self.blocking(move |s| s.put(&key, &body)).await
    }

    async fn put_if_absent(&self, key: &str, body: Bytes) -> Result<PutIfAbsent> {
        let key = checked(key)?;
        self.blocking(move |s| s.put_if_absent(&key, &body)).await
    }

    async fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        let key = checked(key)?;
        self.blocking(move |s| s.get(&key, range)).await
    }

    async fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let key = checked(key)?;
        self.blocking(move |s| s.head(&key)).await
    }

    async fn list(&self, prefix: &str, next: Option<String>, limit: usize) -> Result<ListPage> {
        if limit == 0 {
            return Err(ObjectError::Invalid("list limit must be at least 1 limit=0".into()));
        }
        let prefix = prefix.to_owned();
        self.blocking(move |s| s.list(&prefix, next.as_deref(), limit)).await
    }

    async fn delete(&self, key: &str) -> Result<()> {
        let key = checked(key)?;
        self.blocking(move |s| s.delete(&key)).await
    }
}

/// The key rules plus the reserved temp folder.
fn checked(key: &str) -> Result<String> {
    check_key(key)?;
    if key.split('/').next() == Some(TMP_DIR) {
        return Err(ObjectError::Invalid(format!("object key uses the reserved folder .tmp key={key:?}")));
    }
    Ok(key.to_owned())
}

impl Inner {
    fn path(&self, key: &str) -> PathBuf {
        self.root.join(key)
    }

    fn put(&self, key: &str, body: &[u8]) -> Result<()> {
        let tmp = self.write_tmp(body)?;
        let dst = self.path(key);
        let result = self.with_parents(key, || fs::rename(&tmp, &dst));
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        let dirty = result.map_err(|e| place_err("rename into place", key, &dst, &e))?;
        sync_dirs(&dirty)
    }

    fn put_if_absent(&self, key: &str, body: &[u8]) -> Result<PutIfAbsent> {
        let tmp = self.write_tmp(body)?;
        let dst = self.path(key);
        let result = self.with_parents(key, || fs::hard_link(&tmp, &dst));
        // The temp name is no longer needed whatever happened: on success the object holds
        // its own link to the inode.
        let _ = fs::remove_file(&tmp);
        match result {
            Ok(dirty) => {
                sync_dirs(&dirty)?;
                Ok(PutIfAbsent::Created)
            }
            Err(e) if e.kind() == ErrorKind::AlreadyExists => {
                if dst.is_dir() {
                    return Err(ObjectError::Invalid(format!("object key names a folder of other keys key={key:?}")));
                }
                Ok(PutIfAbsent::Exists)
            }
            Err(e) => Err(place_err("link into place", key, &dst, &e)),
        }
    }

    /// Writes `body` to a new temp file and fsyncs it.
    fn write_tmp(&self, body: &[u8]) -> Result<PathBuf> {
        loop {
            let path = self.tmp.join(format!("{}.{:016x}", std::process::id(), rand::random::<u64>()));
            let mut file = match File::options().write(true).create_new(true).open(&path) {
                Ok(file) => file,
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(io_err("create temp file", &path, &e)),
            };
            let written = file.write_all(body).and_then(|()| file.sync_all());
            if let Err(e) = written {
                let _ = fs::remove_file(&path);
                return Err(io_err("write temp file", &path, &e));
            }
            return Ok(path);
        }
    }

    /// Runs `place` (a rename or link into `key`'s path) after making `key`'s parent folders,
    /// again if a concurrent delete removed an empty parent meanwhile. Returns the folders whose
    /// entries changed, to fsync.
    fn with_parents(&self, key: &str, mut place: impl FnMut() -> io::Result<()>) -> io::Result<Vec<PathBuf>> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut dirty = self.make_parents(key)?;
            match place() {
                Ok(()) => {
                    let parent = self.path(key).parent().map(Path::to_path_buf).unwrap_or_else(|| self.root.clone());
                    dirty.push(parent);
                    return Ok(dirty);
                }
                Err(e) if e.kind() == ErrorKind::NotFound && attempt < PARENT_RACE_ATTEMPTS => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Creates the missing parent folders of `key`; returns the folders that gained an entry.
    fn make_parents(&self, key: &str) -> io::Result<Vec<PathBuf>> {
        let mut dirty = Vec::new();
        let mut dir = self.root.clone();
        let segments: Vec<&str> = key.split('/').collect();
        for segment in &segments[..segments.len() - 1] {
            let child = dir.join(segment);
            match fs::create_dir(&child) {
                Ok(()) => dirty.push(dir),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => {}
                Err(e) => return Err(e),
            }
            dir = child;
        }
        Ok(dirty)
    }

    fn get(&self, key: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        let path = self.path(key);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if is_missing(&e) => return Err(ObjectError::NotFound(key.to_owned())),
            Err(e) => return Err(io_err("open object", &path, &e)),
        };
        let meta = file.metadata().map_err(|e| io_err("stat object", &path, &e))?;
        if meta.is_dir() {
            return Err(ObjectError::NotFound(key.to_owned()));
        }
        let size = meta.len();
        let range = range.unwrap_or(0..size);
        if range.start > range.end || range.end > size {
            return Err(ObjectError::Invalid(format!(
                "range outside the object key={key:?} range={}..{} size_bytes={size}",
                range.start, range.end
            )));
        }
        let len = usize::try_from(range.end - range.start)
            .map_err(|_| ObjectError::Invalid(format!("range too large for memory key={key:?}")))?;
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, range.start).map_err(|e| match e.kind() {
            ErrorKind::UnexpectedEof => ObjectError::Corrupt(format!("object shorter than its size key={key:?}")),
            _ => io_err("read object", &path, &e),
        })?;
        Ok(Bytes::from(buf))
    }

    fn head(&self, key: &str) -> Result<Option<ObjectInfo>> {
        let path = self.path(key);
        match fs::metadata(&path) {
            Ok(meta) if meta.is_file() => Ok(Some(ObjectInfo { key: key.to_owned(), size_bytes: meta.len() })),
            Ok(_) => Ok(None),
            Err(e) if is_missing(&e) => Ok(None),
            Err(e) => Err(io_err("stat object", &path, &e)),
        }
    }

    fn list(&self, prefix: &str, after: Option<&str>, limit: usize) -> Result<ListPage> {
        let mut walk = Walk { prefix, after, want: limit.saturating_add(1), out: Vec::new() };
        walk.dir(&self.root, "")?;
        let mut objects = walk.out;
        let next = if objects.len() > limit {
            objects.truncate(limit);
            objects.last().map(|o| o.key.clone())
        } else {
            None
        };
        Ok(ListPage { objects, next })
    }

    fn delete(&self, key: &str) -> Result<()> {
        let path = self.path(key);
        match fs::remove_file(&path) {
            Ok(()) => {}
            // Missing, a folder (no object), or below a file (no object): nothing to delete.
            Err(e) if is_missing(&e) || e.kind() == ErrorKind::IsADirectory => return Ok(()),
            Err(e) => return Err(io_err("delete object", &path, &e)),
        }
        // Remove the parents the object leaves empty, deepest first; stop at the first that
        // is not empty (or is being filled by a concurrent write, which re-creates it).
        let mut dir = path.parent().map(Path::to_path_buf);
        while let Some(d) = dir {
            if d == self.root || fs::remove_dir(&d).is_err() {
                return sync_dirs(&[d]);
            }
            dir = d.parent().map(Path::to_path_buf);
        }
        Ok(())
    }
}

/// One listing: a depth-first walk in key order that skips folders holding no wanted key.
struct Walk<'a> {
    prefix: &'a str,
    after: Option<&'a str>,
    want: usize,
    out: Vec<ObjectInfo>,
}

impl Walk<'_> {
    fn dir(&mut self, dir: &Path, dir_key: &str) -> Result<()> {
        let entries = match fs::read_dir(dir) {
            Ok(entries) => entries,
            // Removed by a concurrent delete since its parent was read: empty.
            Err(e) if is_missing(&e) => return Ok(()),
            Err(e) => return Err(io_err("read folder", dir, &e)),
        };
        // (name as it sorts, name, is a folder): a folder sorts as `name/`, which puts it
        // where its keys are in key order (`a-b` < `a/c` because `-` < `/`).
        let mut names: Vec<(String, String, bool)> = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|e| io_err("read folder", dir, &e))?;
            let Ok(name) = entry.file_name().into_string() else { continue };
            let Ok(kind) = entry.file_type() else { continue };
            if dir_key.is_empty() && name == TMP_DIR {
                continue;
            }
            if kind.is_dir() {
                names.push((format!("{name}/"), name, true));
            } else if kind.is_file() {
                names.push((name.clone(), name, false));
            }
        }
        names.sort_unstable();
        for (sort_name, name, is_dir) in names {
            let key = format!("{dir_key}{sort_name}");
            if is_dir {
                if self.wants_folder(&key) {
                    self.dir(&dir.join(&name), &key)?;
                }
            } else if key.starts_with(self.prefix) && self.after.is_none_or(|a| key.as_str() > a) {
                let path = dir.join(&name);
                match fs::metadata(&path) {
                    Ok(meta) => self.out.push(ObjectInfo { key, size_bytes: meta.len() }),
                    Err(e) if is_missing(&e) => {}
                    Err(e) => return Err(io_err("stat object", &path, &e)),
                }
            }
            if self.out.len() >= self.want {
                return Ok(());
            }
        }
        Ok(())
    }

    /// Whether the folder whose keys all start with `folder` (ending in `/`) can hold a key
    /// that matches the prefix and comes after `after`.
    fn wants_folder(&self, folder: &str) -> bool {
        let matches_prefix = folder.starts_with(self.prefix) || self.prefix.starts_with(folder);
        // Every key in the folder is at most `after` when `after` sorts after the folder
        // name without being inside it.
        let all_before = self.after.is_some_and(|a| a > folder && !a.starts_with(folder));
        matches_prefix && !all_before
    }
}

/// Removes temp files last modified more than `stale_after` ago.
fn clean_tmp(tmp: &Path, stale_after: Duration) -> Result<()> {
    let now = SystemTime::now();
    let entries = fs::read_dir(tmp).map_err(|e| io_err("read temp folder", tmp, &e))?;
    for entry in entries {
        let entry = entry.map_err(|e| io_err("read temp folder", tmp, &e))?;
        let path = entry.path();
        let Ok(meta) = entry.metadata() else { continue };
        let age = meta.modified().ok().and_then(|m| now.duration_since(m).ok()).unwrap_or(Duration::ZERO);
        if age >= stale_after {
            let removed = if meta.is_dir() { fs::remove_dir_all(&path) } else { fs::remove_file(&path) };
            match removed {
                Ok(()) => {}
                Err(e) if is_missing(&e) => {}
                Err(e) => return Err(io_err("remove stale temp file", &path, &e)),
            }
        }
    }
    Ok(())
}

/// Fsyncs folders so the entries just added to (or removed from) them survive a crash. A
/// folder a concurrent delete removed meanwhile has nothing left to persist.
fn sync_dirs(dirs: &[PathBuf]) -> Result<()> {
    for dir in dirs {
        match File::open(dir).and_then(|d| d.sync_all()) {
            Ok(()) => {}
            Err(e) if is_missing(&e) => {}
            Err(e) => return Err(io_err("fsync folder", dir, &e)),
        }
    }
    Ok(())
}

/// Missing file, or a path through something that is not a folder: no object there.
fn is_missing(e: &io::Error) -> bool {
    e.kind() == ErrorKind::NotFound || e.kind() == ErrorKind::NotADirectory
}

/// An error placing an object: a key that clashes with a folder or a file of another key is
/// the caller's mistake (`Invalid`), the rest is I/O.
fn place_err(what: &str, key: &str, path: &Path, e: &io::Error) -> ObjectError {
    match e.kind() {
        ErrorKind::IsADirectory | ErrorKind::DirectoryNotEmpty => {
            ObjectError::Invalid(format!("object key names a folder of other keys key={key:?}"))
        }
        ErrorKind::NotADirectory => ObjectError::Invalid(format!("object key is below another object key={key:?}")),
        ErrorKind::AlreadyExists if path.is_dir() => {
            ObjectError::Invalid(format!("object key names a folder of other keys key={key:?}"))
        }
        _ => io_err(what, path, e),
    }
}

fn io_err(what: &str, path: &Path, e: &io::Error) -> ObjectError {
    ObjectError::Io(format!("{what} failed path={} error={e}", path.display()))
}
