//! Manifests from a running node: `write_manifest` (periodic snapshots, `tidepool snapshot`,
//! the last step of spin-down) and `spin_down` (read-only, every dirty block up, a manifest,
//! `LATEST` switched), with the progress `tidepool spin-down` shows.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use futures_util::stream::{self, StreamExt};
use tidepool_cluster::meta::{BlockState, Command, InodeKind, MetaState, ObjectLocator, ObjectMeta};

use super::upload::{Uploaded, cluster_kind, plan};
use super::{Result, Tier, TierEngineError, lock};
use crate::manifest;

/// What a manifest write did.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct ManifestReport {
    pub epoch: u64,
    pub key: String,
    pub parts: u64,
    pub files: u64,
    pub file_bytes: u64,
    pub objects: u64,
    pub object_bytes: u64,
    /// Dirty blocks uploaded for it (0 after a spin-down's flush).
    pub uploaded_bytes: u64,
    pub old_manifests_deleted: u64,
}

/// Progress of a spin-down, for `tidepool spin-down` and the metrics.
#[derive(Debug, Default)]
pub struct SpinDownProgress {
    pub running: AtomicBool,
    /// 0 idle, 1 flushing dirty blocks, 2 writing the manifest, 3 done, 4 failed.
    pub phase: AtomicU64,
    pub dirty_bytes_start: AtomicU64,
    pub dirty_files_start: AtomicU64,
    pub uploaded_bytes_start: AtomicU64,
    pub started: std::sync::Mutex<Option<Instant>>,
    pub result: std::sync::Mutex<Option<std::result::Result<ManifestReport, String>>>,
    /// A spin-down finished on this node: its cluster-wide write freeze is meant to stay.
    pub done_here: AtomicBool,
}

/// Files with at least one dirty block, and dirty bytes.
fn dirty_files(s: &MetaState) -> u64 {
    s.inodes
        .values()
        .filter(|i| {
            i.attr.kind == InodeKind::File
                && i.extents.values().any(|e| s.blocks.get(&e.block).is_some_and(|b| b.state == BlockState::Dirty))
        })
        .count() as u64
}

impl Tier {
    /// Writes a manifest of the current metadata and switches `LATEST` to it; manifests
    /// older than the `manifest_retain` newest are deleted. Dirty blocks are uploaded for it
    /// first (writers may go on meanwhile: the manifest is the state at one moment, with
    /// every block in the bucket).
    pub async fn write_manifest(&self, settings: BTreeMap<String, String>) -> Result<ManifestReport> {
        // GC deletes nothing between the moment the manifest is cut and KeepObjects.
        let _gc = self.gc_lock.lock().await;
        let fs = self.fs()?;
        let mut report = ManifestReport::default();
        let mut snap = None;
        for _ in 0..8 {
            let mut s = fs.meta().read(MetaState::clone);
            if s.dirty_bytes > 0 {
                report.uploaded_bytes += self.upload_into(&mut s).await?;
            }
            if s.dirty_bytes == 0 {
                snap = Some(s);
                break;
            }
            // A block was freed between the cut and its upload: cut again.
        }
        let Some(mut snap) = snap else {
            return Err(TierEngineError::Object(crate::ObjectError::Unavailable(
                "writes keep replacing blocks faster than a manifest can be cut; try again".into(),
            )));
        };
        let epoch = snap.manifest_epoch.max(fs.meta().read(|s| s.manifest_epoch)) + 1;
        let oldest = epoch.saturating_sub(self.cfg.manifest_retain.max(1) - 1).max(1);
        // The objects the manifest points into: those with live blocks in the cut. An object
        // empty in the cut is not needed by this manifest (an older retained one may still keep
        // it); naming it would keep it from GC for as long as manifests are written.
        let objects: Vec<u128> = snap.objects.iter().filter(|(_, o)| o.live_blocks > 0).map(|(id, _)| *id).collect();
        fs.meta()
            .propose(Command::KeepObjects { epoch, oldest_retained: oldest, objects })
            .await
            .map_err(tidepool_fs::FsError::from)?
            .map_err(tidepool_fs::FsError::from)?;
        drop(_gc);
        snap.manifest_epoch = epoch;
        snap.manifest_oldest_retained = oldest;
        for o in snap.objects.values_mut().filter(|o| o.live_blocks > 0) {
            o.kept_epoch = Some(epoch);
        }
        let heat = self.heat(&snap);
        drop(fs);
        let root = manifest::write_state(
            self.objects.clone(),
            epoch,
            &snap,
            &heat,
            settings,
            self.cfg.manifest_part_bytes,
            self.now(),
        )
        .await
        .map_err(|e| TierEngineError::Manifest(e.to_string()))?;
        manifest::switch_latest(&self.objects, epoch).await.map_err(|e| TierEngineError::Manifest(e.to_string()))?;
        report.old_manifests_deleted = manifest::delete_older_than(&self.objects, oldest)
            .await
            .map_err(|e| TierEngineError::Manifest(e.to_string()))?;
        report.epoch = epoch;
        report.key = manifest::root_key(epoch);
        report.parts = root.parts.len() as u64;
        report.files = root.summary.files;
        report.file_bytes = root.summary.file_bytes;
        report.objects = root.summary.objects;
        report.object_bytes = root.summary.object_bytes;
        *lock(&self.last_manifest) = Some(std::time::Instant::now());
        tracing::info!(epoch, files = report.files, "manifest written; LATEST switched");
        Ok(report)
    }

