//! Eviction (clean blocks leave NVMe, least recently used first, pinned ones and those
//! inside `retain_for` stay) and read-through (a cold block comes back with one ranged GET of
//! just its bytes, is verified, and is cached on NVMe again); `tier fetch` / `tier release`.

use std::collections::HashSet;
use std::sync::Arc;

use futures_util::stream::{self, StreamExt};
use tidepool_cluster::meta::{BlockState, InodeKind, MetaState, ObjectLocator};
use tidepool_fs::TierError;

use super::{Result, Tier, TierCounters, TierEngineError, lock};
use crate::ObjectError;
use crate::format::{ObjectId, ObjectKind};

/// Blocks of the files at or below `ino` (each once).
pub(super) fn subtree_blocks(s: &MetaState, ino: u64) -> Vec<u64> {
    let mut out = Vec::new();
    let mut seen = HashSet::new();
    let mut stack = vec![ino];
    while let Some(i) = stack.pop() {
        let Some(inode) = s.inodes.get(&i) else { continue };
        match inode.attr.kind {
            InodeKind::Dir => stack.extend(s.entries.get(&i).into_iter().flat_map(|e| e.values().copied())),
            InodeKind::File => out.extend(inode.extents.values().map(|e| e.block).filter(|b| seen.insert(*b))),
            InodeKind::Symlink => {}
        }
    }
    out
}

impl Tier {
    /// The object key of a locator (its kind is in the object table).
    pub(super) fn key_of(&self, s: &MetaState, loc: &ObjectLocator) -> String {
        let kind = match s.objects.get(&loc.object).map(|o| o.kind) {
            Some(tidepool_cluster::meta::ObjectKind::Chunk) => ObjectKind::Chunk,
            _ => ObjectKind::Pack,
        };
        ObjectId(loc.object).key(kind)
    }

    /// A cold block's bytes: one fetch per block however many readers ask at once; cached on
    /// NVMe afterwards (best effort: a full device just serves from memory this time).
    pub(super) async fn fetch_block(&self, id: u64, loc: ObjectLocator) -> tidepool_fs::Result<Arc<Vec<u8>>> {
        let cell = lock(&self.fetching).entry(id).or_default().clone();
        let res = cell.get_or_try_init(|| self.fetch_block_once(id, loc)).await.cloned();
        let mut fetching = lock(&self.fetching);
        if fetching.get(&id).is_some_and(|c| Arc::ptr_eq(c, &cell)) {
            fetching.remove(&id);
        }
        res
    }

    async fn fetch_block_once(&self, id: u64, mut loc: ObjectLocator) -> tidepool_fs::Result<Arc<Vec<u8>>> {
        let fs = self.fs.upgrade().ok_or(tidepool_fs::FsError::Invalid("filesystem shut down"))?;
        let mut key = fs.meta().read(|s| self.key_of(s, &loc));
        drop(fs);
        let mut attempts = 0;
        let data = loop {
            let range = loc.offset..loc.offset + u64::from(loc.len);
            match self.objects.get(&key, Some(range)).await {
                Ok(data) => break data,
                // A GC rewrite may have moved the block to another object and deleted this
                // one between our reading the locator and the GET: read it again.
                Err(ObjectError::NotFound(_)) if attempts < 3 => {
                    attempts += 1;
                    let fs = self.fs.upgrade().ok_or(tidepool_fs::FsError::Invalid("filesystem shut down"))?;
                    let now = fs.meta().read(|s| match s.blocks.get(&id).map(|b| &b.state) {
                        Some(BlockState::Tiered(l)) => Some((*l, self.key_of(s, l))),
                        _ => None,
                    });
                    match now {
                        Some((l, k)) if l != loc => (loc, key) = (l, k),
                        _ => {
                            return Err(TierError::Fetch {
                                block: id,
                                reason: format!("object {key} is missing from the object store"),
                                retryable: false,
                            }
                            .into());
                        }
                    }
                }
                Err(e) => {
                    return Err(
                        TierError::Fetch { block: id, reason: e.to_string(), retryable: e.is_retryable() }.into()
                    );
                }
            }
        };
        let actual = crc32c::crc32c(&data);
        if data.len() != loc.len as usize || actual != loc.crc {
            return Err(TierError::Checksum { block: id, expected: loc.crc, actual }.into());
        }
        TierCounters::add(&self.counters.read_through_blocks, 1);
        TierCounters::add(&self.counters.read_through_bytes, data.len() as u64);
        self.cache(id, &data).await;
        Ok(Arc::new(data.to_vec()))
    }

    /// Puts a fetched block back on NVMe. If the block was freed meanwhile, the copy goes again.
    pub(super) async fn cache(&self, id: u64, data: &[u8]) {
        let mut res = self.store.put(id, data).await;
        if let Err(tidepool_spdk::StoreError::NoSpace { .. }) = res
            && self.evict_bytes(2 * data.len() as u64).await.unwrap_or(0) > 0
        {
            res = self.store.put(id, data).await;
        }
        match res {
            Ok(()) | Err(tidepool_spdk::StoreError::Exists(_)) => {}
            Err(e) => {
                tracing::debug!(block_id = id, error = %e, "read-through: not cached on NVMe");
                return;
            }
        }
        self.touch_ids(&[id]);
        let still = self.fs.upgrade().is_some_and(|fs| fs.meta().read(|s| s.blocks.contains_key(&id)));
        if !still {
            let _ = self.store.delete(id).await;
        }
    }

