//! Commands on file contents, attributes, user metadata and the block table: SetAttr
//! (truncate / extend), Write (copy-on-write extents), the xattr commands, AllocBlockIds and
//! Concat (extents moved from files to the end of another), plus the extent
//! surgery they share. Like `apply.rs`: validate fully, then mutate.

use std::collections::{BTreeMap, BTreeSet};

use super::{Applied, BlockId, BlockMeta, BlockState, Extent, Ino, InodeKind, MetaError, MetaState, Nanos, NewBlock};

/// Largest file size (and end of any write): 2^63 bytes, so sizes fit an `i64` / `off_t`.
pub const MAX_FILE_SIZE: u64 = 1 << 63;
/// Longest user-metadata key, in bytes.
pub const XATTR_KEY_MAX: usize = 1024;
/// Longest user-metadata value, in bytes.
pub const XATTR_VALUE_MAX: usize = 64 << 10;
/// Most block ids one `AllocBlockIds` hands out.
pub const ALLOC_MAX: u64 = 1 << 20;

/// Fields of a `Command::SetAttr`.
pub(super) struct AttrChange {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<Nanos>,
    pub mtime: Option<Nanos>,
    pub now: Nanos,
}

impl MetaState {
    /// SetAttr. A size change also sets mtime to `now` unless an mtime is given.
    pub(super) fn set_attr(&mut self, ino: Ino, c: AttrChange) -> Result<Applied, MetaError> {
        let inode = self.inodes.get(&ino).ok_or(MetaError::NoInode(ino))?;
        if let Some(size) = c.size {
            match inode.attr.kind {
                InodeKind::Dir => return Err(MetaError::IsDir(ino)),
                InodeKind::Symlink => return Err(MetaError::Invalid("cannot set the size of a symlink")),
                InodeKind::File if size > MAX_FILE_SIZE => {
                    return Err(MetaError::Invalid("size larger than 2^63"));
                }
                InodeKind::File => {}
            }
        }
        // Validation done: mutate.
        let mut freed = Vec::new();
        // Field-level borrow (not `inode_mut`) so `self.blocks` stays usable; ino validated above.
        let inode = self.inodes.get_mut(&ino).expect("inode validated to exist");
        if let Some(size) = c.size {
            if size < inode.attr.size {
                punch(&mut inode.extents, &mut self.blocks, size, u64::MAX, &mut freed);
            }
            if size != inode.attr.size {
                inode.attr.mtime = c.now;
            }
            inode.attr.size = size;
        }
        let attr = &mut inode.attr;
        if let Some(mode) = c.mode {
            attr.mode = mode & 0o7777;
        }
        attr.uid = c.uid.unwrap_or(attr.uid);
        attr.gid = c.gid.unwrap_or(attr.gid);
        attr.atime = c.atime.unwrap_or(attr.atime);
        attr.mtime = c.mtime.unwrap_or(attr.mtime);
        attr.ctime = c.now;
        let attr = attr.clone();
        freed.sort_unstable();
        Ok(Applied { attr: Some(attr), freed, ..Applied::default() })
    }

    /// Write: lays `blocks` end to end from `offset`, replacing what was there.
    pub(super) fn write(
        &mut self,
        ino: Ino,
        offset: u64,
        blocks: &[NewBlock],
        now: Nanos,
    ) -> Result<Applied, MetaError> {
        let inode = self.inodes.get(&ino).ok_or(MetaError::NoInode(ino))?;
        match inode.attr.kind {
            InodeKind::File => {}
            InodeKind::Dir => return Err(MetaError::IsDir(ino)),
            InodeKind::Symlink => return Err(MetaError::Invalid("cannot write to a symlink")),
        }
        if blocks.is_empty() {
            return Err(MetaError::Invalid("write without blocks"));
        }
        let total = self.check_new_blocks(blocks)?;
        let end = match offset.checked_add(total) {
            Some(end) if end <= MAX_FILE_SIZE => end,
            _ => return Err(MetaError::Invalid("write ends beyond 2^63")),
        };
        // Validation done: mutate.
        let mut freed = Vec::new();
        // Field-level borrow (not `inode_mut`) so `self.blocks` stays usable; ino validated above.
        let inode = self.inodes.get_mut(&ino).expect("inode validated to exist");
        punch(&mut inode.extents, &mut self.blocks, offset, end, &mut freed);
        self.dirty_bytes += lay_blocks(&mut inode.extents, &mut self.blocks, offset, blocks, now);
        inode.attr.size = inode.attr.size.max(end);
        inode.attr.mtime = now;
        inode.attr.ctime = now;
        let attr = inode.attr.clone();
        freed.sort_unstable();
        Ok(Applied { attr: Some(attr), freed, ..Applied::default() })
    }

