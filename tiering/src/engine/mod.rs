//! The tiering engine: write-back of dirty blocks into chunk and pack objects (`upload.rs`),
//! eviction of clean blocks and read-through of cold ones (`evict.rs`), garbage collection
//! of the bucket (`gc.rs`), and the per-path residency report (`status.rs`).
//!
//! `Tier` implements `tidepool_fs::ColdTier`, so the filesystem calls it for reads of blocks
//! that are not on NVMe, for LRU touches, for dirty-limit admission and for room on a full
//! device. It holds the filesystem weakly (the filesystem holds the tier), so shutting the
//! node down is: stop the tier's task, then the filesystem.
//!
//! Which blocks are where: the meta group says whether a block is `Dirty` (NVMe only) or
//! `Tiered` at a locator; the block store's index says whether this node also has it on NVMe
//! (clean) or not (cold). Eviction and read-through caching therefore cost no consensus round.

mod evict;
mod gc;
mod rehydrate;
mod snapshot;
mod status;
mod upload;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use tidepool_cluster::Clock;
use tidepool_fs::Fs;
use tidepool_spdk::BlockStore;

pub use gc::GcReport;
pub use rehydrate::{RehydrateMode, RehydrateProgress, RehydrateStatus};
pub use snapshot::{ManifestReport, SpinDownProgress};
pub use status::{PathStatus, TierStatus};
pub use upload::RoundReport;

use crate::ObjectStore;
use crate::format::ObjectId;

/// Settings of the tiering engine; defaults as DESIGN.md gives them.
#[derive(Debug, Clone)]
pub struct TierConfig {
    /// A dirty block is uploaded this long after it was written. Default 30 s.
    pub tier_after: Duration,
    /// A clean block is kept on NVMe at least this long after its upload; `None`: only
    /// space decides (the default).
    pub retain_for: Option<Duration>,
    /// Eviction starts above this fraction of the device (default 0.90) ...
    pub evict_high: f64,
    /// ... and stops at this one (default 0.80).
    pub evict_low: f64,
    /// Files at least this large go into chunk objects, smaller ones into packs. Default 1 MiB.
    pub pack_threshold_bytes: u64,
    /// Largest chunk object (data bytes). Default 64 MiB.
    pub chunk_object_bytes: u64,
    /// Largest pack object (data bytes). Default 64 MiB.
    pub pack_object_bytes: u64,
    /// Above this many dirty bytes blocks go up at once, not `tier_after` later.
    pub dirty_high_bytes: u64,
    /// Above this many dirty bytes writers wait for uploads, and get `DirtyLimit` if the
    /// object store is not taking them.
    pub dirty_limit_bytes: u64,
    /// How long a writer over the dirty limit waits for room while uploads succeed. Default 30 s.
    pub dirty_wait: Duration,
    /// Objects uploaded at once. Default 4.
    pub upload_parallelism: usize,
    /// Data bytes one upload round takes at most (bounds memory). Default 512 MiB.
    pub round_bytes: u64,
    /// Rewrite objects while more than this fraction of the bucket's bytes is dead. Default 0.10.
    pub gc_dead_ratio: f64,
    /// How often the engine wakes up to look for work. Default 1 s.
    pub interval: Duration,
    /// How often GC runs (delete empty objects, rewrite, sweep orphans). Default 60 s.
    pub gc_interval: Duration,
    /// A manifest is written this often while running (`None`: never). Default 15 min.
    pub snapshot_interval: Option<Duration>,
    /// Manifests kept (the newest ones; their objects are kept from GC). Default 3.
    pub manifest_retain: u64,
    /// Compressed bytes per manifest part. Default 64 MiB.
    pub manifest_part_bytes: usize,
    /// Blocks fetched at once by rehydration. Default 8.
    pub rehydrate_parallelism: usize,
}

