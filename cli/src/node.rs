//! The composition root: turns settings into a running node (device -> block store ->
//! meta group -> fs, and the object store -> the tiering engine plugged into fs). The only
//! place that picks concrete implementations.

use std::path::Path;
use std::sync::Arc;

use tidepool_cluster::{MetaGroup, MetaState, RaftOptions, SystemClock};
use tidepool_fs::{Fs, FsOptions, OpenReport};
use tidepool_spdk::{BlockStore, EngineKind, OpenOptions, StoreOptions, open_device};
use tidepool_tiering::{Tier, TierConfig};

use crate::datadir::{DataDir, anyhow_free::Result};
use crate::settings::{EngineSetting, Settings};

pub struct Node {
    pub settings: Settings,
    pub data: DataDir,
    pub fs: Arc<Fs>,
    pub report: OpenReport,
    pub engine: EngineKind,
    /// The tiering engine (read-through works from open; uploads, eviction and GC run once
    /// `start_tiering` is called).
    pub tier: Arc<Tier>,
    tier_task: Option<tokio::task::JoinHandle<()>>,
    /// Set when this namespace came from a manifest (`up --from`): where from, and whether
    /// rehydration finished.
    pub rehydrate: Option<crate::spin::Marker>,
    rehydrate_task: Option<tokio::task::JoinHandle<()>>,
    /// The cluster side: transport, peer handler, address book (see `cluster`).
    pub cluster: Arc<crate::cluster::Cluster>,
}

fn tier_config(s: &Settings, capacity_bytes: u64) -> TierConfig {
    let d = TierConfig::for_capacity(capacity_bytes);
    TierConfig {
        tier_after: std::time::Duration::from_secs(s.tier_after_secs),
        retain_for: (s.retain_for_secs > 0).then(|| std::time::Duration::from_secs(s.retain_for_secs)),
        evict_high: s.evict_high,
        evict_low: s.evict_low,
        pack_threshold_bytes: s.pack_threshold.0,
        chunk_object_bytes: s.chunk_object_size.0,
        pack_object_bytes: s.pack_object_size.0,
        dirty_high_bytes: s.dirty_high.map_or(d.dirty_high_bytes, |b| b.0),
        dirty_limit_bytes: s.dirty_limit.map_or(d.dirty_limit_bytes, |b| b.0),
        upload_parallelism: s.upload_parallelism,
        gc_interval: std::time::Duration::from_secs(s.gc_interval_secs),
        snapshot_interval: (s.snapshot_interval_secs > 0)
            .then(|| std::time::Duration::from_secs(s.snapshot_interval_secs)),
        manifest_retain: s.manifest_retain,
        rehydrate_parallelism: s.rehydrate_parallelism,
        ..d
    }
}

fn store_options(s: &Settings) -> StoreOptions {
    StoreOptions {
        max_block_bytes: s.block_size.0 as usize,
        segment_bytes: s.segment_size.0,
        ..StoreOptions::default()
    }
}

fn device_options(s: &Settings) -> OpenOptions {
    OpenOptions {
        create_size_bytes: Some(s.device_size.0),
        queue_depth: s.queue_depth,
        engine: match s.device_engine {
            EngineSetting::Auto => None,
            EngineSetting::IoUring => Some(EngineKind::Uring),
            EngineSetting::Posix => Some(EngineKind::Posix),
        },
    }
}

/// The bucket a data folder tiers to is fixed at its first start (`<data_dir>/bucket.url`):
/// a restart without `--bucket` keeps it, and a different one is refused, since the
/// metadata points into the first one.
fn bind_bucket(data_dir: &Path, s: &Settings) -> Result<String> {
    let path = data_dir.join("bucket.url");
    match std::fs::read_to_string(&path) {
        Ok(recorded) => {
            let recorded = recorded.trim().to_string();
            match &s.bucket {
                Some(asked) if asked.trim_end_matches('/') != recorded.trim_end_matches('/') => Err(format!(
                    "this data folder tiers to {recorded}, not {asked}: its metadata points into that bucket \
                     (start without --bucket / bucket, or use a new data folder)"
                )
                .into()),
                _ => Ok(recorded),
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let url = s.bucket_url();
            crate::datadir::write_atomic(&path, format!("{url}\n").as_bytes())?;
            Ok(url)
        }
        Err(e) => Err(e.into()),
    }
}

/// Waits (up to 30 s) until this node has applied what the cluster committed, so that the
/// filesystem opens on the current namespace (a joiner's, or a restarted node's that missed
/// commits). Without a quorum (the whole cluster restarting) it goes on with what it has.
async fn catch_up(meta: &MetaGroup<MetaState>) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        match meta.read_barrier().await {
            Ok(()) => return,
            Err(e) if tokio::time::Instant::now() >= deadline => {
                tracing::warn!(error = %e, "cannot catch up with the cluster; opening with the local state");
                return;
            }
            Err(e) => {
                tracing::info!(error = %e, "catching up with the cluster");
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
        }
    }
}

