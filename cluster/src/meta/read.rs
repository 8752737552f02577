//! Read helpers the fs layer calls on an applied `MetaState`: lookup, readdir, path
//! resolution, the extents of a byte range, and totals. All pure `&self`.

use std::ops::Bound;

use super::apply::{check_name, lossy};
use super::{Attr, Extent, Ino, Inode, InodeKind, MetaError, MetaState, ROOT_INO};

/// Counts over the whole namespace and block table.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    /// Sum of file sizes (holes included).
    pub bytes: u64,
    pub blocks: u64,
    /// Sum of block lengths.
    pub block_bytes: u64,
}

/// One page of a directory listing: `(name, attr)` in name order, and whether it is the last.
pub type DirPage = (Vec<(Vec<u8>, Attr)>, bool);

impl MetaState {
    pub fn inode(&self, ino: Ino) -> Option<&Inode> {
        self.inodes.get(&ino)
    }

    /// The inode named `name` in dir `parent`. `"."` is the dir itself and `".."` its parent.
    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<&Inode, MetaError> {
        let entries = self.dir_entries(parent)?;
        let ino = match name {
            b"." => parent,
            b".." => self.inode_ref(parent).attr.parent,
            _ => {
                check_name(name)?;
                *entries.get(name).ok_or_else(|| MetaError::NoEntry { parent, name: lossy(name) })?
            }
        };
        self.inodes.get(&ino).ok_or(MetaError::NoInode(ino))
    }

    /// Up to `limit` entries of `dir` in name order, strictly after `after`; `eof` is true
    /// when no entry follows the returned ones.
    pub fn readdir(&self, dir: Ino, after: Option<&[u8]>, limit: usize) -> Result<DirPage, MetaError> {
        let entries = self.dir_entries(dir)?;
        let lower = after.map_or(Bound::Unbounded, Bound::Excluded);
        let mut range = entries.range::<[u8], _>((lower, Bound::Unbounded));
        let mut page = Vec::new();
        for (name, ino) in range.by_ref().take(limit) {
            let inode = self.inodes.get(ino).ok_or(MetaError::NoInode(*ino))?;
            page.push((name.clone(), inode.attr.clone()));
        }
        let eof = range.next().is_none();
        Ok((page, eof))
    }

    /// The extents of file `ino` overlapping `[offset, offset + len)`, clipped to it, as
    /// `(file_offset, extent)` in offset order. Gaps between them are holes (zeros).
    pub fn extents_in(&self, ino: Ino, offset: u64, len: u64) -> Result<Vec<(u64, Extent)>, MetaError> {
        let inode = self.inodes.get(&ino).ok_or(MetaError::NoInode(ino))?;
        match inode.attr.kind {
            InodeKind::File => {}
            InodeKind::Dir => return Err(MetaError::IsDir(ino)),
            InodeKind::Symlink => return Err(MetaError::Invalid("a symlink has no extents")),
        }
        let end = offset.saturating_add(len);
        if offset >= end {
            return Ok(Vec::new());
        }
        // The extent starting at or before `offset` may reach into the range.
        let first = inode.extents.range(..=offset).next_back().map_or(offset, |(off, _)| *off);
        let mut out = Vec::new();
        for (&off, e) in inode.extents.range(first..end) {
            let lo = off.max(offset);
            let hi = (off + e.len).min(end);
            if lo >= hi {
                continue;
            }
            // lo - off < e.len <= block len (a u32): fits in u32.
            let skip = u32::try_from(lo - off).expect("skip within a u32-sized block");
            out.push((lo, Extent { len: hi - lo, block: e.block, block_offset: e.block_offset + skip }));
        }
        Ok(out)
    }

    /// The inode at `path` ("/a/b"), walked from the root without following symlinks.
    /// Empty components and "." are skipped, ".." goes up; a non-dir on the way is `NotDir`.
    pub fn resolve(&self, path: &[u8]) -> Result<&Inode, MetaError> {
        let mut ino = ROOT_INO;
        for comp in path.split(|&b| b == b'/') {
            if comp.is_empty() || comp == b"." {
                continue;
            }
            ino = self.lookup(ino, comp)?.attr.ino;
        }
        self.inodes.get(&ino).ok_or(MetaError::NoInode(ino))
    }

    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for inode in self.inodes.values() {
            match inode.attr.kind {
                InodeKind::File => {
                    t.files += 1;
                    t.bytes += inode.attr.size;
                }
                InodeKind::Dir => t.dirs += 1,
                InodeKind::Symlink => t.symlinks += 1,
            }
        }
        t.blocks = self.blocks.len() as u64;
        t.block_bytes = self.blocks.values().map(|b| u64::from(b.len)).sum();
        t
    }
}
