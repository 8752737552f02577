//! Spin-down and rehydrate from the command line: `tidepool spin-down`, `tidepool snapshot`,
//! `tidepool rehydrate status`, the state `up --from` keeps in the data folder so a crash
//! during rehydration resumes, and the node's side of their HTTP routes.
//!
//! `<data_dir>/rehydrate.json` (written crash-safely once the manifest's metadata is durable
//! in the meta group) says where the namespace came from and whether rehydration finished;
//! `<data_dir>/rehydrate.heat` keeps the manifest's access heat for the rehydration order.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tidepool_tiering::Tier;
use tidepool_tiering::engine::RehydrateMode;

use crate::datadir::anyhow_free::Result;
use crate::datadir::write_atomic;
use crate::http;
use crate::nodekey::NodeKey;
use crate::settings::{Settings, human_bytes};

const MARKER: &str = "rehydrate.json";
const HEAT: &str = "rehydrate.heat";

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Marker {
    pub from: String,
    pub epoch: u64,
    /// `eager`, `lazy` or `paths=/a,/b`.
    pub mode: String,
    pub done: bool,
}

pub fn read_marker(data_dir: &Path) -> Result<Option<Marker>> {
    match std::fs::read(data_dir.join(MARKER)) {
        Ok(b) => Ok(Some(
            serde_json::from_slice(&b).map_err(|e| format!("{}: corrupt ({e})", data_dir.join(MARKER).display()))?,
        )),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

pub fn write_marker(data_dir: &Path, m: &Marker) -> Result<()> {
    write_atomic(&data_dir.join(MARKER), &serde_json::to_vec_pretty(m)?)?;
    Ok(())
}

pub fn write_heat(data_dir: &Path, heat: &BTreeMap<u64, u64>) -> Result<()> {
    write_atomic(&data_dir.join(HEAT), &postcard::to_stdvec(heat)?)?;
    Ok(())
}

pub fn read_heat(data_dir: &Path) -> BTreeMap<u64, u64> {
    std::fs::read(data_dir.join(HEAT)).ok().and_then(|b| postcard::from_bytes(&b).ok()).unwrap_or_default()
}

/// The settings a manifest carries (informational: a new cluster uses its own).
pub fn manifest_settings(s: &Settings) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("block_size".into(), s.block_size.0.to_string()),
        ("pack_threshold".into(), s.pack_threshold.0.to_string()),
        ("chunk_object_size".into(), s.chunk_object_size.0.to_string()),
        ("pack_object_size".into(), s.pack_object_size.0.to_string()),
        ("tier_after_secs".into(), s.tier_after_secs.to_string()),
        ("tidepool_version".into(), env!("CARGO_PKG_VERSION").into()),
    ])
}

/// Runs rehydration in the background of `up`, with a progress bar on a terminal (log lines
/// otherwise); marks the marker done and leaves the measured throughput in the bucket
/// (`stats/rehydrate.json`, read by `tidepool cost`).
pub fn spawn_rehydrate(tier: Arc<Tier>, data_dir: std::path::PathBuf, marker: Marker) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mode: RehydrateMode = match marker.mode.parse() {
            Ok(m) => m,
            Err(e) => {
                tracing::error!(error = %e, "rehydrate: bad mode in the marker");
                return;
            }
        };
        let heat = read_heat(&data_dir);
        let progress = tier.rehydrate_progress().clone();
        let show = tokio::spawn(show_progress(progress.clone()));
        let res = tier.rehydrate(mode, &heat).await;
        show.abort();
        let st = progress.status();
        match res {
            Ok(true) => {
                println!(
                    "rehydrated {} files, {} in {:.1} s ({}/s)",
                    st.files_done,
                    human_bytes(st.bytes_done),
                    st.elapsed_secs,
                    human_bytes(st.rate_bytes_per_sec as u64)
                );
                let done = Marker { done: true, ..marker };
                if let Err(e) = write_marker(&data_dir, &done) {
                    tracing::warn!(error = %e, "rehydrate: cannot mark done");
                }
                let fetched = progress.bytes_fetched.load(std::sync::atomic::Ordering::SeqCst);
                let stats = serde_json::json!({
                    "bytes": fetched,
                    "secs": st.elapsed_secs,
                    "finished_unix": std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()),
                });
                if fetched > 0
                    && let Err(e) =
                        tier.object_store().put("stats/rehydrate.json", stats.to_string().into_bytes().into()).await
                {
                    tracing::warn!(error = %e, "rehydrate: cannot record the throughput in the bucket");
                }
            }
            Ok(false) => tracing::warn!(reason = ?st.stopped_reason, "rehydrate: stopped before the end"),
            Err(e) => tracing::error!(error = %e, "rehydrate: failed; it resumes at the next start"),
        }
    })
}

