//! tidepool-fs: the filesystem API that every front end calls.
//!
//! Joins the meta group (namespace, extents, block table) and the block store (block bytes
//! on NVMe). A write puts new immutable blocks, makes them durable, then commits extents
//! pointing at them through the meta group (copy-on-write: an overwrite never modifies a
//! block). A read takes the extents under the state lock and reads block ranges, through a
//! RAM cache of verified block pages (`cache.rs`).
//! It does not speak any protocol (front ends do) and does not wire concrete parts
//! together (the `tidepool` binary does).

mod cache;
mod cold;
mod error;
mod keys;
mod metrics;
mod namespace;
mod pool;
mod rw;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use tidepool_cluster::meta::{Attr, Command, MetaState};
use tidepool_cluster::{Applied, Clock, MetaGroup};
use tidepool_spdk::BlockStore;

pub use cold::{ColdTier, TierError};
pub use error::{ErrorKind, FsError, Result};
pub use keys::AccessKeyInfo;
pub use metrics::{FsMetrics, MetricsSnapshot};
pub use pool::{PeerError, Peers, RepairReport, placement};
pub use rw::Staged;
pub use tidepool_cluster::meta::{Attr as FileAttr, InodeKind, NAME_MAX, ROOT_INO};

/// Settings of the filesystem layer.
#[derive(Debug, Clone)]
pub struct FsOptions {
    /// Largest block a write cuts data into. Default 4 MiB.
    pub block_size: usize,
    /// Block ids taken from the meta group per allocation round trip. Default 4096.
    pub id_batch: u64,
    /// Nodes a dirty block is written to before a write is acknowledged (with peers set).
    /// Default 1.
    pub replicas: usize,
    /// A member of a multi-node cluster: blocks in the store that no extent references are
    /// not freed at open (they may be replicas of another node's write still in flight) but
    /// this long after, if still unreferenced then. `None` (a node alone): freed at open.
    pub orphan_grace: Option<std::time::Duration>,
    /// RAM for the read cache of verified 4 KiB block pages (`cache.rs`); 0 turns it off.
    /// Default [`DEFAULT_READ_CACHE_BYTES`] (1 GiB); the `tidepool` binary passes
    /// [`read_cache_bytes_for`] of the node's memory unless the setting is given.
    pub read_cache_bytes: u64,
}

/// The read cache's size when the memory a node may use is not known (and `FsOptions`'
/// default, which tests use): 1 GiB.
pub const DEFAULT_READ_CACHE_BYTES: u64 = 1 << 30;

/// The share of the node's memory the read cache takes by default, in percent.
pub const READ_CACHE_MEMORY_PERCENT: u64 = 25;

/// The default read cache is never smaller than this (64 MiB: 16 blocks of 4 MiB) ...
pub const READ_CACHE_MIN_BYTES: u64 = 64 << 20;

/// ... nor larger than this (64 GiB).
pub const READ_CACHE_MAX_BYTES: u64 = 64 << 30;

/// The default size of the read cache for a node that may use `memory_bytes` of RAM (the
/// machine's, capped by its cgroup's limit; `None` if unknown: [`DEFAULT_READ_CACHE_BYTES`]):
/// [`READ_CACHE_MEMORY_PERCENT`] of it, within [`READ_CACHE_MIN_BYTES`]..=[`READ_CACHE_MAX_BYTES`].
///
/// Why a quarter: the cache is the node's page cache for block data (the device file is opened
/// `O_DIRECT`, so the kernel's page cache holds none of it), and on the machines tidepool runs
/// on (GPU nodes with local NVMe, 0.5-2 TiB of RAM) the rest belongs to the jobs: their data
/// loaders, pinned host buffers for the GPUs, the kernel's own cache of their files. A quarter
/// leaves three quarters to them and still holds a hot working set of tens of GiB. The cap:
/// past 64 GiB the local NVMe (several GB/s per drive) serves the rest of a working set, the
/// per-page bookkeeping grows with the size (`ENTRY_OVERHEAD` per 4 KiB, ~3 %), and an
/// operator who wants more says so. The floor keeps a cache of a few blocks on a small box
/// (a test container): below 256 MiB of memory the floor is more than a quarter; memory is
/// taken only as pages are read, so an idle node does not hold it.
pub fn read_cache_bytes_for(memory_bytes: Option<u64>) -> u64 {
    match memory_bytes {
        None => DEFAULT_READ_CACHE_BYTES,
        Some(m) => {
            let share = u128::from(m) * u128::from(READ_CACHE_MEMORY_PERCENT) / 100;
            u64::try_from(share).unwrap_or(u64::MAX).clamp(READ_CACHE_MIN_BYTES, READ_CACHE_MAX_BYTES)
        }
    }
}

impl Default for FsOptions {
    fn default() -> Self {
        FsOptions {
            block_size: 4 << 20,
            id_batch: 4096,
            replicas: 1,
            orphan_grace: None,
            read_cache_bytes: DEFAULT_READ_CACHE_BYTES,
        }
    }
}

/// A directory entry as readdir returns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry {
    pub name: Vec<u8>,
    pub attr: Attr,
}

