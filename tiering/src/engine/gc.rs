//! Garbage collection of the bucket: objects no block points into are deleted (then dropped
//! from the meta group); objects with dead bytes are rewritten, emptiest first, while more
//! than `gc_dead_ratio` of the bucket's bytes are dead; objects the meta group never recorded
//! (a crash between PUT and record) are swept.
//!
//! Order for a rewrite: the new object is put and recorded (`RecordTiered { from }` moves the
//! blocks), which empties the old one; only then is the old one deleted. A reader holding the
//! old locator finds the object gone and reads the locator again (`evict.rs`).

use futures_util::stream::{self, StreamExt};
use tidepool_cluster::meta::{BlockState, Command, MetaState};

use super::upload::{Pick, Planned};
use super::{Result, Tier, TierCounters};
use crate::format::{ObjectId, ObjectKind, TRAILER_LEN, decode_index, decode_trailer};

/// In a cluster, unrecorded objects younger than this are not swept (see `sweep_orphans`).
pub const SWEEP_MIN_AGE_MS: u64 = 15 * 60 * 1000;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    pub deleted_objects: u64,
    pub rewritten_objects: u64,
    pub orphans_deleted: u64,
    /// Bucket bytes (objects recorded) and the live bytes in them, after this pass.
    pub bucket_bytes: u64,
    pub live_bytes: u64,
}

fn kind_of(k: tidepool_cluster::meta::ObjectKind) -> ObjectKind {
    match k {
        tidepool_cluster::meta::ObjectKind::Chunk => ObjectKind::Chunk,
        tidepool_cluster::meta::ObjectKind::Pack => ObjectKind::Pack,
    }
}

/// (bucket bytes, live bytes) over the recorded objects.
fn totals(s: &MetaState) -> (u64, u64) {
    s.objects.values().fold((0, 0), |(b, l), o| (b + o.size_bytes, l + o.live_bytes))
}

impl Tier {
    /// One GC pass; `sweep` also lists the bucket for unrecorded objects.
    pub async fn gc(&self, sweep: bool) -> Result<GcReport> {
        let _gc = self.gc_lock.lock().await;
        let mut report = GcReport { rewritten_objects: self.rewrite_dead().await?, ..GcReport::default() };
        report.deleted_objects = self.delete_empty().await?;
        if sweep {
            report.orphans_deleted = self.sweep_orphans().await?;
        }
        (report.bucket_bytes, report.live_bytes) = self.fs()?.meta().read(totals);
        // The LRU map forgets blocks that left NVMe some other way (freed, released).
        super::lock(&self.access).retain(|id, _| self.store.contains(*id));
        Ok(report)
    }

    /// Deletes objects with no live block that no retained manifest points into, then forgets
    /// them. (An empty object a retained manifest keeps stays in the bucket until that manifest
    /// is deleted; `KeepObjects` is proposed under the GC lock this pass holds.)
    async fn delete_empty(&self) -> Result<u64> {
        let empty: Vec<(u128, ObjectKind)> = self.fs()?.meta().read(|s| {
            s.objects.iter().filter(|(_, o)| s.object_deletable(o)).map(|(id, o)| (*id, kind_of(o.kind))).collect()
        });
        if empty.is_empty() {
            return Ok(0);
        }
        let results: Vec<_> = stream::iter(empty.iter().copied())
            .map(|(id, kind)| async move { self.objects.delete(&ObjectId(id).key(kind)).await.map(|_| id) })
            .buffer_unordered(8)
            .collect()
            .await;
        let mut gone = Vec::new();
        for r in results {
            match r {
                Ok(id) => gone.push(id),
                Err(e) => tracing::warn!(error = %e, "gc: cannot delete an empty object; next pass"),
            }
        }
        let n = gone.len() as u64;
        if !gone.is_empty() {
            let fs = self.fs()?;
            fs.meta()
                .propose(Command::DropObjects { objects: gone })
                .await
                .map_err(tidepool_fs::FsError::from)?
                .map_err(tidepool_fs::FsError::from)?;
        }
        TierCounters::add(&self.counters.gc_deleted_objects, n);
        Ok(n)
    }

