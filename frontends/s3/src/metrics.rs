//! S3 counters for `/metrics`: requests by operation and status, bytes in and out.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

#[derive(Default)]
pub struct S3Metrics {
    requests: Mutex<BTreeMap<(String, u16), u64>>,
    bytes_in: AtomicU64,
    bytes_out: AtomicU64,
}

impl S3Metrics {
    pub fn request(&self, op: &str, status: u16) {
        if let Ok(mut m) = self.requests.lock() {
            *m.entry((op.to_owned(), status)).or_default() += 1;
        }
    }

    pub fn bytes_in(&self, n: u64) {
        self.bytes_in.fetch_add(n, Ordering::Relaxed);
    }

    pub fn bytes_out(&self, n: u64) {
        self.bytes_out.fetch_add(n, Ordering::Relaxed);
    }

    /// Requests served so far, by (operation, HTTP status).
    pub fn requests(&self) -> BTreeMap<(String, u16), u64> {
        self.requests.lock().map(|m| m.clone()).unwrap_or_default()
    }

    /// Append the counters in Prometheus text format.
    pub fn render(&self, out: &mut String) {
        let _ = writeln!(
            out,
            "# HELP tidepool_s3_requests_total S3 requests by operation and HTTP status.\n# TYPE tidepool_s3_requests_total counter"
        );
        for ((op, status), n) in self.requests() {
            let _ = writeln!(out, "tidepool_s3_requests_total{{op=\"{op}\",status=\"{status}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP tidepool_s3_bytes_total Object bytes received (in) and sent (out) by the S3 front end.\n# TYPE tidepool_s3_bytes_total counter"
        );
        let _ = writeln!(out, "tidepool_s3_bytes_total{{dir=\"in\"}} {}", self.bytes_in.load(Ordering::Relaxed));
        let _ = writeln!(out, "tidepool_s3_bytes_total{{dir=\"out\"}} {}", self.bytes_out.load(Ordering::Relaxed));
    }
}