/// Attribute changes; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<i64>,
    pub mtime: Option<i64>,
}

/// Space and file counts (statfs / FSSTAT).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct FsStat {
    pub capacity_bytes: u64,
    pub used_bytes: u64,
    pub free_bytes: u64,
    pub files: u64,
    pub dirs: u64,
    pub symlinks: u64,
    pub file_bytes: u64,
    pub blocks: u64,
}

/// What `Fs::open` found when it compared the block table with the block store.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct OpenReport {
    /// Blocks on NVMe that no file references (a crash between a block write and its
    /// metadata commit, or between a commit and the free): deleted.
    pub orphans_freed: u64,
    /// Blocks the metadata says are on NVMe (dirty or clean) that the store does not have.
    pub missing_blocks: u64,
}

pub struct Fs {
    meta: MetaGroup<MetaState>,
    store: Arc<BlockStore>,
    clock: Arc<dyn Clock>,
    opts: FsOptions,
    /// Block ids handed out by the meta group and not used yet: `next..end`.
    ids: tokio::sync::Mutex<(u64, u64)>,
    read_only: AtomicBool,
    metrics: FsMetrics,
    /// The cold tier, once plugged in (`set_cold_tier`).
    cold: std::sync::OnceLock<Arc<dyn ColdTier>>,
    /// The cluster's other nodes, once plugged in (`set_peers`).
    peers: std::sync::OnceLock<Arc<dyn Peers>>,
    /// Verified block pages in RAM; `None` when `read_cache_bytes` is 0.
    cache: Option<Arc<cache::ReadCache>>,
}

impl Fs {
    /// Join a meta group and a block store. Reconciles the two first: blocks in the store
    /// that no extent references are freed; blocks missing from the store are counted.
    pub async fn open(
        meta: MetaGroup<MetaState>,
        store: Arc<BlockStore>,
        clock: Arc<dyn Clock>,
        opts: FsOptions,
    ) -> Result<(Self, OpenReport)> {
        let metrics = FsMetrics::default();
        let cache = cache::ReadCache::new(opts.read_cache_bytes, metrics.cache_counters()).map(Arc::new);
        let fs = Fs {
            meta,
            store,
            clock,
            opts,
            ids: tokio::sync::Mutex::new((0, 0)),
            read_only: AtomicBool::new(false),
            metrics,
            cold: std::sync::OnceLock::new(),
            peers: std::sync::OnceLock::new(),
            cache,
        };
        fs.free_on_apply();
        let report = fs.reconcile().await?;
        Ok((fs, report))
    }

    /// Every node deletes, from its own store and its read cache, the blocks each applied
    /// commit freed (whoever proposed it): replicas and read-through copies go with the
    /// proposer's.
    fn free_on_apply(&self) {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u64>>();
        self.meta.set_observer(Box::new(move |out: &std::result::Result<Applied, tidepool_cluster::MetaError>| {
            if let Ok(a) = out
                && !a.freed.is_empty()
            {
                let _ = tx.send(a.freed.clone());
            }
        }));
        let (store, cache) = (self.store.clone(), self.cache.clone());
        tokio::spawn(async move {
            while let Some(ids) = rx.recv().await {
                free_blocks(&store, cache.as_deref(), &ids).await;
            }
        });
    }

    async fn reconcile(&self) -> Result<OpenReport> {
        let mut report = OpenReport::default();
        let in_store = self.store.ids();
        let orphans: Vec<u64> =
            self.meta.read(|s| in_store.iter().copied().filter(|id| !s.blocks.contains_key(id)).collect());
        if let Some(grace) = self.opts.orphan_grace {
            // A cluster member: these may be replicas of a write another node has not
            // committed yet. Free the ones still unreferenced after the grace period.
            if !orphans.is_empty() {
                let (store, state) = (self.store.clone(), self.meta.state().clone());
                tokio::spawn(async move {
                    tokio::time::sleep(grace).await;
                    let still: Vec<u64> = {
                        let s = state.read().unwrap_or_else(std::sync::PoisonError::into_inner);
                        orphans.iter().copied().filter(|id| !s.blocks.contains_key(id)).collect()
                    };
                    for id in &still {
                        let _ = store.delete(*id).await;
                    }
                    let _ = store.flush().await;
                    tracing::info!(count = still.len(), "freed orphaned blocks after the grace period");
                });
            }
            return Ok(report);
        }
        for id in &orphans {
            self.store.delete(*id).await?;
        }
        if !orphans.is_empty() {
            self.store.flush().await?;
            tracing::info!(count = orphans.len(), "freed orphaned blocks");
        }
        report.orphans_freed = orphans.len() as u64;
        report.missing_blocks = self.meta.read(|s| {
            s.blocks
                .iter()
                // A tiered block may be absent (evicted: cold); a dirty one must be here.
                .filter(|(id, b)| b.state == tidepool_cluster::meta::BlockState::Dirty && !self.store.contains(**id))
                .count() as u64
        });
        if report.missing_blocks > 0 {
            tracing::error!(count = report.missing_blocks, "blocks recorded on NVMe are missing from the block store");
        }
        Ok(report)
    }