impl Node {
    /// Open the data folder (initialising it on first use), the device, the block store,
    /// the meta group and the filesystem. With `from` (`up --from URL` and its rehydrate
    /// mode), a new data folder starts from the bucket's `LATEST` manifest.
    /// For the offline commands (`tidepool fs`, the workload): no peers are served, so the
    /// transport listens on a free loopback port whatever `cluster_listen` says, and a join is
    /// refused (a data folder is joined by `tidepool up`).
    pub async fn open(mut settings: Settings) -> Result<Node> {
        if settings.join.is_some() {
            return Err("join a cluster with `tidepool up --join`, not with an offline command".into());
        }
        settings.cluster_listen = Some("127.0.0.1:0".into());
        settings.cluster_advertise = None;
        Self::open_from(settings, None, false).await
    }

    pub async fn open_from(mut settings: Settings, from: Option<(String, String)>, force_from: bool) -> Result<Node> {
        if let Some((url, _)) = &from {
            settings.bucket = Some(url.clone());
        }
        if from.is_some() && settings.join.is_some() {
            return Err("--from and --join do not go together: a cluster comes up from a bucket on its first node, \
                        the others join it"
                .into());
        }
        // The transport is bound (and a joiner's token checked) before the folder is touched.
        let prepared = crate::cluster::prepare(&settings).await?;
        let cluster = prepared.cluster.clone();
        let dev_path = settings.device_path();
        let init_settings = settings.clone();
        let rt = tokio::runtime::Handle::current();
        let identity = prepared.identity.clone();
        let data = tokio::task::block_in_place(|| {
            DataDir::open_as(&settings.data_dir, identity, |dir| {
                std::fs::create_dir_all(dir.join("objects"))?;
                let dev = open_device(&init_settings.device_path(), &device_options(&init_settings))?;
                rt.block_on(BlockStore::format(dev, store_options(&init_settings)))?;
                Ok(())
            })
        })?;
        let mut data = data;
        cluster.folder_opened(&data)?;
        if !dev_path.exists() {
            return Err(format!(
                "NVMe device {} is missing; this node's hot data is gone (refusing to start)",
                dev_path.display()
            )
            .into());
        }
        let dev = open_device(&dev_path, &device_options(&settings))?;
        let engine = dev.info().engine;
        let store = Arc::new(BlockStore::open(dev, store_options(&settings)).await?);
        let raft_opts = RaftOptions {
            node_id: data.superblock.node_id,
            snapshot_log_bytes: settings.snapshot_log_size.0,
            join: prepared.join.is_some(),
            ..RaftOptions::default()
        };
        let meta_dir = data.path.join("meta");
        settings.bucket = Some(bind_bucket(&data.path, &settings)?);
        let backend = crate::bucket::open_backend(&settings).await?;
        crate::bucket::check(&backend).await?;
        let objects = crate::bucket::wrap(&settings, backend);
        let mut marker = crate::spin::read_marker(&data.path)?;
        let mut initial = MetaState::new();
        let mut loaded = None;
        match (&from, &marker) {
            (Some((url, _)), Some(m)) if &m.from != url => {
                return Err(format!(
                    "this data folder was rehydrated from {}, not {url}; use an empty data folder",
                    m.from
                )
                .into());
            }
            (Some((url, mode)), None) => {
                if objects.head(tidepool_tiering::manifest::SPIN_DOWN_KEY).await?.is_some() && !force_from {
                    return Err(format!(
                        "a spin-down to {url} did not finish ({url}/{} is there): finish it with `tidepool spin-down` \
                         on the node that started it, or pass --force to start from the last complete manifest \
                         (objects that spin-down uploaded since are then swept)",
                        tidepool_tiering::manifest::SPIN_DOWN_KEY
                    )
                    .into());
                }
                let epoch = tidepool_tiering::manifest::read_latest(&objects).await?;
                let l = tidepool_tiering::manifest::read_manifest(&objects, epoch).await?;
                println!(
                    "loaded manifest epoch {epoch} from {url}: {} files, {} directories, {} in {} objects",
                    l.root.summary.files,
                    l.root.summary.dirs,
                    crate::settings::human_bytes(l.root.summary.file_bytes),
                    l.root.summary.objects
                );
                initial = l.state.clone();
                loaded = Some((l, epoch, url.clone(), mode.clone()));
            }
            _ => {}
        }
        let net = cluster.raft_net(settings.raft_snapshot_chunk_size.0 as usize);
        let meta = tokio::task::block_in_place(|| MetaGroup::open_with(&meta_dir, raft_opts, initial, Some(net)))?;
        cluster.attach_inbox(meta.inbox());
        // The address book from the recorded members, before anything needs a peer (a
        // restarted node answers the leader and catches up through it).
        cluster.sync_peers(&meta);
        // A joiner joins until its folder records that it did (`joined`, written after the
        // cluster's node key is stored): a join cut short is asked again (the leader answers a
        // repeated join of the same id and address as the first), through --join or a member
        // it already knows.
        let node_id = data.superblock.node_id;
        if node_id != 1 && !data.path.join(crate::cluster::JOINED_FILE).exists() {
            let known = meta.read(|s| {
                s.nodes.iter().find(|(id, n)| **id != node_id && !n.addr.is_empty()).map(|(_, n)| n.addr.clone())
            });
            let Some(seed) = prepared.join.clone().or(known) else {
                return Err(format!(
                    "node {node_id} never finished joining its cluster: start it with --join <a member's cluster address>"
                )
                .into());
            };
            data.node_key = Arc::new(cluster.join(&seed, &data.path).await?);
        }
        if meta.status().voters.len() > 1 || prepared.join.is_some() {
            catch_up(&meta).await;
        }
        if let Some((l, epoch, url, mode)) = loaded {
            // The manifest's state is the meta group's only if the folder held none before.
            let same = meta.read(|s| s.manifest_epoch == l.state.manifest_epoch && s.applied == l.state.applied);
            if !same {
                return Err("--from needs an empty data folder: this one already holds a namespace".into());
            }
            meta.snapshot_now().await?;
            crate::spin::write_heat(&data.path, &l.heat)?;
            let m = crate::spin::Marker { from: url, epoch, mode, done: false };
            crate::spin::write_marker(&data.path, &m)?;
            marker = Some(m);
        }
        // A member of a multi-node cluster keeps unreferenced blocks a while at open (they may
        // be replicas of a write another node has not committed yet). `replicas` defaults to 2:
        // a node alone keeps one copy (placement takes at most one per node).
        let member = meta.status().voters.len() > 1 || prepared.join.is_some();
        let read_cache = settings.read_cache();
        tracing::info!(bytes = read_cache.bytes, "read cache: {read_cache}");
        let fs_opts = FsOptions {
            block_size: settings.block_size.0 as usize,
            replicas: settings.replicas.unwrap_or(2),
            orphan_grace: member.then_some(std::time::Duration::from_secs(300)),
            read_cache_bytes: read_cache.bytes,
            ..FsOptions::default()
        };
        let (fs, report) = Fs::open(meta, store.clone(), Arc::new(SystemClock), fs_opts).await?;
        let fs = Arc::new(fs);
        cluster.serve(&fs, data.node_key.clone());
        let cfg = tier_config(&settings, store.stats().capacity_bytes);
        let tier = Tier::new(&fs, objects, cfg, Arc::new(SystemClock));
        tier.set_manifest_settings(crate::spin::manifest_settings(&settings));
        Ok(Node {
            settings,
            data,
            fs,
            report,
            engine,
            tier,
            tier_task: None,
            rehydrate: marker,
            rehydrate_task: None,
            cluster,
        })
    }

