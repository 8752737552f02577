//! Write-back: find the dirty blocks that are due, group them into objects (consecutive
//! blocks of one large file into chunk objects; blocks of small files into packs), upload the
//! objects in parallel, and record each in the meta group (`RecordTiered`).
//!
//! Crash safety: an object is recorded only after its PUT succeeded, and its blocks stay
//! `Dirty` until then; a crash between the two leaves an unreferenced object (GC sweeps it)
//! and dirty blocks (uploaded again). Metadata never points at an object that is not there.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures_util::stream::{self, StreamExt};
use tidepool_cluster::meta::{BlockState, Command, InodeKind, MetaState, TieredBlock};

use super::{Result, Tier, TierCounters, TierEngineError, lock};
use crate::format::{ObjectBuilder, ObjectId, ObjectKind};

/// What one upload round did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RoundReport {
    pub objects: u64,
    pub blocks: u64,
    pub bytes: u64,
    /// Dirty bytes left after the round.
    pub remaining_dirty_bytes: u64,
}

/// One object put and recorded.
#[derive(Debug, Clone)]
pub(super) struct Uploaded {
    pub id: ObjectId,
    pub kind: ObjectKind,
    /// Object size (0: nothing was left to upload, no object).
    pub size: u64,
    /// Where each block sits in it.
    pub entries: Vec<TieredBlock>,
    /// How many of them the meta group took (the others were freed or moved meanwhile).
    pub tiered: u32,
}

/// A block picked for upload, with where it sits in its file (the footer index records it).
#[derive(Debug, Clone, Copy)]
pub(super) struct Pick {
    pub id: u64,
    pub len: u32,
    pub ino: u64,
    pub file_offset: u64,
}

/// The blocks of one object to be.
#[derive(Debug, Clone)]
pub(super) struct Planned {
    pub kind: ObjectKind,
    pub blocks: Vec<Pick>,
}

pub(super) fn cluster_kind(kind: ObjectKind) -> tidepool_cluster::meta::ObjectKind {
    match kind {
        ObjectKind::Chunk => tidepool_cluster::meta::ObjectKind::Chunk,
        ObjectKind::Pack => tidepool_cluster::meta::ObjectKind::Pack,
    }
}

/// Groups due dirty blocks into objects: walks files in ino order, each file's extents in
/// offset order. `due(written)` says whether a block written then goes up now. At most about
/// `budget` data bytes are planned.
pub(super) fn plan(
    s: &MetaState,
    due: impl Fn(i64) -> bool,
    pack_threshold: u64,
    chunk_max: u64,
    pack_max: u64,
    budget: u64,
) -> Vec<Planned> {
    let mut out = Vec::new();
    let mut pack = Planned { kind: ObjectKind::Pack, blocks: Vec::new() };
    let mut pack_bytes = 0u64;
    let mut total = 0u64;
    let mut taken = HashSet::new();
    for (ino, inode) in &s.inodes {
        if inode.attr.kind != InodeKind::File || inode.extents.is_empty() {
            continue;
        }
        let large = inode.attr.size >= pack_threshold;
        let mut chunk = Planned { kind: ObjectKind::Chunk, blocks: Vec::new() };
        let mut chunk_bytes = 0u64;
        for (off, e) in &inode.extents {
            let Some(b) = s.blocks.get(&e.block) else { continue };
            if b.state != BlockState::Dirty || !due(b.written) || !taken.insert(e.block) {
                continue;
            }
            let pick = Pick { id: e.block, len: b.len, ino: *ino, file_offset: off - u64::from(e.block_offset) };
            let len = u64::from(b.len);
            total += len;
            if large {
                if chunk_bytes + len > chunk_max && !chunk.blocks.is_empty() {
                    out.push(std::mem::replace(&mut chunk, Planned { kind: ObjectKind::Chunk, blocks: Vec::new() }));
                    chunk_bytes = 0;
                }
                chunk.blocks.push(pick);
                chunk_bytes += len;
            } else {
                if pack_bytes + len > pack_max && !pack.blocks.is_empty() {
                    out.push(std::mem::replace(&mut pack, Planned { kind: ObjectKind::Pack, blocks: Vec::new() }));
                    pack_bytes = 0;
                }
                pack.blocks.push(pick);
                pack_bytes += len;
            }
            if total >= budget {
                break;
            }
        }
        if !chunk.blocks.is_empty() {
            out.push(chunk);
        }
        if total >= budget {
            break;
        }
    }
    if !pack.blocks.is_empty() {
        out.push(pack);
    }
    out
}