    /// Checks the blocks of a Write or Publish (non-empty, allocated, unused, distinct) and
    /// returns their total length.
    pub(super) fn check_new_blocks(&self, blocks: &[NewBlock]) -> Result<u64, MetaError> {
        let mut seen = BTreeSet::new();
        let mut total: u64 = 0;
        for b in blocks {
            if b.len == 0 {
                return Err(MetaError::Invalid("empty block"));
            }
            if b.id == 0 || b.id >= self.next_block_id {
                return Err(MetaError::Invalid("block id not allocated"));
            }
            if self.blocks.contains_key(&b.id) || !seen.insert(b.id) {
                return Err(MetaError::Invalid("block id already used"));
            }
            total += u64::from(b.len); // at most 2^32 blocks of < 2^32 bytes: cannot overflow
        }
        Ok(total)
    }

    pub(super) fn set_xattr(&mut self, ino: Ino, key: &str, value: &str, now: Nanos) -> Result<Applied, MetaError> {
        self.inodes.get(&ino).ok_or(MetaError::NoInode(ino))?;
        check_xattr(key, value)?;
        let inode = self.inode_mut(ino);
        inode.xattrs.insert(key.to_owned(), value.to_owned());
        inode.attr.ctime = now;
        Ok(Applied { attr: Some(inode.attr.clone()), ..Applied::default() })
    }

    /// RemoveXattr; a missing key is not an error (only ctime changes).
    pub(super) fn remove_xattr(&mut self, ino: Ino, key: &str, now: Nanos) -> Result<Applied, MetaError> {
        self.inodes.get(&ino).ok_or(MetaError::NoInode(ino))?;
        check_xattr(key, "")?;
        let inode = self.inode_mut(ino);
        inode.xattrs.remove(key);
        inode.attr.ctime = now;
        Ok(Applied { attr: Some(inode.attr.clone()), ..Applied::default() })
    }

    pub(super) fn replace_xattrs(
        &mut self,
        ino: Ino,
        xattrs: &BTreeMap<String, String>,
        now: Nanos,
    ) -> Result<Applied, MetaError> {
        self.inodes.get(&ino).ok_or(MetaError::NoInode(ino))?;
        check_xattrs(xattrs)?;
        let inode = self.inode_mut(ino);
        inode.xattrs = xattrs.clone();
        inode.attr.ctime = now;
        Ok(Applied { attr: Some(inode.attr.clone()), ..Applied::default() })
    }

    pub(super) fn alloc_block_ids(&mut self, count: u64) -> Result<Applied, MetaError> {
        if count == 0 || count > ALLOC_MAX {
            return Err(MetaError::Invalid("block id count outside 1..=2^20"));
        }
        let first = self.next_block_id;
        self.next_block_id = first.checked_add(count).ok_or(MetaError::Invalid("block ids exhausted"))?;
        Ok(Applied { first_block_id: Some(first), ..Applied::default() })
    }
}

impl MetaState {
    /// Concat: the sources' extents move to the end of `dst` (each source starts at the
    /// previous end, so holes and sizes are kept); the sources' inodes and entries go. No
    /// block changes hands outside the move, so no reference count changes and nothing is freed.
    pub(super) fn concat(&mut self, dst: Ino, srcs: &[Ino], now: Nanos) -> Result<Applied, MetaError> {
        let d = self.inodes.get(&dst).ok_or(MetaError::NoInode(dst))?;
        match d.attr.kind {
            InodeKind::File => {}
            InodeKind::Dir => return Err(MetaError::IsDir(dst)),
            InodeKind::Symlink => return Err(MetaError::Invalid("cannot concat into a symlink")),
        }
        if srcs.is_empty() {
            return Err(MetaError::Invalid("concat without sources"));
        }
        let mut seen = BTreeSet::new();
        let mut end = d.attr.size;
        // Parent dir -> sources it holds, to find every source's entry in one pass per parent.
        let mut by_parent: BTreeMap<Ino, BTreeSet<Ino>> = BTreeMap::new();
        for &src in srcs {
            let inode = self.inodes.get(&src).ok_or(MetaError::NoInode(src))?;
            match inode.attr.kind {
                InodeKind::File => {}
                InodeKind::Dir => return Err(MetaError::IsDir(src)),
                InodeKind::Symlink => return Err(MetaError::Invalid("cannot concat a symlink")),
            }
            if src == dst || !seen.insert(src) {
                return Err(MetaError::Invalid("concat sources must be distinct and differ from the destination"));
            }
            end = match end.checked_add(inode.attr.size) {
                Some(e) if e <= MAX_FILE_SIZE => e,
                _ => return Err(MetaError::Invalid("concat ends beyond 2^63")),
            };
            by_parent.entry(inode.attr.parent).or_default().insert(src);
        }
        let mut names: Vec<(Ino, Vec<u8>)> = Vec::with_capacity(srcs.len());
        for (parent, inos) in &by_parent {
            let entries = self.dir_entries(*parent)?;
            let found: Vec<(Ino, Vec<u8>)> =
                entries.iter().filter(|(_, i)| inos.contains(i)).map(|(n, _)| (*parent, n.clone())).collect();
            if found.len() != inos.len() {
                return Err(MetaError::Invalid("concat source without its directory entry"));
            }
            names.extend(found);
        }
        // Validation done: mutate.
        let mut base = self.inode_ref(dst).attr.size;
        let mut moved: Vec<(u64, Extent)> = Vec::new();
        for src in srcs {
            let inode = self.inodes.remove(src).expect("source validated to exist");
            moved.extend(inode.extents.iter().map(|(off, e)| (base + off, *e)));
            base += inode.attr.size;
        }
        for (parent, name) in &names {
            if let Some(e) = self.entries.get_mut(parent) {
                e.remove(name);
            }
        }
        for parent in by_parent.keys() {
            self.touch_dir(*parent, now);
        }
        let inode = self.inode_mut(dst);
        inode.extents.extend(moved);
        inode.attr.size = end;
        inode.attr.mtime = now;
        inode.attr.ctime = now;
        Ok(Applied { attr: Some(inode.attr.clone()), ..Applied::default() })
    }
}