    pub fn meta(&self) -> &MetaGroup<MetaState> {
        &self.meta
    }

    pub fn store(&self) -> &Arc<BlockStore> {
        &self.store
    }

    pub fn metrics(&self) -> &FsMetrics {
        &self.metrics
    }

    /// Drops a block's pages from the read cache (a freed block, or one released to the cold
    /// tier on purpose: `tidepool tier release`).
    pub fn uncache(&self, id: u64) {
        if let Some(c) = &self.cache {
            c.remove_block(id);
        }
    }

    pub fn options(&self) -> &FsOptions {
        &self.opts
    }

    /// Waits until this node's metadata includes every commit made anywhere in the cluster
    /// before the call (a ReadIndex round trip to the leader; at once for a node alone).
    /// Metadata reads after it are linearizable.
    pub async fn sync(&self) -> Result<()> {
        Ok(self.meta.read_barrier().await?)
    }

    /// Writers get `ReadOnly` while this is set (spin-down).
    pub fn set_read_only(&self, on: bool) {
        self.read_only.store(on, Ordering::SeqCst);
    }

    /// Read-only here (`set_read_only`) or cluster-wide (`freeze`).
    pub fn is_read_only(&self) -> bool {
        self.read_only.load(Ordering::SeqCst) || self.meta.read(|s| s.frozen)
    }

    /// Makes every node of the cluster refuse writes (`true`, spin-down) or take them again:
    /// a replicated flag, through the meta group.
    pub async fn freeze(&self, frozen: bool) -> Result<()> {
        self.meta.propose(Command::SetFrozen { frozen }).await??;
        Ok(())
    }

    /// Whether the cluster-wide write freeze is on.
    pub fn is_frozen(&self) -> bool {
        self.meta.read(|s| s.frozen)
    }

    fn check_writable(&self) -> Result<()> {
        if self.is_read_only() { Err(FsError::ReadOnly) } else { Ok(()) }
    }

    fn now(&self) -> i64 {
        self.clock.now_nanos()
    }

    /// Propose a command and free the blocks it released.
    async fn commit(&self, cmd: Command) -> Result<Applied> {
        let applied = self.meta.propose(cmd).await??;
        self.free_blocks(&applied.freed).await;
        Ok(applied)
    }

    /// Free the blocks a commit released, at once on the proposer (the apply observer of
    /// `free_on_apply` frees them too, on every node; whichever comes second finds nothing).
    async fn free_blocks(&self, ids: &[u64]) {
        free_blocks(&self.store, self.cache.as_deref(), ids).await;
    }

    pub fn stat(&self) -> FsStat {
        let s = self.store.stats();
        let t = self.meta.read(|m| m.totals());
        FsStat {
            capacity_bytes: s.capacity_bytes,
            used_bytes: s.used_bytes,
            free_bytes: s.capacity_bytes.saturating_sub(s.used_bytes),
            files: t.files,
            dirs: t.dirs,
            symlinks: t.symlinks,
            file_bytes: t.bytes,
            blocks: t.blocks,
        }
    }

    /// Stop the meta group after in-flight commits, and make the block store durable.
    pub async fn shutdown(self) -> Result<()> {
        self.store.flush().await?;
        self.meta.shutdown().await?;
        Ok(())
    }
}

/// Look up a path ("/a/b/c") from the root without following symlinks.
pub fn split_path(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

/// Delete released blocks from the store and the read cache. A failure leaks space only until
/// the next open, whose reconcile frees every unreferenced block; so it is logged, not
/// returned. A block already gone is what was wanted (see [`Fs::free_blocks`]).
async fn free_blocks(store: &BlockStore, cache: Option<&cache::ReadCache>, ids: &[u64]) {
    for &id in ids {
        if let Some(c) = cache {
            c.remove_block(id);
        }
        match store.delete(id).await {
            Ok(()) | Err(tidepool_spdk::StoreError::NotFound(_)) => {}
            Err(e) => tracing::warn!(block_id = id, error = %e, "cannot free block; reclaimed at next open"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_read_cache_is_a_quarter_of_memory_within_floor_and_cap() {
        assert_eq!(read_cache_bytes_for(None), DEFAULT_READ_CACHE_BYTES, "memory unknown");
        assert_eq!(read_cache_bytes_for(Some(24 << 30)), 6 << 30, "a quarter of 24 GiB");
        assert_eq!(read_cache_bytes_for(Some(4 << 30)), 1 << 30);
        assert_eq!(read_cache_bytes_for(Some(128 << 20)), READ_CACHE_MIN_BYTES, "a small container: the floor");
        assert_eq!(read_cache_bytes_for(Some(0)), READ_CACHE_MIN_BYTES);
        assert_eq!(read_cache_bytes_for(Some(2 << 40)), READ_CACHE_MAX_BYTES, "a 2 TiB GPU node: the cap");
        assert_eq!(read_cache_bytes_for(Some(u64::MAX)), READ_CACHE_MAX_BYTES, "no overflow");
    }
}
