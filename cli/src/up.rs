//! `tidepool up` and `tidepool status`.

use std::sync::Arc;
use std::time::Instant;

use tidepool_nfs::{NfsMetrics, NfsServer, TidepoolNfs};
use tidepool_s3::{S3Metrics, S3Options, TidepoolS3};
use tokio::signal::unix::{SignalKind, signal};

use crate::datadir::anyhow_free::Result;
use crate::http::{self, StatusSource};
use crate::keys::{self, Admin, Banner, MetaKeys};
use crate::node::Node;
use crate::settings::{Settings, human_bytes};

pub async fn run(settings: Settings, from: Option<(String, String)>, force_from: bool) -> Result<()> {
    // Before anything is printed: a Ctrl-C right after the banner must be a clean stop.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let env_key = keys::env_key(|k| std::env::var(k).ok())?;
    let listener = tokio::net::TcpListener::bind(&settings.http_listen)
        .await
        .map_err(|e| format!("cannot listen on http_listen={}: {e}", settings.http_listen))?;
    let s3_listener = tokio::net::TcpListener::bind(&settings.s3_listen)
        .await
        .map_err(|e| format!("cannot listen on s3_listen={}: {e}", settings.s3_listen))?;
    let mut node = Node::open_from(settings, from, force_from).await?;
    // The NFS listener needs the filesystem, so it binds once the node is open (still before
    // the banner); a refused address stops the node cleanly.
    let nfs_metrics = Arc::new(NfsMetrics::default());
    let s = &node.settings;
    let exports = tidepool_nfs::ExportOptions {
        allowed_clients: s.nfs_allowed_clients.clone(),
        read_only: s.nfs_read_only,
        root_squash: s.nfs_root_squash,
        anon_uid: s.nfs_anon_uid,
        anon_gid: s.nfs_anon_gid,
    };
    let nfs = TidepoolNfs::new(&node.fs, &node.data.superblock.cluster_id, nfs_metrics.clone()).with_exports(exports);
    let nfs_server = match NfsServer::bind(&node.settings.nfs_listen, nfs).await {
        Ok(server) => server,
        Err(e) => {
            let msg = format!("cannot listen on nfs_listen={}: {e}", node.settings.nfs_listen);
            node.shutdown().await?;
            return Err(msg.into());
        }
    };
    let nfs_addr = nfs_server.local_addr();
    let s = &node.settings;
    let node_key = node.data.node_key.clone();
    let banner = keys::first_start(&node.fs, &node_key, node.data_dir(), env_key).await?;
    let s3_metrics = Arc::new(S3Metrics::default());
    let s3 = TidepoolS3::new(node.fs.clone(), S3Options { region: s.s3_region.clone() }, s3_metrics.clone()).await?;
    let service = tidepool_s3::build_service(s3, Arc::new(MetaKeys::new(node.fs.clone(), node_key.clone())));
    let s3_endpoint = format!("http://{}", s3_listener.local_addr()?);
    let src = Arc::new(StatusSource {
        fs: node.fs.clone(),
        started: Instant::now(),
        data_dir: node.data_dir().display().to_string(),
        device: s.device_path().display().to_string(),
        engine: node.engine.to_string(),
        object_store: s.bucket_url(),
        http: format!("http://{}", listener.local_addr()?),
        s3: s3_endpoint.clone(),
        s3_metrics: s3_metrics.clone(),
        nfs: format!("nfs://{nfs_addr}/"),
        nfs_metrics,
        admin: Some(Arc::new(Admin { fs: node.fs.clone(), node_key })),
        tier: node.tier.clone(),
        manifest_settings: crate::spin::manifest_settings(s),
        cluster: Some(node.cluster.clone()),
    });
    node.cluster.announce(&node.fs, s3_endpoint.clone(), format!("nfs://{nfs_addr}/"), src.http.clone());
    let stat = node.fs.stat();
    println!(
        "tidepool {} is up ({})",
        env!("CARGO_PKG_VERSION"),
        if node.data.fresh { "new data folder" } else { "existing data folder" }
    );
    println!("  data folder   {}", src.data_dir);
    println!("  NVMe device   {} ({}, {} engine)", src.device, human_bytes(stat.capacity_bytes), src.engine);
    println!("  object store  {} (write-back {} s after a write)", src.object_store, s.tier_after_secs);
    println!("  status        {}/status", src.http);
    println!("  metrics       {}/metrics", src.http);
    println!(
        "  namespace     {} files, {} directories, {} in files",
        stat.files,
        stat.dirs,
        human_bytes(stat.file_bytes)
    );
    println!("  S3            {s3_endpoint} (region {})", s.s3_region);
    match &banner {
        Banner::Key { id, secret, source } => {
            println!("  S3 key        access key id {id}  secret {secret}");
            println!("                ({source}; `tidepool keys create` makes more)");
            println!(
                "  try           AWS_ACCESS_KEY_ID={id} AWS_SECRET_ACCESS_KEY={secret} aws --endpoint-url {s3_endpoint} s3 ls"
            );
        }
        Banner::Ids(ids) => {
            println!("  S3 keys       {}", ids.join(", "));
            println!("                (secrets are shown once, at creation; `tidepool keys create` makes a new one)");
        }
    }
    let (nfs_ip, nfs_port) = (nfs_addr.ip(), nfs_addr.port());
    println!("  NFS           nfs://{nfs_addr}/ (NFSv3 + MOUNT over TCP, export /)");
    println!("  try           nfs-ls 'nfs://{nfs_ip}/?nfsport={nfs_port}&mountport={nfs_port}'");
    let clients: Vec<String> = s.nfs_allowed_clients.iter().map(|c| c.to_string()).collect();
    println!(
        "  NFS export    / to {} ({}{})",
        if clients.is_empty() { "nobody".to_string() } else { clients.join(", ") },
        if s.nfs_read_only { "read-only" } else { "read-write" },
        if s.nfs_root_squash { ", root squashed" } else { "" }
    );
    if node.report.orphans_freed > 0 || node.report.missing_blocks > 0 {
        println!(
            "  recovery      freed {} orphaned blocks; {} blocks missing",
            node.report.orphans_freed, node.report.missing_blocks
        );
    }
    if let Some(m) = &node.rehydrate {
        println!(
            "  rehydrate     {} from {} (manifest epoch {}; `tidepool rehydrate status`)",
            if m.done { "done".to_string() } else { m.mode.clone() },
            m.from,
            m.epoch
        );
    }
    crate::cluster_cmd::print_banner(&node.cluster, &node.fs, node.data_dir(), node.settings.replicas.unwrap_or(2));
    println!("Ctrl-C to stop.");
    node.start_tiering();
    node.start_rehydration();
    let server = tokio::spawn(http::serve(listener, src));
    let (stop_s3, s3_stopped) = tokio::sync::oneshot::channel::<()>();
    let s3_server = tokio::spawn(tidepool_s3::serve(s3_listener, service, s3_metrics, async {
        let _ = s3_stopped.await;
    }));
    let nfs_task = tokio::spawn(async move {
        if let Err(e) = nfs_server.serve().await {
            tracing::error!(error = %e, "nfs: the listener failed; NFS is no longer served");
        }
    });
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
    // S3 requests in flight finish (up to 10 s) before the filesystem stops.
    let _ = stop_s3.send(());
    let _ = s3_server.await;
    // nfsserve has no graceful stop: the accept loop ends here; calls still arriving on open
    // connections answer JUKEBOX once the filesystem is closed (the node holds it, NFS does not).
    nfs_task.abort();
    let _ = nfs_task.await;
    server.abort();
    let _ = server.await;
    node.shutdown().await?;
    println!("tidepool stopped cleanly");
    Ok(())
}