/// Checks every entry of a whole user-metadata map (ReplaceXattrs, Publish).
pub(super) fn check_xattrs(xattrs: &BTreeMap<String, String>) -> Result<(), MetaError> {
    xattrs.iter().try_for_each(|(k, v)| check_xattr(k, v))
}

fn check_xattr(key: &str, value: &str) -> Result<(), MetaError> {
    if key.is_empty() {
        return Err(MetaError::Invalid("empty user metadata key"));
    }
    if key.len() > XATTR_KEY_MAX {
        return Err(MetaError::Invalid("user metadata key longer than 1024 bytes"));
    }
    if value.len() > XATTR_VALUE_MAX {
        return Err(MetaError::Invalid("user metadata value longer than 64 KiB"));
    }
    Ok(())
}

/// Removes the bytes `[start, end)` from `extents`: extents inside go, extents across an
/// edge are trimmed, an extent across both edges is split in two (its block gains a
/// reference). Blocks whose count drops to zero leave `blocks` and are pushed on `freed`.
pub(super) fn punch(
    extents: &mut BTreeMap<u64, Extent>,
    blocks: &mut BTreeMap<BlockId, BlockMeta>,
    start: u64,
    end: u64,
    freed: &mut Vec<BlockId>,
) {
    if start >= end {
        return;
    }
    // Extents are sorted and disjoint, so their ends are sorted too: walking back from
    // `end`, the overlapping ones come first and the first that ends by `start` stops us.
    let hit: Vec<(u64, Extent)> =
        extents.range(..end).rev().take_while(|(off, e)| *off + e.len > start).map(|(off, e)| (*off, *e)).collect();
    for (off, e) in hit {
        extents.remove(&off);
        let ext_end = off + e.len;
        if off < start {
            extents.insert(off, Extent { len: start - off, ..e });
            add_ref(blocks, e.block);
        }
        if ext_end > end {
            // end - off < e.len and block_offset + e.len <= block len (a u32): fits in u32.
            let skip = u32::try_from(end - off).expect("skip within a u32-sized block");
            extents.insert(end, Extent { len: ext_end - end, block: e.block, block_offset: e.block_offset + skip });
            add_ref(blocks, e.block);
        }
        unref_block(blocks, e.block, freed);
    }
}

/// Lays checked new `blocks` end to end from `offset` into `extents` (a range already
/// punched clear) and enters them in the block table, dirty, with one reference each.
/// Returns their total length (new dirty bytes).
pub(super) fn lay_blocks(
    extents: &mut BTreeMap<u64, Extent>,
    blocks: &mut BTreeMap<BlockId, BlockMeta>,
    offset: u64,
    new: &[NewBlock],
    now: Nanos,
) -> u64 {
    let mut at = offset;
    for b in new {
        extents.insert(at, Extent { len: u64::from(b.len), block: b.id, block_offset: 0 });
        blocks.insert(b.id, BlockMeta { len: b.len, state: BlockState::Dirty, refs: 1, written: now });
        at += u64::from(b.len);
    }
    at - offset
}

fn add_ref(blocks: &mut BTreeMap<BlockId, BlockMeta>, id: BlockId) {
    if let Some(b) = blocks.get_mut(&id) {
        b.refs += 1;
    }
}

/// Drops one reference to `id`; at zero the block goes on `freed` (it stays in the table at
/// zero references until `MetaState::apply` drops it with its accounting, once the command
/// has succeeded).
pub(super) fn unref_block(blocks: &mut BTreeMap<BlockId, BlockMeta>, id: BlockId, freed: &mut Vec<BlockId>) {
    if let Some(b) = blocks.get_mut(&id) {
        b.refs = b.refs.saturating_sub(1);
        if b.refs == 0 {
            freed.push(id);
        }
    }
}
