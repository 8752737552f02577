//! NFS counters for `/metrics`: calls by operation and status.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

#[derive(Default)]
pub struct NfsMetrics {
    ops: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
}

impl NfsMetrics {
    pub fn op(&self, op: &'static str, status: &'static str) {
        if let Ok(mut m) = self.ops.lock() {
            *m.entry((op, status)).or_default() += 1;
        }
    }

    /// Calls so far, by (operation, status: `ok` or the nfsstat3 name).
    pub fn ops(&self) -> BTreeMap<(&'static str, &'static str), u64> {
        self.ops.lock().map(|m| m.clone()).unwrap_or_default()
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