pub fn status(addr: &str, json: bool) -> Result<()> {
    let body = http::get(addr, "/status").map_err(|e| format!("no tidepool node answers at {addr}: {e}"))?;
    if json {
        println!("{body}");
        return Ok(());
    }
    let v: serde_json::Value = serde_json::from_str(&body)?;
    let b = |p: &str| v.pointer(p).and_then(|x| x.as_u64()).map(human_bytes).unwrap_or_else(|| "?".into());
    let n = |p: &str| v.pointer(p).map(|x| x.to_string()).unwrap_or_else(|| "?".into());
    println!("state          {} (up {}s)", v["state"].as_str().unwrap_or("?"), n("/uptime_secs"));
    println!("data folder    {}", v["data_dir"].as_str().unwrap_or("?"));
    println!(
        "NVMe           {} used of {} ({} live in {} blocks), {} engine",
        b("/block_store/used_bytes"),
        b("/block_store/capacity_bytes"),
        b("/block_store/live_bytes"),
        n("/block_store/blocks"),
        v.pointer("/device/engine").and_then(|x| x.as_str()).unwrap_or("?")
    );
    println!(
        "namespace      {} files, {} directories, {} in files",
        n("/fs/files"),
        n("/fs/dirs"),
        b("/fs/file_bytes")
    );
    println!(
        "meta group     leader {} term {} commit {} applied {} (snapshot at {}, log {})",
        n("/meta/leader_id"),
        n("/meta/term"),
        n("/meta/commit_index"),
        n("/meta/applied_index"),
        n("/meta/snapshot_index"),
        b("/meta/log_bytes")
    );
    println!(
        "object store   {} ({} dirty; {} objects uploaded, {} evicted, {} read through)",
        v.pointer("/object_store/url").and_then(|x| x.as_str()).unwrap_or("?"),
        b("/object_store/dirty_bytes"),
        n("/object_store/counters/uploaded_objects"),
        b("/object_store/counters/evicted_bytes"),
        b("/object_store/counters/read_through_bytes"),
    );
    if let Some(e) = v.pointer("/object_store/last_upload_error").and_then(|x| x.as_str()) {
        println!("               last upload failed: {e}");
    }
    if let Some(c) = v.get("cluster").filter(|c| c["nodes"].as_array().is_some_and(|n| n.len() > 1)) {
        println!();
        crate::cluster_cmd::print_nodes(c);
    }
    Ok(())
}
