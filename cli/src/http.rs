//! The status and metrics endpoint: `GET /metrics` (Prometheus text format) and
//! `GET /status` (JSON). Two read-only routes, so a few lines over tokio's TcpListener
//! instead of a web framework in the dependency tree.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use tidepool_fs::Fs;

/// What the endpoint reports, besides the filesystem's own numbers.
pub struct StatusSource {
    pub fs: Arc<Fs>,
    pub started: Instant,
    pub data_dir: String,
    pub device: String,
    pub engine: String,
    pub object_store: String,
    pub http: String,
    pub s3: String,
    pub s3_metrics: Arc<tidepool_s3::S3Metrics>,
}

impl StatusSource {
    pub fn status_json(&self) -> serde_json::Value {
        let st = self.fs.store().stats();
        serde_json::json!({
            "state": if self.fs.is_read_only() { "read-only" } else { "serving" },
            "uptime_secs": self.started.elapsed().as_secs(),
            "data_dir": self.data_dir,
            "endpoints": { "http": self.http, "s3": self.s3 },
            "device": { "path": self.device, "engine": self.engine, "capacity_bytes": st.capacity_bytes },
            "object_store": { "url": self.object_store, "tiering": "not available until the cold tier lands" },
            "block_store": {
                "capacity_bytes": st.capacity_bytes, "used_bytes": st.used_bytes, "live_bytes": st.live_bytes,
                "blocks": st.blocks, "segments_total": st.segments_total, "segments_free": st.segments_free,
                "index_bytes": st.index_bytes, "cleaned_segments": st.cleaned_segments,
            },
            "meta": self.fs.meta().status(),
            "fs": self.fs.stat(),
            "ops": self.fs.metrics().snapshot(),
        })
    }

    pub fn metrics_text(&self) -> String {
        let st = self.fs.store().stats();
        let raft = self.fs.meta().status();
        let fsst = self.fs.stat();
        let m = self.fs.metrics().snapshot();
        let mut out = String::new();
        let mut gauge = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        };
        gauge("tidepool_uptime_seconds", "Seconds since the node started.", self.started.elapsed().as_secs());
        gauge("tidepool_nvme_capacity_bytes", "Capacity of the NVMe block store.", st.capacity_bytes);
        gauge("tidepool_nvme_used_bytes", "Bytes in non-free segments of the block store.", st.used_bytes);
        gauge("tidepool_nvme_live_bytes", "Payload bytes of live blocks on NVMe.", st.live_bytes);
        gauge("tidepool_nvme_blocks", "Blocks on NVMe.", st.blocks);
        gauge("tidepool_nvme_segments_free", "Free segments of the block store.", st.segments_free);
        gauge("tidepool_nvme_index_bytes", "Heap bytes of the block index.", st.index_bytes);
        gauge(
            "tidepool_dirty_bytes",
            "Bytes on NVMe not yet in the object store (all of them until the cold tier lands).",
            st.live_bytes,
        );
        gauge("tidepool_files", "Regular files in the namespace.", fsst.files);
        gauge("tidepool_directories", "Directories in the namespace.", fsst.dirs);
        gauge("tidepool_file_bytes", "Sum of file sizes.", fsst.file_bytes);
        gauge("tidepool_raft_term", "Raft term.", raft.term);
        gauge("tidepool_raft_commit_index", "Raft commit index.", raft.commit_index);
        gauge("tidepool_raft_applied_index", "Raft applied index.", raft.applied_index);
        gauge("tidepool_raft_log_bytes", "Bytes in the Raft log since the last snapshot.", raft.log_bytes);
        gauge("tidepool_read_only", "1 when the filesystem refuses writes.", self.fs.is_read_only() as u64);
        let _ = writeln!(
            out,
            "# HELP tidepool_fs_ops_total Filesystem operations by kind.\n# TYPE tidepool_fs_ops_total counter"
        );
        for (op, n) in &m.ops {
            let _ = writeln!(out, "tidepool_fs_ops_total{{op=\"{op}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP tidepool_fs_bytes_total Bytes through the filesystem API.\n# TYPE tidepool_fs_bytes_total counter"
        );
        let _ = writeln!(out, "tidepool_fs_bytes_total{{dir=\"read\"}} {}", m.bytes_read);
        let _ = writeln!(out, "tidepool_fs_bytes_total{{dir=\"write\"}} {}", m.bytes_written);
        self.s3_metrics.render(&mut out);
        out
    }
}

/// Serve until the task is dropped/aborted.
pub async fn serve(listener: TcpListener, src: Arc<StatusSource>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let src = src.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 4096];
            let mut n = 0;
            // Read the request head (bounded: 4 KiB is plenty for a GET).
            while n < buf.len() {
                match sock.read(&mut buf[n..]).await {
                    Ok(0) | Err(_) => break,
                    Ok(k) => n += k,
                }
                if buf[..n].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
            let head = String::from_utf8_lossy(&buf[..n]);
            let mut parts = head.split_whitespace();
            let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
            let (code, ctype, body) = match (method, path) {
                ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", src.metrics_text()),
                ("GET", "/status") => ("200 OK", "application/json", src.status_json().to_string()),
                ("GET", _) => ("404 Not Found", "text/plain", "not found: try /status or /metrics\n".into()),
                _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
            };
            let resp = format!(
                "HTTP/1.1 {code}\r\ncontent-type: {ctype}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = sock.write_all(resp.as_bytes()).await;
            let _ = sock.shutdown().await;
        });
    }
}

/// A GET for `tidepool status` (blocking, std only).
pub fn get(addr: &str, path: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
    write!(s, "GET {path} HTTP/1.1\r\nhost: {addr}\r\nconnection: close\r\n\r\n")?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    if !head.starts_with("HTTP/1.1 200") {
        return Err(std::io::Error::other(format!("status endpoint answered: {}", head.lines().next().unwrap_or(""))));
    }
    Ok(body.to_string())
}
