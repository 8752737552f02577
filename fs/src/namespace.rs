//! Namespace operations: lookup, getattr, create, mkdir, symlink, rename, unlink, rmdir,
//! readdir, setattr, user metadata. Each mutation is one meta-group command.

use std::collections::BTreeMap;

use tidepool_cluster::meta::{Attr, Command, Ino, InodeKind, NewKind};

use crate::metrics::Op;
use crate::{DirEntry, Fs, FsError, Result, SetAttr, split_path};

impl Fs {
    pub fn getattr(&self, ino: Ino) -> Result<Attr> {
        self.metrics.op(Op::Getattr);
        self.meta.read(|s| s.inode(ino).map(|i| i.attr.clone()).ok_or(tidepool_cluster::MetaError::NoInode(ino).into()))
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr> {
        self.metrics.op(Op::Lookup);
        self.meta.read(|s| Ok(s.lookup(parent, name)?.attr.clone()))
    }

    /// Resolve an absolute path from the root, without following symlinks.
    pub fn resolve(&self, path: &[u8]) -> Result<Attr> {
        self.meta.read(|s| Ok(s.resolve(path)?.attr.clone()))
    }

    pub async fn create(&self, parent: Ino, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        self.new_node(parent, name, NewKind::File, mode, uid, gid).await
    }

    pub async fn mkdir(&self, parent: Ino, name: &[u8], mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        self.new_node(parent, name, NewKind::Dir, mode, uid, gid).await
    }

    pub async fn symlink(&self, parent: Ino, name: &[u8], target: &[u8], uid: u32, gid: u32) -> Result<Attr> {
        self.new_node(parent, name, NewKind::Symlink { target: target.to_vec() }, 0o777, uid, gid).await
    }

    async fn new_node(&self, parent: Ino, name: &[u8], kind: NewKind, mode: u32, uid: u32, gid: u32) -> Result<Attr> {
        self.metrics.op(Op::Create);
        self.check_writable()?;
        let cmd = Command::Create { parent, name: name.to_vec(), kind, mode, uid, gid, now: self.now() };
        let applied = self.commit(cmd).await?;
        applied.attr.ok_or(FsError::Invalid("create returned no inode"))
    }

    /// Create every missing directory of `path` (like `mkdir -p`); returns the last one.
    pub async fn mkdir_all(&self, path: &[u8], mode: u32) -> Result<Attr> {
        let mut cur = self.getattr(crate::ROOT_INO)?;
        for comp in split_path(path) {
            cur = match self.lookup(cur.ino, comp) {
                Ok(a) if a.kind == InodeKind::Dir => a,
                Ok(a) => return Err(tidepool_cluster::MetaError::NotDir(a.ino).into()),
                Err(e) if e.kind() == crate::ErrorKind::NotFound => match self.mkdir(cur.ino, comp, mode, 0, 0).await {
                    Ok(a) => a,
                    // Raced with another creator: take theirs.
                    Err(e) if e.kind() == crate::ErrorKind::Exists => self.lookup(cur.ino, comp)?,
                    Err(e) => return Err(e),
                },
                Err(e) => return Err(e),
            };
        }
        Ok(cur)
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>> {
        self.metrics.op(Op::Getattr);
        self.meta.read(|s| {
            let i = s.inode(ino).ok_or(tidepool_cluster::MetaError::NoInode(ino))?;
            if i.attr.kind != InodeKind::Symlink {
                return Err(FsError::NotSymlink(ino));
            }
            Ok(i.target.clone())
        })
    }

    /// Up to `limit` entries in name order, strictly after `after`; `true` when the listing is done.
    pub fn readdir(&self, dir: Ino, after: Option<&[u8]>, limit: usize) -> Result<(Vec<DirEntry>, bool)> {
        self.metrics.op(Op::Readdir);
        let (list, eof) = self.meta.read(|s| s.readdir(dir, after, limit))?;
        Ok((list.into_iter().map(|(name, attr)| DirEntry { name, attr }).collect(), eof))
    }

    pub async fn setattr(&self, ino: Ino, set: SetAttr) -> Result<Attr> {
        self.metrics.op(Op::Setattr);
        self.check_writable()?;
        let cmd = Command::SetAttr {
            ino,
            mode: set.mode,
            uid: set.uid,
            gid: set.gid,
            size: set.size,
            atime: set.atime,
            mtime: set.mtime,
            now: self.now(),
        };
        let applied = self.commit(cmd).await?;
        applied.attr.ok_or(FsError::Invalid("setattr returned no inode"))
    }

    pub async fn rename(&self, src_parent: Ino, src_name: &[u8], dst_parent: Ino, dst_name: &[u8]) -> Result<()> {
        self.metrics.op(Op::Rename);
        self.check_writable()?;
        let cmd = Command::Rename {
            src_parent,
            src_name: src_name.to_vec(),
            dst_parent,
            dst_name: dst_name.to_vec(),
            now: self.now(),
        };
        self.commit(cmd).await.map(drop)
    }

    pub async fn unlink(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.metrics.op(Op::Remove);
        self.check_writable()?;
        self.commit(Command::Unlink { parent, name: name.to_vec(), now: self.now() }).await.map(drop)
    }

    pub async fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<()> {
        self.metrics.op(Op::Remove);
        self.check_writable()?;
        self.commit(Command::Rmdir { parent, name: name.to_vec(), now: self.now() }).await.map(drop)
    }

    pub fn get_xattrs(&self, ino: Ino) -> Result<BTreeMap<String, String>> {
        self.metrics.op(Op::Getattr);
        self.meta.read(|s| Ok(s.inode(ino).ok_or(tidepool_cluster::MetaError::NoInode(ino))?.xattrs.clone()))
    }

    pub fn get_xattr(&self, ino: Ino, key: &str) -> Result<Option<String>> {
        Ok(self.get_xattrs(ino)?.remove(key))
    }

    pub async fn set_xattr(&self, ino: Ino, key: &str, value: &str) -> Result<()> {
        self.metrics.op(Op::Setattr);
        self.check_writable()?;
        let cmd = Command::SetXattr { ino, key: key.to_owned(), value: value.to_owned(), now: self.now() };
        self.commit(cmd).await.map(drop)
    }

    pub async fn remove_xattr(&self, ino: Ino, key: &str) -> Result<()> {
        self.metrics.op(Op::Setattr);
        self.check_writable()?;
        self.commit(Command::RemoveXattr { ino, key: key.to_owned(), now: self.now() }).await.map(drop)
    }

    pub async fn replace_xattrs(&self, ino: Ino, xattrs: BTreeMap<String, String>) -> Result<()> {
        self.metrics.op(Op::Setattr);
        self.check_writable()?;
        self.commit(Command::ReplaceXattrs { ino, xattrs, now: self.now() }).await.map(drop)
    }
}