impl Tier {
    /// One round: plan what is due (everything if `force` or over the dirty high mark),
    /// upload it, record it.
    pub async fn upload_round(&self, force: bool) -> Result<RoundReport> {
        let _round = self.round.lock().await;
        let fs = self.fs()?;
        let now = self.now();
        let tier_after = i64::try_from(self.cfg.tier_after.as_nanos()).unwrap_or(i64::MAX);
        let (planned, dirty) = fs.meta().read(|s| {
            if s.dirty_bytes == 0 {
                return (Vec::new(), 0);
            }
            let pressed = force || s.dirty_bytes > self.cfg.dirty_high_bytes;
            let due = |written: i64| pressed || now.saturating_sub(written) >= tier_after;
            let c = &self.cfg;
            (
                plan(s, due, c.pack_threshold_bytes, c.chunk_object_bytes, c.pack_object_bytes, c.round_bytes),
                s.dirty_bytes,
            )
        });
        drop(fs);
        let mut report = RoundReport { remaining_dirty_bytes: dirty, ..RoundReport::default() };
        if planned.is_empty() {
            return Ok(report);
        }
        let results: Vec<Result<Uploaded>> = stream::iter(planned)
            .map(|p| self.upload_object(p, None))
            .buffer_unordered(self.cfg.upload_parallelism.max(1))
            .collect()
            .await;
        let mut first_err = None;
        for r in results {
            match r {
                Ok(up) => {
                    report.objects += u64::from(up.size > 0);
                    report.blocks += u64::from(up.tiered);
                    report.bytes += up.size;
                }
                Err(e) => {
                    TierCounters::add(&self.counters.upload_errors, 1);
                    first_err.get_or_insert(e);
                }
            }
        }
        match &first_err {
            None => *lock(&self.last_error) = None,
            Some(e) => *lock(&self.last_error) = Some(e.to_string()),
        }
        self.uploaded.notify_waiters();
        report.remaining_dirty_bytes = self.fs()?.meta().read(|s| s.dirty_bytes);
        match first_err {
            Some(e) if report.objects == 0 => Err(e),
            Some(e) => {
                tracing::warn!(error = %e, "tiering: some uploads failed; their blocks stay dirty");
                Ok(report)
            }
            None => Ok(report),
        }
    }

