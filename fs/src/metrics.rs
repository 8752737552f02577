//! Counters of the filesystem layer, read by the metrics endpoint. Plain atomics: no
//! registry, no globals; the owner (Fs) hands out snapshots.

use std::sync::atomic::{AtomicU64, Ordering};

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
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct MetricsSnapshot {
    /// (operation name, count)
    pub ops: Vec<(&'static str, u64)>,
    pub bytes_read: u64,
    pub bytes_written: u64,
    /// Block bytes read from other nodes of the cluster.
    pub peer_read_bytes: u64,
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

    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            ops: OPS.iter().zip(&self.ops).map(|(n, c)| (*n, c.load(Ordering::Relaxed))).collect(),
            bytes_read: self.bytes_read.load(Ordering::Relaxed),
            bytes_written: self.bytes_written.load(Ordering::Relaxed),
            peer_read_bytes: self.peer_read_bytes.load(Ordering::Relaxed),
        }
    }
}
