//! Commands of the cold tier: RecordTiered (blocks now live in a bucket object), DropObjects
//! (GC forgot deleted objects), SetPin; and `drop_block`, the one place a freed block leaves
//! the table with its accounting (dirty bytes, its object's live bytes). Like `apply.rs`:
//! validate fully, then mutate.

use std::collections::BTreeSet;

use super::{
    Applied, BlockId, BlockState, Ino, MetaError, MetaState, Nanos, ObjectId, ObjectKind, ObjectLocator, ObjectMeta,
    TieredBlock,
};

impl MetaState {
    pub(super) fn record_tiered(
        &mut self,
        object: ObjectId,
        kind: ObjectKind,
        size_bytes: u64,
        blocks: &[TieredBlock],
        from: Option<ObjectId>,
        now: Nanos,
    ) -> Result<Applied, MetaError> {
        if self.objects.contains_key(&object) {
            return Err(MetaError::Invalid("object already recorded"));
        }
        let mut seen = BTreeSet::new();
        for b in blocks {
            if !seen.insert(b.id) {
                return Err(MetaError::Invalid("block listed twice in one object"));
            }
            match b.offset.checked_add(u64::from(b.len)) {
                Some(end) if end <= size_bytes && b.len > 0 => {}
                _ => return Err(MetaError::Invalid("tiered block outside its object")),
            }
        }
        // Validation done: mutate.
        let mut meta = ObjectMeta { kind, size_bytes, live_bytes: 0, live_blocks: 0, created: now, kept_epoch: None };
        let mut tiered = 0u32;
        for b in blocks {
            let Some(block) = self.blocks.get_mut(&b.id) else { continue };
            if block.len != b.len || block.refs == 0 {
                continue;
            }
            let takes = match (&block.state, from) {
                (BlockState::Dirty, None) => true,
                (BlockState::Tiered(loc), Some(old)) => loc.object == old,
                _ => false,
            };
            if !takes {
                continue;
            }
            let loc = ObjectLocator { object, offset: b.offset, len: b.len, crc: b.crc };
            match std::mem::replace(&mut block.state, BlockState::Tiered(loc)) {
                BlockState::Dirty => self.dirty_bytes -= u64::from(b.len),
                BlockState::Tiered(old) => release(&mut self.objects, old.object, b.len),
            }
            meta.live_bytes += u64::from(b.len);
            meta.live_blocks += 1;
            tiered += 1;
        }
        self.objects.insert(object, meta);
        Ok(Applied { tiered, ..Applied::default() })
    }

    pub(super) fn drop_objects(&mut self, objects: &[ObjectId]) -> Result<Applied, MetaError> {
        if objects.iter().any(|o| self.objects.get(o).is_some_and(|m| m.live_blocks > 0)) {
            return Err(MetaError::Invalid("object still has live blocks"));
        }
        if objects.iter().any(|o| self.objects.get(o).is_some_and(|m| !self.object_deletable(m))) {
            return Err(MetaError::Invalid("object kept by a retained manifest"));
        }
        for o in objects {
            self.objects.remove(o);
        }
        Ok(Applied::default())
    }

    pub(super) fn set_pin(&mut self, ino: Ino, pinned: bool) -> Result<Applied, MetaError> {
        let attr = self.inodes.get(&ino).ok_or(MetaError::NoInode(ino))?.attr.clone();
        if pinned {
            self.pins.insert(ino);
        } else {
            self.pins.remove(&ino);
        }
        Ok(Applied { attr: Some(attr), ..Applied::default() })
    }

    pub(super) fn keep_objects(
        &mut self,
        epoch: u64,
        oldest_retained: u64,
        objects: &[ObjectId],
    ) -> Result<Applied, MetaError> {
        if epoch <= self.manifest_epoch || oldest_retained > epoch || oldest_retained < self.manifest_oldest_retained {
            return Err(MetaError::Invalid("manifest epochs must grow"));
        }
        // The objects the manifest points into (ids no longer in the table are skipped).
        for id in objects {
            if let Some(o) = self.objects.get_mut(id) {
                o.kept_epoch = Some(epoch);
            }
        }
        self.manifest_epoch = epoch;
        self.manifest_oldest_retained = oldest_retained;
        Ok(Applied::default())
    }

    /// Removes a block whose last reference went (see `data::unref_block`).
    pub(super) fn drop_block(&mut self, id: BlockId) {
        let Some(block) = self.blocks.remove(&id) else { return };
        match block.state {
            BlockState::Dirty => self.dirty_bytes -= u64::from(block.len),
            BlockState::Tiered(loc) => release(&mut self.objects, loc.object, block.len),
        }
    }

    /// True if `ino` or one of its ancestors is pinned.
    pub fn is_pinned(&self, mut ino: Ino) -> bool {
        if self.pins.is_empty() {
            return false;
        }
        loop {
            if self.pins.contains(&ino) {
                return true;
            }
            match self.inodes.get(&ino) {
                Some(i) if i.attr.parent != ino => ino = i.attr.parent,
                _ => return false,
            }
        }
    }
}

/// One block of `len` bytes no longer points into `object`.
fn release(objects: &mut std::collections::BTreeMap<ObjectId, ObjectMeta>, object: ObjectId, len: u32) {
    if let Some(o) = objects.get_mut(&object) {
        o.live_bytes -= u64::from(len);
        o.live_blocks -= 1;
    }
}