    /// Builds one object from `p`'s blocks (read from NVMe; blocks freed meanwhile are left
    /// out), uploads it and records it (`from`: the object a GC rewrite empties).
    pub(super) async fn upload_object(&self, p: Planned, from: Option<ObjectId>) -> Result<Uploaded> {
        let id = ObjectId::random();
        let mut builder = ObjectBuilder::new(p.kind, id);
        let reads = stream::iter(p.blocks.iter().copied())
            .map(|b| async move { (b, self.block_bytes(b.id, b.len, from).await) })
            .buffered(8);
        let mut reads = std::pin::pin!(reads);
        while let Some((b, data)) = reads.next().await {
            match data? {
                Some(data) => {
                    builder.add(b.id, b.ino, b.file_offset, &data);
                }
                None => continue, // freed since the plan
            }
        }
        if builder.is_empty() {
            return Ok(Uploaded { id, kind: p.kind, size: 0, entries: Vec::new(), tiered: 0 });
        }
        let entries: Vec<TieredBlock> = builder
            .entries()
            .iter()
            .map(|e| TieredBlock { id: e.block, offset: e.offset, len: e.len, crc: e.crc })
            .collect();
        let body = builder.finish();
        let size = body.len() as u64;
        let key = id.key(p.kind);
        lock(&self.inflight).insert(id);
        let res = async {
            self.objects.put(&key, body).await?;
            let cmd = Command::RecordTiered {
                object: id.0,
                kind: cluster_kind(p.kind),
                size_bytes: size,
                blocks: entries.clone(),
                from: from.map(|o| o.0),
                now: self.now(),
            };
            let fs = self.fs()?;
            let applied = fs.meta().propose(cmd).await.map_err(tidepool_fs::FsError::from)?;
            let applied = applied.map_err(tidepool_fs::FsError::from)?;
            Ok::<_, TierEngineError>(applied.tiered)
        }
        .await;
        lock(&self.inflight).remove(&id);
        let tiered = res?;
        let c = &self.counters;
        TierCounters::add(&c.uploaded_objects, 1);
        TierCounters::add(&c.uploaded_bytes, size);
        TierCounters::add(&c.uploaded_blocks, u64::from(tiered));
        Ok(Uploaded { id, kind: p.kind, size, entries, tiered })
    }

    /// The bytes of a block for an upload: from NVMe, or (a GC rewrite of a cold block) from
    /// the object `from` it is tiered in now. `None` if the block is gone.
    async fn block_bytes(&self, id: u64, len: u32, from: Option<ObjectId>) -> Result<Option<Vec<u8>>> {
        match self.store.get(id, 0, len).await {
            Ok(data) => Ok(Some(data)),
            Err(tidepool_spdk::StoreError::NotFound(_)) => {
                // In a cluster the leader uploads blocks other nodes hold.
                match self.fs()?.read_block_hot(id, 0, len).await {
                    Ok(data) => return Ok(Some(data)),
                    Err(tidepool_fs::FsError::Store(tidepool_spdk::StoreError::NotFound(_))) => {}
                    Err(e) => return Err(e.into()),
                }
                let Some(_) = from else { return Ok(None) };
                let loc = self.fs()?.meta().read(|s| match s.blocks.get(&id).map(|b| &b.state) {
                    Some(BlockState::Tiered(loc)) => Some(*loc),
                    _ => None,
                });
                match loc {
                    Some(loc) => Ok(Some(self.fetch_block(id, loc).await?.to_vec())),
                    None => Ok(None),
                }
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Dirty-limit admission (see `ColdTier::admit_write`).
    pub(super) async fn admit(&self, new_bytes: u64) -> tidepool_fs::Result<()> {
        let deadline = tokio::time::Instant::now() + self.cfg.dirty_wait;
        loop {
            let fs = self.fs.upgrade().ok_or(tidepool_fs::FsError::Invalid("filesystem shut down"))?;
            let dirty = fs.meta().read(|s| s.dirty_bytes);
            drop(fs);
            if dirty + new_bytes > self.cfg.dirty_high_bytes {
                self.wake.notify_one();
            }
            if dirty + new_bytes <= self.cfg.dirty_limit_bytes || dirty == 0 {
                return Ok(());
            }
            let failing = self.last_error();
            if failing.is_some() || tokio::time::Instant::now() >= deadline {
                TierCounters::add(&self.counters.dirty_refusals, 1);
                return Err(tidepool_fs::TierError::DirtyLimit {
                    dirty_bytes: dirty,
                    limit_bytes: self.cfg.dirty_limit_bytes,
                    last_error: failing.unwrap_or_else(|| "uploads are slower than writes".into()),
                }
                .into());
            }
            let _ = tokio::time::timeout(Duration::from_millis(200), self.uploaded.notified()).await;
        }
    }

    pub(super) fn stopping(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }
}
