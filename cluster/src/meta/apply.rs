//! `MetaState::apply`: one function per command. Every command first bumps `applied` (the
//! generation of a created inode), then validates completely, and only then mutates: a
//! failed command changes nothing but `applied`. This file holds the namespace commands
//! (create, publish, rename, unlink, rmdir); file contents, attributes, user metadata and the block
//! table are in `data.rs`.

use std::collections::BTreeMap;

use super::{
    Applied, Attr, Command, Ino, Inode, InodeKind, MetaError, MetaState, NAME_MAX, Nanos, NewKind, NodeInfo, ROOT_INO,
};

/// Longest symlink target, in bytes (PATH_MAX).
pub const SYMLINK_MAX: usize = 4096;

impl Default for MetaState {
    fn default() -> Self {
        Self::new()
    }
}

/// Fields of a `Command::Create`, gathered so `create` stays readable.
struct CreateArgs<'a> {
    parent: Ino,
    name: &'a [u8],
    kind: &'a NewKind,
    mode: u32,
    uid: u32,
    gid: u32,
    now: Nanos,
}

/// Fields of a `Command::Publish`.
struct PublishArgs<'a> {
    parent: Ino,
    name: &'a [u8],
    blocks: &'a [super::NewBlock],
    xattrs: &'a BTreeMap<String, String>,
    mode: u32,
    uid: u32,
    gid: u32,
    now: Nanos,
}

/// The attributes of a new inode; `link_new` fills in ino, generation and parent.
fn fresh_attr(kind: InodeKind, mode: u32, uid: u32, gid: u32, size: u64, nlink: u32, now: Nanos) -> Attr {
    Attr {
        ino: 0,
        generation: 0,
        kind,
        mode: mode & 0o7777,
        uid,
        gid,
        size,
        nlink,
        parent: 0,
        atime: now,
        mtime: now,
        ctime: now,
    }
}

impl MetaState {
    /// An empty namespace: just the root directory (ino 1, mode 0o755, owned by root).
    pub fn new() -> Self {
        let root = Inode {
            attr: Attr {
                ino: ROOT_INO,
                generation: 0,
                kind: InodeKind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                size: 0,
                nlink: 2,
                parent: ROOT_INO,
                atime: 0,
                mtime: 0,
                ctime: 0,
            },
            xattrs: BTreeMap::new(),
            extents: BTreeMap::new(),
            target: Vec::new(),
        };
        MetaState {
            inodes: BTreeMap::from([(ROOT_INO, root)]),
            entries: BTreeMap::from([(ROOT_INO, BTreeMap::new())]),
            blocks: BTreeMap::new(),
            next_ino: ROOT_INO + 1,
            next_block_id: 1,
            applied: 0,
            access_keys: BTreeMap::new(),
            objects: BTreeMap::new(),
            pins: std::collections::BTreeSet::new(),
            dirty_bytes: 0,
            manifest_epoch: 0,
            manifest_oldest_retained: 0,
            nodes: BTreeMap::new(),
            frozen: false,
        }
    }

    /// Applies one command. `applied` grows by one whether or not it succeeds; on error
    /// nothing else changes.
    pub fn apply(&mut self, cmd: &Command) -> Result<Applied, MetaError> {
        self.applied += 1;
        let applied = self.apply_one(cmd)?;
        // Blocks whose last reference went were left in the table at zero references: drop
        // them now, with their share of the dirty bytes and of their object's live bytes.
        for id in &applied.freed {
            self.drop_block(*id);
        }
        if !self.pins.is_empty() {
            let inodes = &self.inodes;
            self.pins.retain(|i| inodes.contains_key(i));
        }
        Ok(applied)
    }

