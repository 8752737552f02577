//! The status and metrics endpoint: `GET /metrics` (Prometheus text format) and
//! `GET /status` (JSON), plus the admin routes of `tidepool keys` (`GET` / `POST /admin/keys`,
//! `DELETE /admin/keys/ID`), which need `authorization: Bearer <admin token>` (derived from the
//! node key, compared in constant time; 401 otherwise). A handful of routes, so a few lines
//! over tokio's TcpListener instead of a web framework in the dependency tree: one request
//! per connection, the head bounded to 8 KiB and a body (Content-Length only) to 4 KiB.

use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

use tidepool_fs::Fs;

use crate::keys::Admin;

/// Largest request head, and largest request body (admin JSON is tiny).
const HEAD_MAX: usize = 8 << 10;
const BODY_MAX: usize = 4 << 10;

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
    pub nfs: String,
    pub nfs_metrics: Arc<tidepool_nfs::NfsMetrics>,
    /// The admin routes (S3 keys); `None` answers them 404.
    pub admin: Option<Arc<Admin>>,
    /// The tiering engine (`/tier/status`, `/admin/tier/*`, `/admin/pin`, tier metrics;
    /// spin-down, snapshots and rehydration routes).
    pub tier: Arc<tidepool_tiering::Tier>,
    /// Settings a manifest written on request carries.
    pub manifest_settings: std::collections::BTreeMap<String, String>,
    /// The cluster side (`/cluster`, the `cluster` part of `/status`, `/admin/node/remove`).
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