    /// Rewrites partly dead objects, emptiest first, while the bucket's dead share is above
    /// `gc_dead_ratio`. Returns objects rewritten.
    async fn rewrite_dead(&self) -> Result<u64> {
        let (victims, mut dead, total) = self.fs()?.meta().read(|s| {
            let (total, live) = totals(s);
            let mut v: Vec<(u128, ObjectKind, u64, u64)> = s
                .objects
                .iter()
                .filter(|(_, o)| o.live_blocks > 0 && o.live_bytes < o.size_bytes)
                .map(|(id, o)| (*id, kind_of(o.kind), o.size_bytes, o.live_bytes))
                .collect();
            // Emptiest first: the least live bytes per object byte.
            v.sort_by(|a, b| (a.3 as u128 * b.2 as u128).cmp(&(b.3 as u128 * a.2 as u128)));
            (v, total - live, total)
        });
        let limit = (total as f64 * self.cfg.gc_dead_ratio) as u64;
        let mut n = 0;
        for (id, kind, size, live) in victims {
            if dead <= limit || self.stopping() {
                break;
            }
            // A nearly full object is not worth a rewrite (the footer alone is dead bytes).
            if (size - live) * 20 < size {
                continue;
            }
            match self.rewrite(ObjectId(id), kind).await {
                Ok(()) => {
                    n += 1;
                    dead -= size - live;
                }
                Err(e) => {
                    tracing::warn!(object = %ObjectId(id), error = %e, "gc: rewrite failed; next pass");
                    break;
                }
            }
        }
        TierCounters::add(&self.counters.gc_rewritten_objects, n);
        Ok(n)
    }

    /// Copies the live blocks of one object into a new one of the same kind and records the
    /// move. The old object's footer index gives each block's file and offset.
    async fn rewrite(&self, id: ObjectId, kind: ObjectKind) -> Result<()> {
        let key = id.key(kind);
        let info = self.objects.head(&key).await?.ok_or_else(|| crate::ObjectError::NotFound(key.clone()))?;
        let tail_from = info.size_bytes.saturating_sub(TRAILER_LEN as u64);
        let tail = self.objects.get(&key, Some(tail_from..info.size_bytes)).await?;
        let trailer = decode_trailer(&tail)?;
        let index = self.objects.get(&key, Some(trailer.index_range())).await?;
        let entries = decode_index(&trailer, &index)?;
        let blocks: Vec<Pick> = self.fs()?.meta().read(|s| {
            entries
                .iter()
                .filter(|e| {
                    matches!(s.blocks.get(&e.block).map(|b| &b.state), Some(BlockState::Tiered(l)) if l.object == id.0)
                })
                .map(|e| Pick { id: e.block, len: e.len, ino: e.ino, file_offset: e.file_offset })
                .collect()
        });
        self.upload_object(Planned { kind, blocks }, Some(id)).await?;
        Ok(())
    }

    /// Deletes bucket objects the meta group does not know (and no upload has in flight; in a
    /// cluster, and made in the last [`SWEEP_MIN_AGE_MS`]).
    async fn sweep_orphans(&self) -> Result<u64> {
        let mut n = 0;
        let cluster = self.fs()?.meta().status().voters.len() > 1;
        let now_ms =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
        for dir in [ObjectKind::Chunk, ObjectKind::Pack] {
            let mut next = None;
            loop {
                let page = self.objects.list(&format!("{}/", dir.dir()), next.take(), 1000).await?;
                for obj in &page.objects {
                    let Some((kind, id)) = ObjectId::parse_key(&obj.key) else { continue };
                    // In flight first, then the table: an upload records before it leaves
                    // the in-flight set, so one of the two sees it.
                    if super::lock(&self.inflight).contains(&id) {
                        continue;
                    }
                    if self.fs()?.meta().read(|s| s.objects.contains_key(&id.0)) {
                        continue;
                    }
                    // In a cluster the in-flight set is this node's only: a deposed leader may
                    // still be recording an object it uploaded. Only objects older than any
                    // such upload can be (its record fails after `propose_timeout`).
                    if cluster && now_ms.saturating_sub(id.created_unix_ms()) < SWEEP_MIN_AGE_MS {
                        continue;
                    }
                    self.objects.delete(&id.key(kind)).await?;
                    n += 1;
                }
                match page.next {
                    Some(t) => next = Some(t),
                    None => break,
                }
            }
        }
        TierCounters::add(&self.counters.gc_orphans_deleted, n);
        Ok(n)
    }
}
