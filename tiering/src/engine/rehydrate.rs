//! Rehydration after `up --from`: cold blocks come back onto NVMe in the background, pinned
//! files first, then the hottest, with bounded parallel ranged GETs. A read of a cold block
//! does not wait in this queue: it reads through at once (and the block then counts as done).
//! Progress adds up exactly: every target block is counted once, fetched or found on NVMe.
//! Resuming after a crash is the same computation: what is tiered and not on NVMe yet.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use futures_util::stream::{self, StreamExt};
use tidepool_cluster::meta::{BlockState, InodeKind, MetaState, ObjectLocator};

use super::evict::subtree_blocks;
use super::{Result, Tier, lock};

/// What to bring back.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum RehydrateMode {
    /// Everything (up to `evict_low` of the device).
    Eager,
    /// Nothing ahead of time: blocks come back as they are read.
    Lazy,
    /// The files below these paths.
    Paths(Vec<String>),
}

impl std::str::FromStr for RehydrateMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "eager" => Ok(RehydrateMode::Eager),
            "lazy" => Ok(RehydrateMode::Lazy),
            _ => match s.strip_prefix("paths=") {
                Some(p) if !p.is_empty() => Ok(RehydrateMode::Paths(p.split(',').map(str::to_string).collect())),
                _ => Err(format!("unknown rehydrate mode {s:?}: eager, lazy or paths=/a,/b")),
            },
        }
    }
}

/// Live counters of the running rehydration.
#[derive(Debug, Default)]
pub struct RehydrateProgress {
    pub active: AtomicBool,
    pub finished: AtomicBool,
    pub files_total: AtomicU64,
    pub files_done: AtomicU64,
    pub bytes_total: AtomicU64,
    pub bytes_done: AtomicU64,
    /// Bytes this process fetched (the rate is computed from these).
    pub bytes_fetched: AtomicU64,
    pub started: std::sync::Mutex<Option<Instant>>,
    pub stopped_reason: std::sync::Mutex<Option<String>>,
    pub mode: std::sync::Mutex<Option<RehydrateMode>>,
}

/// A snapshot of the progress, for `tidepool rehydrate status` and the metrics.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RehydrateStatus {
    pub active: bool,
    pub finished: bool,
    pub mode: Option<RehydrateMode>,
    pub files_total: u64,
    pub files_done: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub percent: f64,
    pub rate_bytes_per_sec: f64,
    pub eta_secs: Option<f64>,
    pub elapsed_secs: f64,
    pub stopped_reason: Option<String>,
}

impl RehydrateProgress {
    pub fn status(&self) -> RehydrateStatus {
        let g = |a: &AtomicU64| a.load(Ordering::SeqCst);
        let elapsed = lock(&self.started).map_or(0.0, |t| t.elapsed().as_secs_f64());
        let (total, done) = (g(&self.bytes_total), g(&self.bytes_done));
        let rate = if elapsed > 0.0 { g(&self.bytes_fetched) as f64 / elapsed } else { 0.0 };
        RehydrateStatus {
            active: self.active.load(Ordering::SeqCst),
            finished: self.finished.load(Ordering::SeqCst),
            mode: lock(&self.mode).clone(),
            files_total: g(&self.files_total),
            files_done: g(&self.files_done),
            bytes_total: total,
            bytes_done: done,
            percent: if total == 0 { 100.0 } else { done as f64 * 100.0 / total as f64 },
            rate_bytes_per_sec: rate,
            eta_secs: (rate > 0.0).then(|| (total - done) as f64 / rate),
            elapsed_secs: elapsed,
            stopped_reason: lock(&self.stopped_reason).clone(),
        }
    }
}

/// Target files in rehydration order with their tiered blocks (each block once overall).
fn targets(s: &MetaState, roots: &[u64], heat: &BTreeMap<u64, u64>) -> Vec<(u64, Vec<(u64, ObjectLocator)>)> {
    let mut files: Vec<u64> = Vec::new();
    let mut seen_files = HashSet::new();
    for root in roots {
        let mut stack = vec![*root];
        while let Some(i) = stack.pop() {
            let Some(inode) = s.inodes.get(&i) else { continue };
            match inode.attr.kind {
                InodeKind::Dir => stack.extend(s.entries.get(&i).into_iter().flat_map(|e| e.values().copied())),
                InodeKind::File if seen_files.insert(i) => files.push(i),
                _ => {}
            }
        }
    }
    let pinned: HashSet<u64> = s.pins.iter().flat_map(|p| subtree_blocks(s, *p)).collect();
    let is_pinned = |ino: &u64| s.inodes[ino].extents.values().any(|e| pinned.contains(&e.block));
    // Pinned first, then hottest first, then in ino order.
    files.sort_by_key(|ino| (!is_pinned(ino), std::cmp::Reverse(heat.get(ino).copied().unwrap_or(0)), *ino));
    let mut seen = HashSet::new();
    files
        .into_iter()
        .map(|ino| {
            let blocks = s.inodes[&ino]
                .extents
                .values()
                .filter_map(|e| match s.blocks.get(&e.block).map(|b| &b.state) {
                    Some(BlockState::Tiered(loc)) if seen.insert(e.block) => Some((e.block, *loc)),
                    _ => None,
                })
                .collect();
            (ino, blocks)
        })
        .collect()
}

