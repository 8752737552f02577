//! `MetaState::check_invariants`: everything a correct sequence of applies keeps true.
//! Used by the property tests after every step and by snapshot restore.

use std::collections::BTreeMap;

use super::{BlockId, BlockState, Ino, Inode, InodeKind, MetaState, ROOT_INO};

impl MetaState {
    /// Checks the whole state; the error names the first broken invariant and the values.
    pub fn check_invariants(&self) -> Result<(), String> {
        self.check_extents()?;
        self.check_tree()?;
        self.check_counters()?;
        self.check_tier()?;
        self.check_access_keys()
    }

    /// Cold tier: every tiered block points into a known object with its own length; each
    /// object's live counts are the sums of the blocks pointing into it; `dirty_bytes` is the
    /// sum of the dirty blocks; pins name live inodes.
    fn check_tier(&self) -> Result<(), String> {
        let mut live: BTreeMap<super::ObjectId, (u64, u32)> = BTreeMap::new();
        let mut dirty = 0u64;
        for (id, block) in &self.blocks {
            match &block.state {
                BlockState::Dirty => dirty += u64::from(block.len),
                BlockState::Tiered(loc) => {
                    let Some(object) = self.objects.get(&loc.object) else {
                        return Err(format!("tiered block in unknown object block_id={id} object={:032x}", loc.object));
                    };
                    if loc.len != block.len || loc.offset + u64::from(loc.len) > object.size_bytes {
                        return Err(format!("tiered block locator wrong block_id={id} object={:032x}", loc.object));
                    }
                    let l = live.entry(loc.object).or_default();
                    l.0 += u64::from(block.len);
                    l.1 += 1;
                }
            }
        }
        if dirty != self.dirty_bytes {
            return Err(format!("dirty_bytes={} dirty blocks hold {dirty}", self.dirty_bytes));
        }
        for (o, meta) in &self.objects {
            let (bytes, blocks) = live.get(o).copied().unwrap_or_default();
            if (meta.live_bytes, meta.live_blocks) != (bytes, blocks) {
                return Err(format!(
                    "object live counts wrong object={o:032x} live_bytes={} live_blocks={} counted_bytes={bytes} counted_blocks={blocks}",
                    meta.live_bytes, meta.live_blocks
                ));
            }
        }
        if self.manifest_oldest_retained > self.manifest_epoch {
            return Err(format!(
                "manifest_oldest_retained={} above manifest_epoch={}",
                self.manifest_oldest_retained, self.manifest_epoch
            ));
        }
        if let Some(p) = self.pins.iter().find(|p| !self.inodes.contains_key(p)) {
            return Err(format!("pin of a missing inode ino={p}"));
        }
        Ok(())
    }

    /// Access keys: every stored key has the shape PutAccessKey admits.
    fn check_access_keys(&self) -> Result<(), String> {
        for (id, key) in &self.access_keys {
            super::keys::check_access_key(id, key).map_err(|e| format!("bad access key id={id:?}: {e}"))?;
        }
        Ok(())
    }

    /// Extents: disjoint, inside their block and the file size; block refs match; no block
    /// with zero refs.
    fn check_extents(&self) -> Result<(), String> {
        let mut refs: BTreeMap<BlockId, u64> = BTreeMap::new();
        for (ino, inode) in &self.inodes {
            if inode.attr.kind != InodeKind::File && !inode.extents.is_empty() {
                return Err(format!("non-file has extents ino={ino}"));
            }
            let mut prev_end = 0u64;
            for (&off, e) in &inode.extents {
                let Some(block) = self.blocks.get(&e.block) else {
                    return Err(format!("extent points at missing block ino={ino} off={off} block_id={}", e.block));
                };
                if e.len == 0 {
                    return Err(format!("empty extent ino={ino} off={off}"));
                }
                if off < prev_end {
                    return Err(format!("overlapping extents ino={ino} off={off} prev_end={prev_end}"));
                }
                if u64::from(e.block_offset) + e.len > u64::from(block.len) {
                    return Err(format!("extent outside its block ino={ino} off={off} block_id={}", e.block));
                }
                prev_end = off + e.len;
                if prev_end > inode.attr.size {
                    return Err(format!("extent past file size ino={ino} end={prev_end} size={}", inode.attr.size));
                }
                *refs.entry(e.block).or_default() += 1;
            }
        }
        for (id, block) in &self.blocks {
            let counted = refs.get(id).copied().unwrap_or(0);
            if block.refs == 0 || u64::from(block.refs) != counted {
                return Err(format!("block refs wrong block_id={id} refs={} extents={counted}", block.refs));
            }
        }
        Ok(())
    }

