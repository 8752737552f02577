//! NFS counters for `/metrics`: calls by operation and status.
//!
//! The successful calls of the frequent operations are plain atomic counters, so a READ
//! takes no lock to be counted (with a `Mutex` every call of every connection met on one
//! lock); the rest (errors, rare operations) are counted in a map under a lock.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// Operations whose `ok` calls are counted without a lock.
const HOT: [&str; 8] = ["read", "write", "getattr", "lookup", "access", "create", "commit", "setattr"];

#[derive(Default)]
pub struct NfsMetrics {
    hot_ok: [AtomicU64; HOT.len()],
    ops: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl NfsMetrics {
    pub fn op(&self, op: &'static str, status: &'static str) {
        if status == "ok"
            && let Some(i) = HOT.iter().position(|h| *h == op)
        {
            self.hot_ok[i].fetch_add(1, Ordering::Relaxed);
            return;
        }
        if let Ok(mut m) = self.ops.lock() {
            *m.entry((op, status)).or_default() += 1;
        }
    }

    /// Calls so far, by (operation, status: `ok` or the nfsstat3 name).
    pub fn ops(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        let mut all = self.ops.lock().map(|m| m.clone()).unwrap_or_default();
        for (op, n) in HOT.iter().zip(&self.hot_ok) {
            let n = n.load(Ordering::Relaxed);
            if n > 0 {
                all.insert((op, "ok"), n);
            }
        }
        all
    }

    /// Append the counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP tidepool_nfs_ops_total NFS file system calls by operation and status.\n# TYPE tidepool_nfs_ops_total counter"
        );
        for ((op, status), n) in self.ops() {
            let _ = writeln!(out, "tidepool_nfs_ops_total{{op=\"{op}\",status=\"{status}\"}} {n}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hot_and_other_counts_merge() {
        let m = NfsMetrics::default();
        m.op("read", "ok");
        m.op("read", "ok");
        m.op("read", "STALE");
        m.op("mkdir", "ok");
        let ops = m.ops();
        assert_eq!(ops[&("read", "ok")], 2);
        assert_eq!(ops[&("read", "STALE")], 1);
        assert_eq!(ops[&("mkdir", "ok")], 1);
        assert!(!ops.contains_key(&("write", "ok")));
    }
}