impl StatusSource {
    pub fn status_json(&self) -> serde_json::Value {
        let st = self.fs.store().stats();
        serde_json::json!({
            "state": if self.fs.is_read_only() { "read-only" } else { "serving" },
            "uptime_secs": self.started.elapsed().as_secs(),
            "data_dir": self.data_dir,
            "endpoints": { "http": self.http, "s3": self.s3, "nfs": self.nfs },
            "device": { "path": self.device, "engine": self.engine, "capacity_bytes": st.capacity_bytes },
            "object_store": {
                "url": self.object_store,
                "dirty_bytes": self.fs.meta().read(|s| s.dirty_bytes),
                "last_upload_error": self.tier.last_error(),
                "counters": self.tier.counters().snapshot().into_iter().collect::<std::collections::BTreeMap<_, _>>(),
            },
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
        let (dirty, objects, bucket_bytes, bucket_live) = self.fs.meta().read(|s| {
            let (b, l) = s.objects.values().fold((0, 0), |(b, l), o| (b + o.size_bytes, l + o.live_bytes));
            (s.dirty_bytes, s.objects.len() as u64, b, l)
        });
        gauge("tidepool_dirty_bytes", "Bytes on NVMe only, not yet in the object store.", dirty);
        gauge("tidepool_bucket_objects", "Chunk and pack objects in the bucket.", objects);
        gauge("tidepool_bucket_bytes", "Bytes of the chunk and pack objects in the bucket.", bucket_bytes);
        gauge("tidepool_bucket_live_bytes", "Bytes in the bucket that files still use.", bucket_live);
        gauge("tidepool_tier_failing", "1 while the last upload failed.", self.tier.last_error().is_some() as u64);
        let r = self.tier.rehydrate_progress().status();
        gauge("tidepool_rehydrate_files_total", "Files rehydration brings back onto NVMe.", r.files_total);
        gauge("tidepool_rehydrate_files_done", "Files rehydrated so far.", r.files_done);
        gauge("tidepool_rehydrate_bytes_total", "Bytes rehydration brings back onto NVMe.", r.bytes_total);
        gauge("tidepool_rehydrate_bytes_done", "Bytes rehydrated so far.", r.bytes_done);
        gauge("tidepool_rehydrate_rate_bytes_per_second", "Rehydration rate.", r.rate_bytes_per_sec as u64);
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
        let _ = writeln!(
            out,
            "# HELP tidepool_read_cache_total RAM read cache of block pages: block range reads served (hits) or not (misses), pages put in and evicted.\n# TYPE tidepool_read_cache_total counter"
        );
        for (what, n) in [
            ("hits", m.read_cache_hits),
            ("misses", m.read_cache_misses),
            ("inserted_pages", m.read_cache_inserted_pages),
            ("evicted_pages", m.read_cache_evictions),
        ] {
            let _ = writeln!(out, "tidepool_read_cache_total{{what=\"{what}\"}} {n}");
        }
        let _ = writeln!(
            out,
            "# HELP tidepool_read_cache_bytes Bytes the read cache holds (pages and their overhead).\n# TYPE tidepool_read_cache_bytes gauge\ntidepool_read_cache_bytes {}",
            m.read_cache_bytes
        );
        let _ = writeln!(
            out,
            "# HELP tidepool_read_cache_capacity_bytes The read cache's limit (read_cache_bytes; 0: off).\n# TYPE tidepool_read_cache_capacity_bytes gauge\ntidepool_read_cache_capacity_bytes {}",
            m.read_cache_capacity_bytes
        );
        let _ = writeln!(
            out,
            "# HELP tidepool_tier_total Tiering engine counters (uploads, eviction, read-through, gc).\n# TYPE tidepool_tier_total counter"
        );
        for (name, n) in self.tier.counters().snapshot() {
            let _ = writeln!(out, "tidepool_tier_total{{what=\"{name}\"}} {n}");
        }
        self.s3_metrics.render(&mut out);
        self.nfs_metrics.render(&mut out);
        out
    }
}

/// Serve until the task is dropped/aborted.
pub async fn serve(listener: TcpListener, src: Arc<StatusSource>) {
    loop {
        let Ok((mut sock, _)) = listener.accept().await else { continue };
        let src = src.clone();
        tokio::spawn(async move {
            let (code, ctype, body) = match read_request(&mut sock).await {
                Ok(req) => route(&src, req).await,
                Err(msg) => ("400 Bad Request", "text/plain", format!("{msg}\n")),
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

struct Request {
    method: String,
    path: String,
    authorization: Option<String>,
    body: Vec<u8>,
}

/// Read one request: the head (bounded), then a Content-Length body (bounded).
async fn read_request(sock: &mut tokio::net::TcpStream) -> Result<Request, &'static str> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        if buf.len() > HEAD_MAX {
            return Err("request head too large");
        }
        match tokio::time::timeout(std::time::Duration::from_secs(10), sock.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err("incomplete request"),
            Ok(Ok(k)) => buf.extend_from_slice(&chunk[..k]),
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let mut parts = lines.next().unwrap_or("").split_whitespace();
    let (method, path) = (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
    let (mut authorization, mut len) = (None, 0usize);
    for line in lines {
        let Some((k, v)) = line.split_once(':') else { continue };
        let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
        match k.as_str() {
            "authorization" => authorization = Some(v.to_string()),
            "content-length" => len = v.parse().map_err(|_| "bad content-length")?,
            "transfer-encoding" => return Err("only content-length bodies"),
            _ => {}
        }
    }
    if len > BODY_MAX {
        return Err("request body too large");
    }
    let mut body = buf[head_end..].to_vec();
    while body.len() < len {
        match tokio::time::timeout(std::time::Duration::from_secs(10), sock.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) | Err(_) => return Err("incomplete request body"),
            Ok(Ok(k)) => body.extend_from_slice(&chunk[..k]),
        }
    }
    body.truncate(len);
    Ok(Request { method, path, authorization, body })
}

fn status_line(code: u16) -> &'static str {
    match code {
        200 => "200 OK",
        400 => "400 Bad Request",
        404 => "404 Not Found",
        401 => "401 Unauthorized",
        409 => "409 Conflict",
        503 => "503 Service Unavailable",
        _ => "500 Internal Server Error",
    }
}

/// The admin routes' gate: this node has them (404 otherwise) and the caller sent the admin
/// token derived from the node key (401 otherwise).
fn admin_gate(src: &StatusSource, req: &Request) -> Result<(), (&'static str, &'static str, String)> {
    let Some(admin) = &src.admin else {
        return Err(("404 Not Found", "text/plain", "no admin routes on this node\n".into()));
    };
    let token = req.authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
    if !admin.node_key.check_admin_token(token.trim()) {
        let msg = "missing or wrong admin token: the CLI sends it (derived from <data_dir>/node.key)";
        return Err(("401 Unauthorized", "application/json", serde_json::json!({ "error": msg }).to_string()));
    }
    Ok(())
}

async fn route(src: &StatusSource, req: Request) -> (&'static str, &'static str, String) {
    let json = "application/json";
    if let Some(query) = req.path.strip_prefix("/tier/status") {
        let (code, body) = crate::tier::status_route(&src.tier, query.trim_start_matches('?'));
        return (status_line(code), json, body);
    }
    if req.path == "/spin-down/status" || req.path == "/rehydrate/status" {
        let (code, body) =
            crate::spin::route(&src.tier, &src.manifest_settings, &src.object_store, &req.method, &req.path).await;
        return (status_line(code), json, body);
    }
    if req.path == "/admin/spin-down" || req.path == "/admin/snapshot" {
        if let Err(refused) = admin_gate(src, &req) {
            return refused;
        }
        if let Some(cluster) = &src.cluster
            && let Some((code, body)) = crate::cluster_cmd::not_leader(cluster, &src.fs, &req.path)
        {
            return (status_line(code), json, body);
        }
        // A spin-down freezes writes on every node through the meta group (`Fs::freeze`).
        let (code, body) =
            crate::spin::route(&src.tier, &src.manifest_settings, &src.object_store, &req.method, &req.path).await;
        return (status_line(code), json, body);
    }
    if req.path.starts_with("/admin/tier/") || req.path == "/admin/pin" || req.path == "/admin/unpin" {
        if let Err(refused) = admin_gate(src, &req) {
            return refused;
        }
        if req.method != "POST" {
            return ("405 Method Not Allowed", "text/plain", "only POST\n".into());
        }
        if crate::cluster_cmd::leader_only(&req.path)
            && let Some(cluster) = &src.cluster
            && let Some((code, body)) = crate::cluster_cmd::not_leader(cluster, &src.fs, &req.path)
        {
            return (status_line(code), json, body);
        }
        let (code, body) = crate::tier::admin_route(&src.tier, &req.path, &req.body).await;
        return (status_line(code), json, body);
    }
    if req.path == "/admin/node/remove" {
        let Some(cluster) = &src.cluster else {
            return ("404 Not Found", "text/plain", "no admin routes on this node\n".into());
        };
        if let Err(refused) = admin_gate(src, &req) {
            return refused;
        }
        if req.method != "POST" {
            return ("405 Method Not Allowed", "text/plain", "only POST\n".into());
        }
        if let Some((code, body)) = crate::cluster_cmd::not_leader(cluster, &src.fs, &req.path) {
            return (status_line(code), json, body);
        }
        let (code, body) = crate::cluster_cmd::remove_route(cluster, &src.fs, &src.tier, &req.body).await;
        return (status_line(code), json, body);
    }
    if req.path == "/admin/keys" || req.path.starts_with("/admin/keys/") {
        let Some(admin) = &src.admin else {
            return ("404 Not Found", "text/plain", "no admin routes on this node\n".into());
        };
        let token = req.authorization.as_deref().and_then(|a| a.strip_prefix("Bearer ")).unwrap_or("");
        if !admin.node_key.check_admin_token(token.trim()) {
            let msg = "missing or wrong admin token: `tidepool keys` sends it (derived from <data_dir>/node.key)";
            return ("401 Unauthorized", json, serde_json::json!({ "error": msg }).to_string());
        }
        let (code, body) = admin.handle(&req.method, &req.path, &req.body).await;
        return (status_line(code), json, body);
    }
    match (req.method.as_str(), req.path.as_str()) {
        ("GET", "/metrics") => ("200 OK", "text/plain; version=0.0.4", src.metrics_text()),
        ("GET", "/status") => {
            let mut v = src.status_json();
            if let Some(c) = &src.cluster {
                v["cluster"] = c.nodes_json(&src.fs).await;
            }
            ("200 OK", json, v.to_string())
        }
        ("GET", "/cluster") => match &src.cluster {
            Some(c) => ("200 OK", json, c.nodes_json(&src.fs).await.to_string()),
            None => ("404 Not Found", "text/plain", "no cluster on this node\n".into()),
        },
        ("GET", _) => ("404 Not Found", "text/plain", "not found: try /status or /metrics\n".into()),
        _ => ("405 Method Not Allowed", "text/plain", "only GET\n".into()),
    }
}

/// A GET for `tidepool status` (blocking, std only).
pub fn get(addr: &str, path: &str) -> std::io::Result<String> {
    let (code, body) = request(addr, "GET", path, None, "")?;
    if code != 200 {
        return Err(std::io::Error::other(format!("status endpoint answered {code}")));
    }
    Ok(body)
}

/// One request (blocking, std only): `(status code, body)`.
pub fn request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> std::io::Result<(u16, String)> {
    request_with_timeout(addr, method, path, token, body, 30)
}

/// [`request`] with a read timeout of `timeout_secs` (long work: `tier fetch`, `tier flush`).
pub fn request_with_timeout(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
    timeout_secs: u64,
) -> std::io::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(timeout_secs)))?;
    let auth = token.map(|t| format!("authorization: Bearer {t}\r\n")).unwrap_or_default();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nhost: {addr}\r\n{auth}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    let code =
        head.strip_prefix("HTTP/1.1 ").and_then(|r| r.get(..3)).and_then(|c| c.parse().ok()).ok_or_else(|| {
            std::io::Error::other(format!("not an HTTP answer: {}", head.lines().next().unwrap_or("")))
        })?;
    Ok((code, body.to_string()))
}