    /// Namespace: entries point at live inodes whose parent is the dir; every inode but the
    /// root is reached from exactly one entry, from the root (no orphans, no cycles); dir
    /// nlink and size match.
    fn check_tree(&self) -> Result<(), String> {
        let root = self.inodes.get(&ROOT_INO).ok_or("root inode missing")?;
        if root.attr.kind != InodeKind::Dir || root.attr.parent != ROOT_INO {
            return Err("root is not a dir that is its own parent".into());
        }
        let mut seen: BTreeMap<Ino, u32> = BTreeMap::new();
        let mut stack = vec![ROOT_INO];
        while let Some(dir) = stack.pop() {
            let Some(entries) = self.entries.get(&dir) else {
                return Err(format!("dir without entries map ino={dir}"));
            };
            let dir_inode = &self.inodes[&dir]; // pushed only after checking it exists
            let mut subdirs = 0u32;
            for (name, child) in entries {
                let Some(inode) = self.inodes.get(child) else {
                    return Err(format!("entry points at missing inode dir={dir} name={name:?} ino={child}"));
                };
                check_child(dir, name, *child, inode)?;
                let n = seen.entry(*child).or_default();
                *n += 1;
                if *n > 1 || *child == ROOT_INO {
                    return Err(format!("inode reached twice ino={child}"));
                }
                if inode.attr.kind == InodeKind::Dir {
                    subdirs += 1;
                    stack.push(*child);
                }
            }
            if dir_inode.attr.nlink != 2 + subdirs || dir_inode.attr.size != entries.len() as u64 {
                return Err(format!(
                    "dir counts wrong ino={dir} nlink={} subdirs={subdirs} size={} entries={}",
                    dir_inode.attr.nlink,
                    dir_inode.attr.size,
                    entries.len()
                ));
            }
        }
        if let Some(orphan) = self.inodes.keys().find(|i| **i != ROOT_INO && !seen.contains_key(i)) {
            return Err(format!("orphan inode ino={orphan}"));
        }
        let dirs = self.inodes.values().filter(|i| i.attr.kind == InodeKind::Dir).count();
        if self.entries.len() != dirs {
            return Err(format!("entries maps={} dirs={dirs}", self.entries.len()));
        }
        Ok(())
    }

    fn check_counters(&self) -> Result<(), String> {
        if let Some((&max, _)) = self.inodes.last_key_value()
            && self.next_ino <= max
        {
            return Err(format!("next_ino={} max_ino={max}", self.next_ino));
        }
        if let Some((&max, _)) = self.blocks.last_key_value()
            && self.next_block_id <= max
        {
            return Err(format!("next_block_id={} max_block_id={max}", self.next_block_id));
        }
        if self.blocks.contains_key(&0) {
            return Err("block id 0 in the table".into());
        }
        Ok(())
    }
}

fn check_child(dir: Ino, name: &[u8], ino: Ino, inode: &Inode) -> Result<(), String> {
    let a = &inode.attr;
    if a.ino != ino {
        return Err(format!("attr.ino={} differs from its key ino={ino}", a.ino));
    }
    if a.parent != dir {
        return Err(format!("parent pointer wrong dir={dir} name={name:?} ino={} parent={}", a.ino, a.parent));
    }
    if a.kind != InodeKind::Dir && a.nlink != 1 {
        return Err(format!("non-dir nlink={} ino={}", a.nlink, a.ino));
    }
    if a.kind == InodeKind::Symlink && a.size != inode.target.len() as u64 {
        return Err(format!("symlink size={} target_len={} ino={}", a.size, inode.target.len(), a.ino));
    }
    Ok(())
}