    /// Resume or start rehydration if this namespace came from a manifest and it is not done.
    pub fn start_rehydration(&mut self) {
        if let Some(m) = &self.rehydrate
            && !m.done
            && self.rehydrate_task.is_none()
        {
            self.rehydrate_task =
                Some(crate::spin::spawn_rehydrate(self.tier.clone(), self.data.path.clone(), m.clone()));
        }
    }

    /// Start the background tiering loop (write-back, eviction, GC).
    pub fn start_tiering(&mut self) {
        if self.tier_task.is_none() {
            self.tier_task = Some(self.tier.spawn());
        }
    }

    pub fn data_dir(&self) -> &Path {
        &self.data.path
    }

    /// Flush the block store and stop the meta group. Waits (up to 5 s) for the last users of
    /// the filesystem, such as a response body still being read, to let go of it.
    pub async fn shutdown(self) -> Result<()> {
        self.tier.stop();
        if let Some(task) = self.rehydrate_task {
            task.abort();
            let _ = task.await;
        }
        if let Some(task) = self.tier_task
            && let Err(e) = task.await
        {
            tracing::warn!(error = %e, "tiering task ended badly");
        }
        drop(self.tier);
        let fs = self.fs;
        for _ in 0..100 {
            if Arc::strong_count(&fs) == 1 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        let fs = Arc::try_unwrap(fs).map_err(|_| "fs still in use at shutdown")?;
        fs.shutdown().await?;
        self.cluster.shutdown().await;
        Ok(())
    }
}