    fn apply_one(&mut self, cmd: &Command) -> Result<Applied, MetaError> {
        match cmd {
            Command::Create { parent, name, kind, mode, uid, gid, now } => {
                self.create(CreateArgs { parent: *parent, name, kind, mode: *mode, uid: *uid, gid: *gid, now: *now })
            }
            Command::SetAttr { ino, mode, uid, gid, size, atime, mtime, now } => self.set_attr(
                *ino,
                super::data::AttrChange {
                    mode: *mode,
                    uid: *uid,
                    gid: *gid,
                    size: *size,
                    atime: *atime,
                    mtime: *mtime,
                    now: *now,
                },
            ),
            Command::Write { ino, offset, blocks, now } => self.write(*ino, *offset, blocks, *now),
            Command::Rename { src_parent, src_name, dst_parent, dst_name, now } => {
                self.rename(*src_parent, src_name, *dst_parent, dst_name, *now)
            }
            Command::Unlink { parent, name, now } => self.unlink(*parent, name, *now),
            Command::Rmdir { parent, name, now } => self.rmdir(*parent, name, *now),
            Command::SetXattr { ino, key, value, now } => self.set_xattr(*ino, key, value, *now),
            Command::RemoveXattr { ino, key, now } => self.remove_xattr(*ino, key, *now),
            Command::ReplaceXattrs { ino, xattrs, now } => self.replace_xattrs(*ino, xattrs, *now),
            Command::AllocBlockIds { count } => self.alloc_block_ids(*count),
            Command::RecordTiered { object, kind, size_bytes, blocks, from, now } => {
                self.record_tiered(*object, *kind, *size_bytes, blocks, *from, *now)
            }
            Command::DropObjects { objects } => self.drop_objects(objects),
            Command::SetPin { ino, pinned } => self.set_pin(*ino, *pinned),
            Command::KeepObjects { epoch, oldest_retained, objects } => {
                self.keep_objects(*epoch, *oldest_retained, objects)
            }
            Command::SetNode { id, info } => {
                // A node keeps the time it first joined.
                let joined = self.nodes.get(id).map_or(info.joined, |n| n.joined);
                self.nodes.insert(*id, NodeInfo { joined, ..info.clone() });
                Ok(Applied::default())
            }
            Command::DropNode { id } => {
                self.nodes.remove(id);
                Ok(Applied::default())
            }
            Command::SetFrozen { frozen } => {
                self.frozen = *frozen;
                Ok(Applied::default())
            }
            Command::Concat { dst, srcs, now } => self.concat(*dst, srcs, *now),
            Command::PutAccessKey { id, key } => self.put_access_key(id, key),
            Command::DeleteAccessKey { id } => self.delete_access_key(id),
            Command::Publish { parent, name, blocks, xattrs, mode, uid, gid, now } => self.publish(PublishArgs {
                parent: *parent,
                name,
                blocks,
                xattrs,
                mode: *mode,
                uid: *uid,
                gid: *gid,
                now: *now,
            }),
        }
    }

    fn create(&mut self, a: CreateArgs<'_>) -> Result<Applied, MetaError> {
        check_name(a.name)?;
        let parent_entries = self.dir_entries(a.parent)?;
        if parent_entries.contains_key(a.name) {
            return Err(MetaError::Exists { parent: a.parent, name: lossy(a.name) });
        }
        let (kind, size, nlink, target) = match a.kind {
            NewKind::File => (InodeKind::File, 0, 1, Vec::new()),
            NewKind::Dir => (InodeKind::Dir, 0, 2, Vec::new()),
            NewKind::Symlink { target } => {
                if target.is_empty() {
                    return Err(MetaError::Invalid("empty symlink target"));
                }
                if target.len() > SYMLINK_MAX {
                    return Err(MetaError::Invalid("symlink target longer than 4096 bytes"));
                }
                (InodeKind::Symlink, target.len() as u64, 1, target.clone())
            }
        };
        // Validation done: mutate.
        let attr = fresh_attr(kind, a.mode, a.uid, a.gid, size, nlink, a.now);
        let inode = Inode { attr, xattrs: BTreeMap::new(), extents: BTreeMap::new(), target };
        let attr = self.link_new(a.parent, a.name, inode, a.now);
        Ok(Applied { attr: Some(attr), ..Applied::default() })
    }

    /// Publish: a new file with exactly `blocks` and `xattrs` takes the name, replacing a file
    /// there (whose inode and blocks go, as under a rename over it).
    fn publish(&mut self, a: PublishArgs<'_>) -> Result<Applied, MetaError> {
        check_name(a.name)?;
        let existing = self.dir_entries(a.parent)?.get(a.name).copied();
        if let Some(old) = existing {
            match self.inode_ref(old).attr.kind {
                InodeKind::File => {}
                InodeKind::Dir => return Err(MetaError::IsDir(old)),
                InodeKind::Symlink => return Err(MetaError::Invalid("cannot publish over a symlink")),
            }
        }
        let size = if a.blocks.is_empty() { 0 } else { self.check_new_blocks(a.blocks)? };
        if size > super::MAX_FILE_SIZE {
            return Err(MetaError::Invalid("write ends beyond 2^63"));
        }
        super::data::check_xattrs(a.xattrs)?;
        // Validation done: mutate.
        let mut freed = Vec::new();
        if existing.is_some() {
            self.remove_child(a.parent, a.name, &mut freed);
        }
        let mut extents = BTreeMap::new();
        self.dirty_bytes += super::data::lay_blocks(&mut extents, &mut self.blocks, 0, a.blocks, a.now);
        let attr = fresh_attr(InodeKind::File, a.mode, a.uid, a.gid, size, 1, a.now);
        let inode = Inode { attr, xattrs: a.xattrs.clone(), extents, target: Vec::new() };
        let attr = self.link_new(a.parent, a.name, inode, a.now);
        freed.sort_unstable();
        Ok(Applied { attr: Some(attr), freed, ..Applied::default() })
    }

