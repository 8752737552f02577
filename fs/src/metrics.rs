//! Counters of the filesystem layer, read by the metrics endpoint. Plain atomics: no
//! registry, no globals; the owner (Fs) hands out snapshots.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::cache::CacheCounters;

#[derive(Debug, Clone, Copy)]
pub(crate) enum Op {
    Lookup,
    Getattr,
    Setattr,
    Create,
    Remove,
    Rename,
    Readdir,
    Read,
    Write,
}

const OPS: [&str; 9] = ["lookup", "getattr", "setattr", "create", "remove", "rename", "readdir", "read", "write"];

#[derive(Debug, Default)]
pub struct FsMetrics {
    ops: [AtomicU64; 9],
    bytes_read: AtomicU64,
    bytes_written: AtomicU64,
    peer_read_bytes: AtomicU64,
    /// The read cache's counters (it updates them; zero while the cache is off).
    cache: Arc<CacheCounters>,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MetricsSnapshot {
    /// (operation name, count)
    pub ops: Vec<(&'static str, u64)>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Block bytes read from other nodes of the cluster.
    pub peer_read_bytes: u64,
    /// Block range reads served from the RAM read cache.
    pub read_cache_hits: u64,
    /// Block range reads the read cache did not hold (read from NVMe, a peer or the bucket).
    pub read_cache_misses: u64,
    /// Pages the read cache pushed out to make room.
    pub read_cache_evictions: u64,
    /// Pages put into the read cache.
    pub read_cache_inserted_pages: u64,
    /// Bytes the read cache holds (page data plus a fixed overhead per page).
    pub read_cache_bytes: u64,
    /// Its limit (`read_cache_bytes` setting); 0 when off.
    pub read_cache_capacity_bytes: u64,
}

impl FsMetrics {
    pub(crate) fn op(&self, op: Op) {
        self.ops[op as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn bytes_read(&self, n: u64) {
        self.bytes_read.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn bytes_written(&self, n: u64) {
        self.bytes_written.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn peer_read(&self, n: u64) {
        self.peer_read_bytes.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn cache_counters(&self) -> Arc<CacheCounters> {
        self.cache.clone()
    }

    pub fn snapshot(&self) -> MetricsSnapshot {
        let c = &self.cache;
        MetricsSnapshot {
            ops: OPS.iter().zip(&self.ops).map(|(n, c)| (*n, c.load(Ordering::Relaxed))).collect(),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            peer_read_bytes: self.peer_read_bytes.load(Ordering::Relaxed),
            read_cache_hits: c.hits.load(Ordering::Relaxed),
            read_cache_misses: c.misses.load(Ordering::Relaxed),
            read_cache_evictions: c.evictions.load(Ordering::Relaxed),
            read_cache_inserted_pages: c.inserted_pages.load(Ordering::Relaxed),
            read_cache_bytes: c.held_bytes.load(Ordering::Relaxed),
            read_cache_capacity_bytes: c.capacity_bytes.load(Ordering::Relaxed),
        }
    }
}