    /// Uploads the dirty blocks of the cut `s` and records their locators in it. Returns the
    /// bytes uploaded.
    async fn upload_into(&self, s: &mut MetaState) -> Result<u64> {
        let _round = self.round.lock().await;
        let c = &self.cfg;
        let planned = plan(s, |_| true, c.pack_threshold_bytes, c.chunk_object_bytes, c.pack_object_bytes, u64::MAX);
        let ups: Vec<Result<Uploaded>> = stream::iter(planned)
            .map(|p| self.upload_object(p, None))
            .buffer_unordered(c.upload_parallelism.max(1))
            .collect()
            .await;
        let mut bytes = 0;
        let now = self.now();
        for up in ups {
            let up = up?;
            if up.size == 0 {
                continue;
            }
            bytes += up.size;
            let mut meta = ObjectMeta {
                kind: cluster_kind(up.kind),
                size_bytes: up.size,
                live_bytes: 0,
                live_blocks: 0,
                created: now,
                kept_epoch: None,
            };
            for e in &up.entries {
                if let Some(b) = s.blocks.get_mut(&e.id)
                    && b.state == BlockState::Dirty
                {
                    b.state =
                        BlockState::Tiered(ObjectLocator { object: up.id.0, offset: e.offset, len: e.len, crc: e.crc });
                    s.dirty_bytes -= u64::from(e.len);
                    meta.live_bytes += u64::from(e.len);
                    meta.live_blocks += 1;
                }
            }
            s.objects.insert(up.id.0, meta);
        }
        Ok(bytes)
    }

    /// Access heat per file: the most recent read of any of its blocks (a tick: only the order
    /// matters), for rehydrating hottest first.
    fn heat(&self, s: &MetaState) -> BTreeMap<u64, u64> {
        let access = lock(&self.access);
        s.inodes
            .iter()
            .filter_map(|(ino, i)| {
                let h = i.extents.values().filter_map(|e| access.get(&e.block).copied()).max()?;
                Some((*ino, h))
            })
            .collect()
    }

    pub fn spin_down_progress(&self) -> &SpinDownProgress {
        &self.spin
    }

    /// Spin-down: the filesystem goes read-only (for good: until the node restarts), every
    /// dirty block goes up, a manifest is written and `LATEST` switched. Safe to run again
    /// after a crash at any point.
    pub async fn spin_down(&self, settings: BTreeMap<String, String>) -> Result<ManifestReport> {
        let p = &self.spin;
        if p.running.swap(true, Ordering::SeqCst) {
            return Err(TierEngineError::Busy("a spin-down is already running"));
        }
        let res = async {
            let fs = self.fs()?;
            fs.set_read_only(true);
            // Every node of the cluster stops taking writes, not only this one.
            fs.freeze(true).await?;
            let (dirty, files) = fs.meta().read(|s| (s.dirty_bytes, dirty_files(s)));
            drop(fs);
            p.dirty_bytes_start.store(dirty, Ordering::SeqCst);
            p.dirty_files_start.store(files, Ordering::SeqCst);
            p.uploaded_bytes_start.store(self.counters.uploaded_bytes.load(Ordering::Relaxed), Ordering::SeqCst);
            *lock(&p.started) = Some(Instant::now());
            // Until LATEST is switched, the bucket says a spin-down is under way: a new node
            // started from it now would take the older LATEST and sweep the objects this one
            // is uploading (`up --from` refuses while the marker is there).
            let marker = format!(
                "spin-down started; the node finishes it with `tidepool spin-down`\nepoch-before {}\n",
                self.fs()?.meta().read(|s| s.manifest_epoch)
            );
            self.objects.put(crate::manifest::SPIN_DOWN_KEY, marker.into_bytes().into()).await?;
            p.phase.store(1, Ordering::SeqCst);
            self.flush_all().await?;
            p.phase.store(2, Ordering::SeqCst);
            let report = self.write_manifest(settings).await?;
            self.objects.delete(crate::manifest::SPIN_DOWN_KEY).await?;
            Ok::<_, TierEngineError>(report)
        }
        .await;
        if res.is_err()
            && let Ok(fs) = self.fs()
            && let Err(e) = fs.freeze(false).await
        {
            tracing::warn!(error = %e, "spin-down failed and the cluster-wide write freeze could not be lifted");
        }
        if res.is_ok() {
            p.done_here.store(true, Ordering::SeqCst);
        }
        p.phase.store(if res.is_ok() { 3 } else { 4 }, Ordering::SeqCst);
        *lock(&p.result) = Some(res.as_ref().map(Clone::clone).map_err(|e| e.to_string()));
        p.running.store(false, Ordering::SeqCst);
        res
    }

    /// Now: (dirty bytes, files with dirty blocks).
    pub fn dirty_now(&self) -> Result<(u64, u64)> {
        Ok(self.fs()?.meta().read(|s| (s.dirty_bytes, dirty_files(s))))
    }
}
