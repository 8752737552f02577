//! tidepool: the one binary. Parses the command line, loads settings, wires the layers
//! together (see `node`) and runs a subcommand.

mod bench;
mod bucket;
mod cluster;
mod cluster_cmd;
mod cost;
mod datadir;
mod http;
mod keys;
mod node;
mod nodekey;
mod offline;
mod raftsnap;
mod settings;
mod spin;
mod tier;
mod up;
mod workload;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

use datadir::anyhow_free::Result;
use settings::Settings;

#[derive(Parser)]
#[command(
    name = "tidepool",
    version,
    about = "Tiered NVMe storage for GPU clusters: local NVMe hot, S3/Azure Blob cold"
)]
struct Cli {
    /// Settings file (default: ./tidepool.toml when it exists). TIDEPOOL_* variables override it.
    #[arg(long, global = true)]
    config: Option<PathBuf>,
    /// Data folder (overrides the `data_dir` setting).
    #[arg(long, global = true)]
    data_dir: Option<PathBuf>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a node: a file as the NVMe device, a folder as the object store, the S3 endpoint, the status endpoint.
    Up {
        /// The cold tier (`s3://bucket/prefix`, `az://container/prefix`, `file:///path`);
        /// overrides the `bucket` setting.
        #[arg(long)]
        bucket: Option<String>,
        /// Start a NEW node (empty data folder) from the bucket's latest manifest, as left by
        /// `tidepool spin-down` (`s3://bucket/prefix`, `az://...`, `file:///...`).
        #[arg(long)]
        from: Option<String>,
        /// With --from: `eager` (everything back onto NVMe in the background), `lazy` (only
        /// what is read), or `paths=/a,/b`.
        #[arg(long, default_value = "eager")]
        rehydrate: String,
        /// With --from: start even though a spin-down to that bucket did not finish.
        #[arg(long)]
        force: bool,
        /// Join the cluster of the node whose transport (cluster_listen) is at ADDR; overrides
        /// the `join` setting. A new data folder becomes a new node of that cluster.
        #[arg(long, value_name = "ADDR")]
        join: Option<String>,
        /// The cluster token (`tidepool cluster token` on a cluster node); overrides
        /// `cluster_token`.
        #[arg(long)]
        token: Option<String>,
    },
    /// Make the filesystem read-only, upload every dirty block, write a manifest and switch
    /// LATEST to it: afterwards the nodes may be terminated.
    SpinDown,
    /// Write a manifest of the metadata now (as the periodic snapshots do).
    Snapshot,
    /// Rehydration after `up --from`: `tidepool rehydrate status`.
    #[command(subcommand)]
    Rehydrate(RehydrateCmd),
    /// Show what a running node is doing.
    Status {
        /// Status endpoint (default: the `http_listen` setting).
        #[arg(long)]
        addr: Option<String>,
        /// Print the raw JSON.
        #[arg(long)]
        json: bool,
    },
    /// The nodes of the cluster: list, remove.
    #[command(subcommand)]
    Node(cluster_cmd::NodeCmd),
    /// The cluster: `tidepool cluster token`.
    #[command(subcommand)]
    Cluster(cluster_cmd::ClusterCmd),
    /// S3 access keys of the running node: create, list, revoke.
    #[command(subcommand)]
    Keys(keys::KeysCmd),
    /// The cold tier of the running node: status, fetch, release, flush.
    #[command(subcommand)]
    Tier(tier::TierCmd),
    /// Keep the files below PATH on NVMe (never evicted, rehydrated first).
    Pin { path: String },
    /// Undo `tidepool pin`.
    Unpin { path: String },
    /// Work on a stopped node's data folder directly (no front end needed).
    #[command(subcommand)]
    Fs(offline::FsCmd),
    /// Crash-test workload: writes through the fs API and prints each acknowledged write.
    Workload(workload::Args),
    /// Benchmarks (release build recommended).
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Monthly cost running all day versus spun down part of it (instances, bucket, requests),
    /// and the rehydrate time, from deploy/pricing.toml (or --pricing FILE) and the bucket.
    Cost(cost::Args),
}

#[derive(Subcommand)]
enum RehydrateCmd {
    /// Files and bytes done / total, rate and ETA.
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn main() {
    let cli = Cli::parse();
    // A server logs what it does; a one-shot command only what went wrong. s3s logs every
    // S3 error answer (a 404 included) at error level: the S3 front end logs its own failures.
    let default = if matches!(cli.cmd, Cmd::Up { .. }) { "info,s3s=off" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_env("TIDEPOOL_LOG").unwrap_or_else(|_| default.into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
    if let Err(e) = run(cli) {
        eprintln!("error: {e}");
        let mut src = e.source();
        while let Some(s) = src {
            eprintln!("  caused by: {s}");
            src = s.source();
        }
        std::process::exit(1);
    }
}

fn load_settings(cli: &Cli) -> Result<Settings> {
    let mut s = Settings::load(cli.config.as_deref(), std::env::vars())?;
    if let Some(d) = &cli.data_dir {
        s.data_dir = d.clone();
    }
    Ok(s)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn run(cli: Cli) -> Result<()> {
    let mut settings = load_settings(&cli)?;
    match cli.cmd {
        Cmd::Up { bucket, from, rehydrate, force, join, token } => {
            if let Some(j) = join {
                settings.join = Some(j);
            }
            if let Some(t) = token {
                settings.cluster_token = Some(t);
                settings.cluster_token_file = None;
            }
            settings.validate()?;
            if let Some(b) = bucket {
                tidepool_tiering::parse_bucket_url(&b)?;
                settings.bucket = Some(b);
            }
            let from = match from {
                Some(url) => {
                    tidepool_tiering::parse_bucket_url(&url)?;
                    rehydrate.parse::<tidepool_tiering::engine::RehydrateMode>()?;
                    Some((url, rehydrate))
                }
                None => None,
            };
            runtime()?.block_on(up::run(settings, from, force))
        }
        Cmd::SpinDown => spin::spin_down(&settings.http_listen, &settings.data_dir),
        Cmd::Snapshot => spin::snapshot(&settings.http_listen, &settings.data_dir),
        Cmd::Rehydrate(RehydrateCmd::Status { json }) => spin::rehydrate_status(&settings.http_listen, json),
        Cmd::Status { addr, json } => up::status(&addr.unwrap_or(settings.http_listen), json),
        Cmd::Node(cmd) => cluster_cmd::run_node(cmd, &settings.data_dir, &settings.http_listen),
        Cmd::Cluster(cmd) => cluster_cmd::run_cluster(cmd, &settings.data_dir),
        Cmd::Keys(cmd) => keys::run(cmd, &settings.data_dir, &settings.http_listen),
        Cmd::Tier(cmd) => tier::run(cmd, &settings.data_dir, &settings.http_listen),
        Cmd::Pin { path } => tier::pin(&path, true, &settings.data_dir, &settings.http_listen),
        Cmd::Unpin { path } => tier::pin(&path, false, &settings.data_dir, &settings.http_listen),
        Cmd::Fs(cmd) => runtime()?.block_on(offline::run(settings, cmd)),
        Cmd::Workload(args) => runtime()?.block_on(workload::run(settings, args)),
        Cmd::Bench(cmd) => runtime()?.block_on(bench::run(settings, cmd)),
        Cmd::Cost(args) => runtime()?.block_on(cost::run(settings, args)),
    }
}