impl TierConfig {
    /// Defaults for a device of `capacity_bytes`: the dirty marks at 25 % and 60 % of it.
    pub fn for_capacity(capacity_bytes: u64) -> Self {
        TierConfig {
            tier_after: Duration::from_secs(30),
            retain_for: None,
            evict_high: 0.90,
            evict_low: 0.80,
            pack_threshold_bytes: 1 << 20,
            chunk_object_bytes: 64 << 20,
            pack_object_bytes: 64 << 20,
            dirty_high_bytes: capacity_bytes / 4,
            dirty_limit_bytes: capacity_bytes / 10 * 6,
            dirty_wait: Duration::from_secs(30),
            upload_parallelism: 4,
            round_bytes: 512 << 20,
            gc_dead_ratio: 0.10,
            interval: Duration::from_secs(1),
            gc_interval: Duration::from_secs(60),
            snapshot_interval: Some(Duration::from_secs(15 * 60)),
            manifest_retain: 3,
            manifest_part_bytes: 64 << 20,
            rehydrate_parallelism: 8,
        }
    }
}

/// What went wrong in a tiering step.
#[derive(Debug, thiserror::Error)]
pub enum TierEngineError {
    #[error("object store: {0}")]
    Object(#[from] crate::ObjectError),
    #[error("filesystem: {0}")]
    Fs(#[from] tidepool_fs::FsError),
    #[error("block store: {0}")]
    Store(#[from] tidepool_spdk::StoreError),
    #[error("object format: {0}")]
    Format(#[from] crate::format::FormatError),
    #[error("the filesystem is shut down")]
    Stopped,
    #[error("manifest: {0}")]
    Manifest(String),
    #[error("{0}")]
    Busy(&'static str),
}

pub type Result<T, E = TierEngineError> = std::result::Result<T, E>;

/// Counters for /metrics and `tidepool tier status` (monotonic unless noted).
#[derive(Debug, Default)]
pub struct TierCounters {
    pub uploaded_objects: AtomicU64,
    pub uploaded_bytes: AtomicU64,
    pub uploaded_blocks: AtomicU64,
    pub upload_errors: AtomicU64,
    pub evicted_blocks: AtomicU64,
    pub evicted_bytes: AtomicU64,
    pub read_through_blocks: AtomicU64,
    pub read_through_bytes: AtomicU64,
    pub gc_deleted_objects: AtomicU64,
    pub gc_rewritten_objects: AtomicU64,
    pub gc_orphans_deleted: AtomicU64,
    pub dirty_refusals: AtomicU64,
}

impl TierCounters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    /// Name -> value, for /metrics.
    pub fn snapshot(&self) -> Vec<(&'static str, u64)> {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        vec![
            ("uploaded_objects", g(&self.uploaded_objects)),
            ("uploaded_bytes", g(&self.uploaded_bytes)),
            ("uploaded_blocks", g(&self.uploaded_blocks)),
            ("upload_errors", g(&self.upload_errors)),
            ("evicted_blocks", g(&self.evicted_blocks)),
            ("evicted_bytes", g(&self.evicted_bytes)),
            ("read_through_blocks", g(&self.read_through_blocks)),
            ("read_through_bytes", g(&self.read_through_bytes)),
            ("gc_deleted_objects", g(&self.gc_deleted_objects)),
            ("gc_rewritten_objects", g(&self.gc_rewritten_objects)),
            ("gc_orphans_deleted", g(&self.gc_orphans_deleted)),
            ("dirty_refusals", g(&self.dirty_refusals)),
        ]
    }
}

type Fetch = Arc<tokio::sync::OnceCell<Arc<Vec<u8>>>>;

pub struct Tier {
    fs: Weak<Fs>,
    store: Arc<BlockStore>,
    objects: Arc<dyn ObjectStore>,
    cfg: TierConfig,
    clock: Arc<dyn Clock>,
    counters: TierCounters,
    /// LRU: block -> tick of its last read (a counter, not a clock: only the order matters).
    access: Mutex<HashMap<u64, u64>>,
    tick: AtomicU64,
    /// Read-throughs in flight, one fetch per block however many readers wait for it.
    fetching: Mutex<HashMap<u64, Fetch>>,
    /// Objects being uploaded and not yet recorded: the orphan sweep must not delete them.
    inflight: Mutex<std::collections::HashSet<ObjectId>>,
    /// The last upload error, cleared by a successful upload (`None`: the store is healthy).
    last_error: Mutex<Option<String>>,
    /// Wakes the background loop (dirty pressure, a flush request).
    wake: tokio::sync::Notify,
    /// Signalled after every upload round, so waiting writers look again.
    uploaded: tokio::sync::Notify,
    /// Serialises upload rounds (the loop, `flush_all`).
    round: tokio::sync::Mutex<()>,
    /// Held by a GC pass, and by a manifest writer from its cut until `KeepObjects`.
    gc_lock: tokio::sync::Mutex<()>,
    stop: AtomicBool,
    spin: SpinDownProgress,
    rehydrate: Arc<RehydrateProgress>,
    last_manifest: Mutex<Option<std::time::Instant>>,
    /// Settings written into periodic manifests (set by the binary).
    manifest_settings: Mutex<std::collections::BTreeMap<String, String>>,
}

impl Tier {
    /// A tiering engine for `fs`, plugged into it as its cold tier.
    pub fn new(fs: &Arc<Fs>, objects: Arc<dyn ObjectStore>, cfg: TierConfig, clock: Arc<dyn Clock>) -> Arc<Tier> {
        let tier = Arc::new(Tier {
            fs: Arc::downgrade(fs),
            store: fs.store().clone(),
            objects,
            cfg,
            clock,
            counters: TierCounters::default(),
            access: Mutex::new(HashMap::new()),
            tick: AtomicU64::new(1),
            fetching: Mutex::new(HashMap::new()),
            inflight: Mutex::new(Default::default()),
            last_error: Mutex::new(None),
            wake: tokio::sync::Notify::new(),
            uploaded: tokio::sync::Notify::new(),
            round: tokio::sync::Mutex::new(()),
            gc_lock: tokio::sync::Mutex::new(()),
            stop: AtomicBool::new(false),
            spin: SpinDownProgress::default(),
            rehydrate: Arc::new(RehydrateProgress::default()),
            last_manifest: Mutex::new(Some(std::time::Instant::now())),
            manifest_settings: Mutex::new(Default::default()),
        });
        fs.set_cold_tier(tier.clone());
        tier
    }

    pub fn config(&self) -> &TierConfig {
        &self.cfg
    }

    pub fn counters(&self) -> &TierCounters {
        &self.counters
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.objects
    }

    /// The last upload error, if the last upload failed.
    pub fn last_error(&self) -> Option<String> {
        lock(&self.last_error).clone()
    }

    /// The settings periodic manifests carry.
    pub fn set_manifest_settings(&self, settings: std::collections::BTreeMap<String, String>) {
        *lock(&self.manifest_settings) = settings;
    }

    pub fn manifest_settings(&self) -> std::collections::BTreeMap<String, String> {
        lock(&self.manifest_settings).clone()
    }

    fn fs(&self) -> Result<Arc<Fs>> {
        self.fs.upgrade().ok_or(TierEngineError::Stopped)
    }

    fn now(&self) -> i64 {
        self.clock.now_nanos()
    }

    /// Runs the background loop (uploads every `interval`, eviction, GC every `gc_interval`)
    /// until [`Tier::stop`].
    /// A leader that finds the cluster-wide write freeze on with no spin-down of its own
    /// behind it (the node that ran the spin-down failed, or the cluster restarted after one)
    /// lifts it: a restart makes the namespace writable again, as it did on a node alone.
    async fn lift_stale_freeze(&self) {
        let Ok(fs) = self.fs() else { return };
        if fs.is_frozen() && !self.spin.running.load(Ordering::SeqCst) && !self.spin.done_here.load(Ordering::SeqCst) {
            match fs.freeze(false).await {
                Ok(()) => tracing::info!("write freeze of an earlier spin-down lifted: this leader did not run it"),
                Err(e) => tracing::warn!(error = %e, "cannot lift the write freeze"),
            }
        }
    }

    pub fn spawn(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let tier = self.clone();
        tokio::spawn(async move { tier.run().await })
    }

    /// Asks the background loop to end after its current step.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.wake.notify_one();
    }

    async fn run(self: Arc<Self>) {
        let mut last_gc = tokio::time::Instant::now();
        let mut swept = false;
        // The orphan sweep runs on the first GC pass and then hourly (in a cluster, objects
        // too young at one sweep are swept at a later one).
        let mut last_sweep = tokio::time::Instant::now();
        while !self.stop.load(Ordering::SeqCst) {
            // In a cluster, uploads, manifests and GC are the leader's alone (one writer of the
            // bucket and of the object table); eviction and read-through run on every node.
            let leader = self.fs().map(|f| f.meta().is_leader()).unwrap_or(false);
            if leader {
                self.lift_stale_freeze().await;
            }
            match if leader { self.upload_round(false).await } else { Ok(RoundReport::default()) } {
                Ok(r) if r.objects > 0 => tracing::debug!(objects = r.objects, bytes = r.bytes, "tiering: uploaded"),
                Ok(_) => {}
                Err(TierEngineError::Stopped) => return,
                Err(e) => tracing::warn!(error = %e, "tiering: upload round failed; retrying"),
            }
            if let Err(e) = self.evict_if_needed().await {
                tracing::warn!(error = %e, "tiering: eviction failed");
            }
            if let Some(every) = self.cfg.snapshot_interval {
                let due = lock(&self.last_manifest).is_none_or(|t| t.elapsed() >= every);
                let read_only = self.fs().map(|f| f.is_read_only()).unwrap_or(true);
                if due && !read_only && leader {
                    if let Err(e) = self.write_manifest(self.manifest_settings()).await {
                        tracing::warn!(error = %e, "periodic manifest failed; next interval");
                    }
                    *lock(&self.last_manifest) = Some(std::time::Instant::now());
                }
            }
            if leader && (!swept || last_gc.elapsed() >= self.cfg.gc_interval) {
                let sweep = !swept || last_sweep.elapsed() >= std::time::Duration::from_secs(3600);
                match self.gc(sweep).await {
                    Ok(r) => {
                        swept = true;
                        if sweep {
                            last_sweep = tokio::time::Instant::now();
                        }
                        if r.deleted_objects + r.rewritten_objects + r.orphans_deleted > 0 {
                            tracing::info!(?r, "tiering: gc");
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "tiering: gc failed"),
                }
                last_gc = tokio::time::Instant::now();
            }
            let _ = tokio::time::timeout(self.cfg.interval, self.wake.notified()).await;
        }
    }

    /// Uploads every dirty block now, whatever its age (spin-down, tests, `tier flush`).
    pub async fn flush_all(&self) -> Result<RoundReport> {
        let mut total = RoundReport::default();
        loop {
            let r = self.upload_round(true).await?;
            total.objects += r.objects;
            total.blocks += r.blocks;
            total.bytes += r.bytes;
            if r.remaining_dirty_bytes == 0 {
                total.remaining_dirty_bytes = 0;
                return Ok(total);
            }
            if r.objects == 0 {
                // Nothing went up although blocks are dirty: the store is failing.
                return Err(TierEngineError::Object(crate::ObjectError::Unavailable(
                    self.last_error().unwrap_or_else(|| "uploads make no progress".into()),
                )));
            }
        }
    }

    fn touch_ids(&self, ids: &[u64]) {
        let t = self.tick.fetch_add(1, Ordering::Relaxed);
        let mut access = lock(&self.access);
        for id in ids {
            access.insert(*id, t);
        }
    }
}

/// Locks a std mutex; a poisoned one (a panic while held) still holds consistent data here,
/// since every critical section is a plain map or option update.
pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[async_trait::async_trait]
impl tidepool_fs::ColdTier for Tier {
    async fn read_through(
        &self,
        id: u64,
        loc: tidepool_cluster::meta::ObjectLocator,
        offset: u32,
        len: u32,
    ) -> tidepool_fs::Result<Vec<u8>> {
        let data = self.fetch_block(id, loc).await?;
        let (start, end) = (offset as usize, offset as usize + len as usize);
        if end > data.len() {
            return Err(tidepool_fs::FsError::Invalid("read past the end of a tiered block"));
        }
        Ok(data[start..end].to_vec())
    }

    fn touch(&self, ids: &[u64]) {
        self.touch_ids(ids);
    }

    async fn admit_write(&self, new_bytes: u64) -> tidepool_fs::Result<()> {
        self.admit(new_bytes).await
    }

    async fn make_room(&self, bytes: u64) -> u64 {
        match self.evict_bytes(bytes).await {
            Ok(n) => n,
            Err(e) => {
                tracing::warn!(error = %e, "tiering: cannot make room on the device");
                0
            }
        }
    }
}