    /// Evicts down to `evict_low` if the device is above `evict_high`.
    pub(super) async fn evict_if_needed(&self) -> Result<u64> {
        let st = self.store.stats();
        let high = (st.capacity_bytes as f64 * self.cfg.evict_high) as u64;
        if st.live_bytes <= high {
            return Ok(0);
        }
        let low = (st.capacity_bytes as f64 * self.cfg.evict_low) as u64;
        self.evict_bytes(st.live_bytes - low).await
    }

    /// Evicts clean blocks, least recently used first, until `bytes` are gone (or none is
    /// left to evict). Pinned blocks and blocks inside `retain_for` stay. Returns bytes evicted.
    pub(super) async fn evict_bytes(&self, bytes: u64) -> Result<u64> {
        let fs = self.fs()?;
        let now = self.now();
        let retain = self.cfg.retain_for.map(|d| i64::try_from(d.as_nanos()).unwrap_or(i64::MAX));
        let resident: HashSet<u64> = self.store.ids().into_iter().collect();
        let mut candidates: Vec<(u64, u32)> = fs.meta().read(|s| {
            let pinned: HashSet<u64> = s.pins.iter().flat_map(|p| subtree_blocks(s, *p)).collect();
            resident
                .iter()
                .filter_map(|id| {
                    let b = s.blocks.get(id)?;
                    let BlockState::Tiered(loc) = &b.state else { return None };
                    if pinned.contains(id) {
                        return None;
                    }
                    if let (Some(r), Some(o)) = (retain, s.objects.get(&loc.object))
                        && now.saturating_sub(o.created) < r
                    {
                        return None;
                    }
                    Some((*id, b.len))
                })
                .collect()
        });
        drop(fs);
        {
            let access = lock(&self.access);
            candidates.sort_by_key(|(id, _)| (access.get(id).copied().unwrap_or(0), *id));
        }
        let mut evicted = 0u64;
        for (id, len) in candidates {
            if evicted >= bytes {
                break;
            }
            match self.store.delete(id).await {
                Ok(()) | Err(tidepool_spdk::StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            lock(&self.access).remove(&id);
            evicted += u64::from(len);
            TierCounters::add(&self.counters.evicted_blocks, 1);
            TierCounters::add(&self.counters.evicted_bytes, u64::from(len));
        }
        if evicted > 0 {
            self.store.flush().await?;
        }
        Ok(evicted)
    }

    /// `tidepool tier fetch PATH`: brings every cold block below `path` onto NVMe.
    /// Returns (blocks, bytes) fetched.
    pub async fn fetch_path(&self, path: &str) -> Result<(u64, u64)> {
        let fs = self.fs()?;
        let ino = fs.resolve(path.as_bytes())?.ino;
        let cold: Vec<(u64, ObjectLocator)> = fs.meta().read(|s| {
            subtree_blocks(s, ino)
                .into_iter()
                .filter(|id| !self.store.contains(*id))
                .filter_map(|id| match s.blocks.get(&id).map(|b| &b.state) {
                    Some(BlockState::Tiered(loc)) => Some((id, *loc)),
                    _ => None,
                })
                .collect()
        });
        drop(fs);
        let results: Vec<_> = stream::iter(cold)
            .map(|(id, loc)| async move { self.fetch_block(id, loc).await.map(|d| d.len() as u64) })
            .buffer_unordered(8)
            .collect()
            .await;
        let (mut blocks, mut bytes) = (0, 0);
        for r in results {
            bytes += r.map_err(TierEngineError::Fs)?;
            blocks += 1;
        }
        Ok((blocks, bytes))
    }

    /// `tidepool tier release PATH`: drops the NVMe copies of the clean blocks below `path`
    /// (dirty blocks stay: they are the only copy), and their pages in the RAM read cache, so
    /// the next read comes from the bucket as after a spin-down (an S3 PUT's blocks are in
    /// that cache as written). Returns (blocks, bytes) released.
    pub async fn release_path(&self, path: &str) -> Result<(u64, u64)> {
        let fs = self.fs()?;
        let ino = fs.resolve(path.as_bytes())?.ino;
        let clean: Vec<(u64, u32)> = fs.meta().read(|s| {
            subtree_blocks(s, ino)
                .into_iter()
                .filter(|id| self.store.contains(*id))
                .filter_map(|id| match s.blocks.get(&id) {
                    Some(b) if matches!(b.state, BlockState::Tiered(_)) => Some((id, b.len)),
                    _ => None,
                })
                .collect()
        });
        drop(fs);
        let (mut blocks, mut bytes) = (0, 0);
        for &(id, len) in &clean {
            match self.store.delete(id).await {
                Ok(()) | Err(tidepool_spdk::StoreError::NotFound(_)) => {}
                Err(e) => return Err(e.into()),
            }
            blocks += 1;
            bytes += u64::from(len);
        }
        if let Ok(fs) = self.fs() {
            for &(id, _) in &clean {
                fs.uncache(id);
            }
        }
        self.store.flush().await?;
        Ok((blocks, bytes))
    }

    /// `tidepool pin` / `unpin`.
    pub async fn set_pin(&self, path: &str, pinned: bool) -> Result<()> {
        let fs = self.fs()?;
        let ino = fs.resolve(path.as_bytes())?.ino;
        let cmd = tidepool_cluster::meta::Command::SetPin { ino, pinned };
        fs.meta().propose(cmd).await.map_err(tidepool_fs::FsError::from)?.map_err(tidepool_fs::FsError::from)?;
        Ok(())
    }
}