    /// Enters `inode` (attrs from [`fresh_attr`]) as the free, checked name `name` of dir
    /// `parent`: the next ino, this command's generation, parent counts and times.
    fn link_new(&mut self, parent: Ino, name: &[u8], mut inode: Inode, now: Nanos) -> Attr {
        let ino = self.next_ino;
        self.next_ino += 1;
        inode.attr.ino = ino;
        inode.attr.generation = self.applied;
        inode.attr.parent = parent;
        let attr = inode.attr.clone();
        self.inodes.insert(ino, inode);
        if attr.kind == InodeKind::Dir {
            self.entries.insert(ino, BTreeMap::new());
            self.inode_mut(parent).attr.nlink += 1;
        }
        self.entries_mut(parent).insert(name.to_vec(), ino);
        self.touch_dir(parent, now);
        attr
    }

    fn rename(
        &mut self,
        src_parent: Ino,
        src_name: &[u8],
        dst_parent: Ino,
        dst_name: &[u8],
        now: Nanos,
    ) -> Result<Applied, MetaError> {
        check_name(src_name)?;
        check_name(dst_name)?;
        let src_ino = *self
            .dir_entries(src_parent)?
            .get(src_name)
            .ok_or_else(|| MetaError::NoEntry { parent: src_parent, name: lossy(src_name) })?;
        let dst_ino = self.dir_entries(dst_parent)?.get(dst_name).copied();
        if dst_ino == Some(src_ino) {
            // POSIX: renaming a name onto another link of the same inode does nothing.
            return Ok(Applied { attr: Some(self.inode_ref(src_ino).attr.clone()), ..Applied::default() });
        }
        let src_is_dir = self.inode_ref(src_ino).attr.kind == InodeKind::Dir;
        if src_is_dir && self.is_in_subtree(dst_parent, src_ino) {
            return Err(MetaError::Invalid("cannot move a directory into its own subtree"));
        }
        if let Some(dst) = dst_ino {
            let dst_is_dir = self.inode_ref(dst).attr.kind == InodeKind::Dir;
            match (src_is_dir, dst_is_dir) {
                (true, false) => return Err(MetaError::NotDir(dst)),
                (false, true) => return Err(MetaError::IsDir(dst)),
                (true, true) if !self.entries_ref(dst).is_empty() => return Err(MetaError::NotEmpty(dst)),
                _ => {}
            }
        }
        // Validation done: mutate.
        let mut freed = Vec::new();
        if dst_ino.is_some() {
            self.remove_child(dst_parent, dst_name, &mut freed);
        }
        self.entries_mut(src_parent).remove(src_name);
        self.entries_mut(dst_parent).insert(dst_name.to_vec(), src_ino);
        if src_is_dir && src_parent != dst_parent {
            self.inode_mut(src_parent).attr.nlink -= 1;
            self.inode_mut(dst_parent).attr.nlink += 1;
        }
        let moved = self.inode_mut(src_ino);
        moved.attr.parent = dst_parent;
        moved.attr.ctime = now;
        let attr = moved.attr.clone();
        self.touch_dir(src_parent, now);
        self.touch_dir(dst_parent, now);
        freed.sort_unstable();
        Ok(Applied { attr: Some(attr), freed, ..Applied::default() })
    }

    fn unlink(&mut self, parent: Ino, name: &[u8], now: Nanos) -> Result<Applied, MetaError> {
        let child = self.existing_child(parent, name)?;
        if self.inode_ref(child).attr.kind == InodeKind::Dir {
            return Err(MetaError::IsDir(child));
        }
        let mut freed = Vec::new();
        self.remove_child(parent, name, &mut freed);
        self.touch_dir(parent, now);
        freed.sort_unstable();
        Ok(Applied { freed, ..Applied::default() })
    }