impl Tier {
    pub fn rehydrate_progress(&self) -> &Arc<RehydrateProgress> {
        &self.rehydrate
    }

    /// Rehydrates per `mode` until done (or the device reaches `evict_low`). Returns whether
    /// every target block is on NVMe.
    pub async fn rehydrate(&self, mode: RehydrateMode, heat: &BTreeMap<u64, u64>) -> Result<bool> {
        let p = &self.rehydrate;
        *lock(&p.mode) = Some(mode.clone());
        *lock(&p.started) = Some(Instant::now());
        let fs = self.fs()?;
        let roots: Vec<u64> = match &mode {
            RehydrateMode::Eager => vec![tidepool_cluster::meta::ROOT_INO],
            RehydrateMode::Lazy => Vec::new(),
            RehydrateMode::Paths(paths) => {
                let mut r = Vec::new();
                for path in paths {
                    r.push(fs.resolve(path.as_bytes())?.ino);
                }
                r
            }
        };
        let files = fs.meta().read(|s| targets(s, &roots, heat));
        drop(fs);
        let total: u64 = files.iter().flat_map(|(_, b)| b.iter()).map(|(_, l)| u64::from(l.len)).sum();
        p.files_total.store(files.len() as u64, Ordering::SeqCst);
        p.bytes_total.store(total, Ordering::SeqCst);
        p.active.store(true, Ordering::SeqCst);
        let mut remaining: HashMap<u64, usize> = HashMap::new();
        let mut queue = Vec::new();
        for (ino, blocks) in &files {
            if blocks.is_empty() {
                p.files_done.fetch_add(1, Ordering::SeqCst);
            }
            remaining.insert(*ino, blocks.len());
            queue.extend(blocks.iter().map(|(id, loc)| (*ino, *id, *loc)));
        }
        let remaining = std::sync::Mutex::new(remaining);
        let cap = self.store.stats().capacity_bytes;
        let limit = (cap as f64 * self.cfg.evict_low) as u64;
        let full = AtomicBool::new(false);
        let results: Vec<Result<()>> = stream::iter(queue)
            .map(|(ino, id, loc)| {
                let (remaining, full) = (&remaining, &full);
                async move {
                    if self.stopping() || full.load(Ordering::SeqCst) {
                        return Ok(());
                    }
                    if !self.store.contains(id) {
                        if self.store.stats().live_bytes + u64::from(loc.len) > limit {
                            full.store(true, Ordering::SeqCst);
                            return Ok(());
                        }
                        self.fetch_block(id, loc).await.map_err(super::TierEngineError::Fs)?;
                        p.bytes_fetched.fetch_add(u64::from(loc.len), Ordering::SeqCst);
                    }
                    p.bytes_done.fetch_add(u64::from(loc.len), Ordering::SeqCst);
                    let mut r = lock(remaining);
                    if let Some(n) = r.get_mut(&ino) {
                        *n -= 1;
                        if *n == 0 {
                            p.files_done.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                    Ok(())
                }
            })
            .buffer_unordered(self.cfg.rehydrate_parallelism.max(1))
            .collect()
            .await;
        p.active.store(false, Ordering::SeqCst);
        if let Some(e) = results.into_iter().find_map(|r| r.err()) {
            *lock(&p.stopped_reason) = Some(e.to_string());
            return Err(e);
        }
        if full.load(Ordering::SeqCst) {
            *lock(&p.stopped_reason) = Some(format!(
                "the device reached evict_low ({:.0} %): the rest stays cold",
                self.cfg.evict_low * 100.0
            ));
            return Ok(false);
        }
        if self.stopping() {
            return Ok(false);
        }
        p.finished.store(true, Ordering::SeqCst);
        Ok(true)
    }
}