async fn show_progress(p: Arc<tidepool_tiering::engine::RehydrateProgress>) {
    use std::io::IsTerminal;
    let tty = std::io::stderr().is_terminal();
    let bar = indicatif::ProgressBar::new(0);
    if tty {
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "rehydrating {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
    } else {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    let mut ticks = 0u64;
    loop {
        let st = p.status();
        bar.set_length(st.bytes_total);
        bar.set_position(st.bytes_done);
        bar.set_message(format!("{}/{} files", st.files_done, st.files_total));
        if !tty && ticks.is_multiple_of(25) {
            tracing::info!(
                files_done = st.files_done,
                files_total = st.files_total,
                bytes_done = st.bytes_done,
                bytes_total = st.bytes_total,
                "rehydrating"
            );
        }
        ticks += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// `tidepool spin-down`: starts it on the node, then shows its progress until it is done.
pub fn spin_down(addr: &str, data_dir: &Path) -> Result<()> {
    let token = NodeKey::read(data_dir)
        .map_err(|e| format!("{e}; spin-down needs read access to the node's data folder (--data-dir)"))?
        .admin_token();
    let (code, body) = http::request(addr, "POST", "/admin/spin-down", Some(&token), "{}")
        .map_err(|e| format!("cannot reach the node at {addr}: {e} (is `tidepool up` running?)"))?;
    if code != 200 {
        return Err(error_of(&body).into());
    }
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{msg:24} {bar:30} {bytes}/{total_bytes} {binary_bytes_per_sec} eta {eta}",
        )
        .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
    );
    loop {
        let (_, body) = http::request(addr, "GET", "/spin-down/status", None, "")?;
        let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| body.clone())?;
        let g = |k: &str| v[k].as_u64().unwrap_or(0);
        bar.set_length(g("dirty_bytes_start"));
        bar.set_position(g("dirty_bytes_start").saturating_sub(g("dirty_bytes_now")));
        let files_left = g("dirty_files_now").min(g("dirty_files_start"));
        bar.set_message(format!(
            "{} {}/{} files",
            v["phase"].as_str().unwrap_or(""),
            g("dirty_files_start") - files_left,
            g("dirty_files_start")
        ));
        match v["phase"].as_str() {
            Some("done") => {
                bar.finish_and_clear();
                let r = &v["report"];
                println!(
                    "uploaded {} of dirty data from {} files; manifest epoch {} ({} files, {} in {} objects) at {}/{}",
                    human_bytes(g("dirty_bytes_start")),
                    g("dirty_files_start"),
                    r["epoch"],
                    r["files"],
                    human_bytes(r["object_bytes"].as_u64().unwrap_or(0)),
                    r["objects"],
                    v["bucket"].as_str().unwrap_or("?"),
                    r["key"].as_str().unwrap_or("?"),
                );
                println!("LATEST now points at it. The namespace is read-only; the nodes may now be terminated.");
                println!("Bring it back with: tidepool up --from {}", v["bucket"].as_str().unwrap_or("<bucket url>"));
                return Ok(());
            }
            Some("failed") => {
                bar.finish_and_clear();
                return Err(format!(
                    "spin-down failed: {} (run `tidepool spin-down` again: it finishes the job)",
                    v["error"].as_str().unwrap_or("?")
                )
                .into());
            }
            _ => std::thread::sleep(Duration::from_millis(300)),
        }
    }
}

/// `tidepool snapshot`: a manifest now.
pub fn snapshot(addr: &str, data_dir: &Path) -> Result<()> {
    let token = NodeKey::read(data_dir)
        .map_err(|e| format!("{e}; snapshot needs read access to the node's data folder (--data-dir)"))?
        .admin_token();
    let (code, body) = http::request_with_timeout(addr, "POST", "/admin/snapshot", Some(&token), "{}", 3600)
        .map_err(|e| format!("cannot reach the node at {addr}: {e} (is `tidepool up` running?)"))?;
    if code != 200 {
        return Err(error_of(&body).into());
    }
    let r: serde_json::Value = serde_json::from_str(&body).map_err(|_| body.clone())?;
    println!(
        "manifest epoch {} written ({} files, {} parts; {} uploaded for it); LATEST points at it",
        r["epoch"],
        r["files"],
        r["parts"],
        human_bytes(r["uploaded_bytes"].as_u64().unwrap_or(0))
    );
    Ok(())
}

