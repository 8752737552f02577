//! `tidepool tier status|fetch|release|flush` and `tidepool pin|unpin`: thin clients of the
//! running node's HTTP endpoint (status is open like `/status`; the others change state and
//! need the admin token, derived from `<data_dir>/node.key`), and the node's side of them.

use std::path::Path;
use std::sync::Arc;

use clap::Subcommand;
use tidepool_tiering::Tier;

use crate::datadir::anyhow_free::Result;
use crate::http;
use crate::nodekey::NodeKey;
use crate::settings::human_bytes;

#[derive(Subcommand)]
pub enum TierCmd {
    /// Dirty / clean / cold bytes and files below PATH (default /), residency, oldest dirty age.
    Status {
        path: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// Bring every block below PATH onto NVMe.
    Fetch { path: String },
    /// Drop the NVMe copies of the clean blocks below PATH (they stay in the bucket).
    Release { path: String },
    /// Upload every dirty block now, whatever its age.
    Flush,
}

/// POSTs `{"path": path}` to an admin route of the running node; the answer as JSON.
fn call(addr: &str, data_dir: &Path, route: &str, path: &str) -> Result<serde_json::Value> {
    let node_key = NodeKey::read(data_dir)
        .map_err(|e| format!("{e}; this command needs read access to the node's data folder (--data-dir)"))?;
    let body = serde_json::json!({ "path": path }).to_string();
    let (code, answer) = http::request_with_timeout(addr, "POST", route, Some(&node_key.admin_token()), &body, 3600)
        .map_err(|e| format!("cannot reach the node at {addr}: {e} (is `tidepool up` running?)"))?;
    let v: serde_json::Value = serde_json::from_str(&answer).unwrap_or(serde_json::json!({ "error": answer }));
    if code != 200 {
        return Err(v.get("error").and_then(|e| e.as_str()).unwrap_or(&answer).to_string().into());
    }
    Ok(v)
}

pub fn run(cmd: TierCmd, data_dir: &Path, addr: &str) -> Result<()> {
    match cmd {
        TierCmd::Status { path, json } => {
            let path = path.unwrap_or_else(|| "/".into());
            let (code, body) = http::request(addr, "GET", &format!("/tier/status?path={}", encode(&path)), None, "")
                .map_err(|e| format!("cannot reach the node at {addr}: {e} (is `tidepool up` running?)"))?;
            let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| body.clone())?;
            if code != 200 {
                return Err(v.get("error").and_then(|e| e.as_str()).unwrap_or(&body).to_string().into());
            }
            if json {
                println!("{v:#}");
            } else {
                print_status(&v);
            }
        }
        TierCmd::Fetch { path } => {
            let v = call(addr, data_dir, "/admin/tier/fetch", &path)?;
            println!("fetched {} blocks, {} onto NVMe", v["blocks"], human_bytes(v["bytes"].as_u64().unwrap_or(0)));
        }
        TierCmd::Release { path } => {
            let v = call(addr, data_dir, "/admin/tier/release", &path)?;
            println!("released {} blocks, {} from NVMe", v["blocks"], human_bytes(v["bytes"].as_u64().unwrap_or(0)));
        }
        TierCmd::Flush => {
            let v = call(addr, data_dir, "/admin/tier/flush", "/")?;
            println!(
                "uploaded {} objects, {} blocks, {}",
                v["objects"],
                v["blocks"],
                human_bytes(v["bytes"].as_u64().unwrap_or(0))
            );
        }
    }
    Ok(())
}

/// `tidepool pin PATH` / `tidepool unpin PATH`.
pub fn pin(path: &str, pinned: bool, data_dir: &Path, addr: &str) -> Result<()> {
    call(addr, data_dir, if pinned { "/admin/pin" } else { "/admin/unpin" }, path)?;
    println!("{} {path}", if pinned { "pinned" } else { "unpinned" });
    Ok(())
}