    fn rmdir(&mut self, parent: Ino, name: &[u8], now: Nanos) -> Result<Applied, MetaError> {
        // The root is never anybody's entry ("." and ".." are invalid names), so it cannot
        // be removed.
        let child = self.existing_child(parent, name)?;
        if self.inode_ref(child).attr.kind != InodeKind::Dir {
            return Err(MetaError::NotDir(child));
        }
        if !self.entries_ref(child).is_empty() {
            return Err(MetaError::NotEmpty(child));
        }
        let mut freed = Vec::new();
        self.remove_child(parent, name, &mut freed);
        self.touch_dir(parent, now);
        Ok(Applied::default())
    }

    /// The ino of entry `name` of dir `parent`, after checking the name and the parent.
    fn existing_child(&self, parent: Ino, name: &[u8]) -> Result<Ino, MetaError> {
        check_name(name)?;
        self.dir_entries(parent)?.get(name).copied().ok_or_else(|| MetaError::NoEntry { parent, name: lossy(name) })
    }

    /// Removes entry `name` of `parent` and its inode (an empty dir, a file or a symlink),
    /// pushing the blocks that lose their last reference onto `freed`. Does not touch the
    /// parent's times. Caller has validated that the entry exists and may go.
    fn remove_child(&mut self, parent: Ino, name: &[u8], freed: &mut Vec<super::BlockId>) {
        let Some(child) = self.entries_mut(parent).remove(name) else {
            return;
        };
        let Some(inode) = self.inodes.remove(&child) else {
            return;
        };
        if inode.attr.kind == InodeKind::Dir {
            self.entries.remove(&child);
            self.inode_mut(parent).attr.nlink -= 1;
        }
        for ext in inode.extents.values() {
            super::data::unref_block(&mut self.blocks, ext.block, freed);
        }
    }

    /// True if `ino` is `ancestor` or lies below it (walking parent pointers up to the root).
    fn is_in_subtree(&self, mut ino: Ino, ancestor: Ino) -> bool {
        loop {
            if ino == ancestor {
                return true;
            }
            match self.inodes.get(&ino) {
                Some(inode) if ino != ROOT_INO => ino = inode.attr.parent,
                _ => return false,
            }
        }
    }

    /// Sets a dir's size to its entry count and its mtime/ctime to `now`.
    pub(super) fn touch_dir(&mut self, dir: Ino, now: Nanos) {
        let count = self.entries.get(&dir).map_or(0, |e| e.len() as u64);
        let attr = &mut self.inode_mut(dir).attr;
        attr.size = count;
        attr.mtime = now;
        attr.ctime = now;
    }

    /// The entries of `dir`: `NoInode` if it does not exist, `NotDir` if it is not a dir.
    pub(super) fn dir_entries(&self, dir: Ino) -> Result<&BTreeMap<Vec<u8>, Ino>, MetaError> {
        let inode = self.inodes.get(&dir).ok_or(MetaError::NoInode(dir))?;
        if inode.attr.kind != InodeKind::Dir {
            return Err(MetaError::NotDir(dir));
        }
        self.entries.get(&dir).ok_or(MetaError::NoInode(dir))
    }

    /// Invariant: called only for an ino validated to exist in this command.
    pub(super) fn inode_ref(&self, ino: Ino) -> &Inode {
        self.inodes.get(&ino).expect("inode validated to exist")
    }

    /// Invariant: called only for an ino validated to exist in this command.
    pub(super) fn inode_mut(&mut self, ino: Ino) -> &mut Inode {
        self.inodes.get_mut(&ino).expect("inode validated to exist")
    }

    /// Invariant: called only for a dir validated to exist (every dir has an entries map).
    fn entries_ref(&self, dir: Ino) -> &BTreeMap<Vec<u8>, Ino> {
        self.entries.get(&dir).expect("dir validated to exist")
    }

    /// Invariant: called only for a dir validated to exist (every dir has an entries map).
    fn entries_mut(&mut self, dir: Ino) -> &mut BTreeMap<Vec<u8>, Ino> {
        self.entries.get_mut(&dir).expect("dir validated to exist")
    }
}

/// A directory entry name: not empty, ".", ".." and without `/` or NUL; at most NAME_MAX bytes.
pub(super) fn check_name(name: &[u8]) -> Result<(), MetaError> {
    if name.is_empty() || name == b"." || name == b".." || name.iter().any(|&b| b == b'/' || b == 0) {
        return Err(MetaError::InvalidName(lossy(name)));
    }
    if name.len() > NAME_MAX {
        return Err(MetaError::NameTooLong(name.len()));
    }
    Ok(())
}

pub(super) fn lossy(name: &[u8]) -> String {
    String::from_utf8_lossy(name).into_owned()
}