/// `tidepool rehydrate status`.
pub fn rehydrate_status(addr: &str, json: bool) -> Result<()> {
    let (_, body) = http::request(addr, "GET", "/rehydrate/status", None, "")
        .map_err(|e| format!("cannot reach the node at {addr}: {e} (is `tidepool up` running?)"))?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|_| body.clone())?;
    let g = |k: &str| v[k].as_u64().unwrap_or(0);
    let state = if v["finished"].as_bool() == Some(true) {
        "finished"
    } else if v["active"].as_bool() == Some(true) {
        "running"
    } else {
        "not running"
    };
    println!("rehydration   {state} ({})", v["mode"]);
    println!("files         {} / {}", g("files_done"), g("files_total"));
    println!(
        "bytes         {} / {} ({:.1} %)",
        human_bytes(g("bytes_done")),
        human_bytes(g("bytes_total")),
        v["percent"].as_f64().unwrap_or(0.0)
    );
    println!("rate          {}/s", human_bytes(v["rate_bytes_per_sec"].as_f64().unwrap_or(0.0) as u64));
    if let Some(eta) = v["eta_secs"].as_f64() {
        println!("eta           {eta:.0} s");
    }
    if let Some(r) = v["stopped_reason"].as_str() {
        println!("stopped       {r}");
    }
    Ok(())
}

fn error_of(body: &str) -> String {
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["error"].as_str().map(str::to_string))
        .unwrap_or_else(|| body.to_string())
}

/// The node's side of `/admin/spin-down` (starts it), `/spin-down/status`, `/admin/snapshot`,
/// `/rehydrate/status`. `(code, json)`. `bucket_url` is the bucket as `up --from` takes it (the
/// object store's own description names its wrappers, e.g. `faulty(...)` in tests).
pub async fn route(
    tier: &Arc<Tier>,
    settings: &BTreeMap<String, String>,
    bucket_url: &str,
    method: &str,
    path: &str,
) -> (u16, String) {
    let err = |code: u16, msg: String| (code, serde_json::json!({ "error": msg }).to_string());
    match (method, path) {
        ("POST", "/admin/spin-down") => {
            if tier.spin_down_progress().running.load(std::sync::atomic::Ordering::SeqCst) {
                return (200, serde_json::json!({ "started": false, "running": true }).to_string());
            }
            let (t, s) = (tier.clone(), settings.clone());
            // Marked running before the answer, so a status poll never sees "idle" first.
            tier.spin_down_progress().phase.store(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                if let Err(e) = t.spin_down(s).await {
                    tracing::error!(error = %e, "spin-down failed");
                }
            });
            (200, serde_json::json!({ "started": true }).to_string())
        }
        ("GET", "/spin-down/status") => {
            let p = tier.spin_down_progress();
            let phase = match p.phase.load(std::sync::atomic::Ordering::SeqCst) {
                0 => "idle",
                1 => "uploading",
                2 => "manifest",
                3 => "done",
                _ => "failed",
            };
            let (dirty_now, files_now) = tier.dirty_now().unwrap_or((0, 0));
            let result = p.result.lock().map(|r| r.clone()).unwrap_or(None);
            let g = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::SeqCst);
            let v = serde_json::json!({
                "phase": phase,
                "bucket": bucket_url,
                "dirty_bytes_start": g(&p.dirty_bytes_start),
                "dirty_files_start": g(&p.dirty_files_start),
                "dirty_bytes_now": dirty_now,
                "dirty_files_now": files_now,
                "report": result.as_ref().and_then(|r| r.as_ref().ok()),
                "error": result.as_ref().and_then(|r| r.as_ref().err()),
            });
            (200, v.to_string())
        }
        ("POST", "/admin/snapshot") => match tier.write_manifest(settings.clone()).await {
            Ok(r) => (200, serde_json::to_string(&r).unwrap_or_default()),
            Err(e) => err(503, e.to_string()),
        },
        ("GET", "/rehydrate/status") => {
            (200, serde_json::to_string(&tier.rehydrate_progress().status()).unwrap_or_default())
        }
        _ => err(404, format!("no such route {method} {path}")),
    }
}