fn print_status(v: &serde_json::Value) {
    let p = &v["path"];
    let b = |x: &serde_json::Value| human_bytes(x.as_u64().unwrap_or(0));
    println!("bucket        {}", v["bucket"].as_str().unwrap_or("?"));
    println!(
        "path          {}{}",
        p["path"].as_str().unwrap_or("?"),
        if p["pinned"].as_bool() == Some(true) { " (pinned)" } else { "" }
    );
    println!("files         {}", p["files"]);
    println!("dirty         {} in {} files (NVMe only)", b(&p["dirty_bytes"]), p["dirty_files"]);
    println!("clean         {} in {} files (NVMe and bucket)", b(&p["clean_bytes"]), p["clean_files"]);
    println!("cold          {} in {} files (bucket only)", b(&p["cold_bytes"]), p["cold_files"]);
    println!("resident      {:.1} %", p["resident_percent"].as_f64().unwrap_or(0.0));
    println!("oldest dirty  {:.1} s", p["oldest_dirty_secs"].as_f64().unwrap_or(0.0));
    println!("bucket holds  {} objects, {} ({} live)", v["objects"], b(&v["bucket_bytes"]), b(&v["bucket_live_bytes"]));
    if let Some(e) = v["last_upload_error"].as_str() {
        println!("last upload error: {e}");
    }
}

/// Percent-encodes a path for a query string.
fn encode(s: &str) -> String {
    s.bytes()
        .map(|c| match c {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => (c as char).to_string(),
            _ => format!("%{c:02X}"),
        })
        .collect()
}

/// Decodes a percent-encoded query value.
fn decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let h = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
                out.push(u8::from_str_radix(h, 16).ok()?);
                i += 3;
            }
            b'+' => {
                out.push(b' ');
                i += 1;
            }
            c => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8(out).ok()
}

/// The node's side: `GET /tier/status?path=P`. `(code, json)`.
pub fn status_route(tier: &Tier, query: &str) -> (u16, String) {
    let path = query
        .split('&')
        .find_map(|kv| kv.strip_prefix("path="))
        .map(|p| decode(p).unwrap_or_default())
        .unwrap_or_else(|| "/".into());
    match tier.status(&path) {
        Ok(st) => (200, serde_json::to_string(&st).unwrap_or_default()),
        Err(e) => (404, serde_json::json!({ "error": e.to_string() }).to_string()),
    }
}

/// The node's side of the admin routes (the caller checked the token). `(code, json)`.
pub async fn admin_route(tier: &Arc<Tier>, route: &str, body: &[u8]) -> (u16, String) {
    let err = |code: u16, msg: String| (code, serde_json::json!({ "error": msg }).to_string());
    let path = match serde_json::from_slice::<serde_json::Value>(body) {
        Ok(v) => v.get("path").and_then(|p| p.as_str()).unwrap_or("/").to_string(),
        Err(e) => return err(400, format!("bad request body: {e}")),
    };
    let to_code = |e: &tidepool_tiering::TierEngineError| match e {
        tidepool_tiering::TierEngineError::Fs(f) if f.kind() == tidepool_fs::ErrorKind::NotFound => 404,
        tidepool_tiering::TierEngineError::Object(_) => 503,
        _ => 500,
    };
    let res = match route {
        "/admin/tier/fetch" => tier.fetch_path(&path).await.map(|(b, n)| serde_json::json!({"blocks": b, "bytes": n})),
        "/admin/tier/release" => {
            tier.release_path(&path).await.map(|(b, n)| serde_json::json!({"blocks": b, "bytes": n}))
        }
        "/admin/tier/flush" => tier.flush_all().await.map(|r| serde_json::to_value(r).unwrap_or_default()),
        "/admin/pin" => tier.set_pin(&path, true).await.map(|()| serde_json::json!({"pinned": path})),
        "/admin/unpin" => tier.set_pin(&path, false).await.map(|()| serde_json::json!({"unpinned": path})),
        _ => return err(404, format!("no such route {route}")),
    };
    match res {
        Ok(v) => (200, v.to_string()),
        Err(e) => err(to_code(&e), e.to_string()),
    }
}
