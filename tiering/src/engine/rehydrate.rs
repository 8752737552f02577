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

/// Bytes of queue one window covers (bounds memory: a window's runs are in flight at once).
const WINDOW_BYTES: u64 = 256 << 20;
/// Blocks of one object closer than this are fetched together (the gap is read and dropped).
const COALESCE_GAP: u64 = 256 << 10;
/// Largest single ranged GET of a run.
const RUN_MAX: u64 = 16 << 20;
/// Blocks of one run written to NVMe at once.
const CACHE_PARALLELISM: usize = 8;

type Target = (u64, u64, ObjectLocator);

/// Consecutive slices of `queue` of about `max` bytes each.
fn windows(queue: &[Target], max: u64) -> Vec<&[Target]> {
    let mut out = Vec::new();
    let (mut start, mut bytes) = (0, 0u64);
    for (i, (_, _, loc)) in queue.iter().enumerate() {
        if bytes > 0 && bytes + u64::from(loc.len) > max {
            out.push(&queue[start..i]);
            (start, bytes) = (i, 0);
        }
        bytes += u64::from(loc.len);
    }
    if start < queue.len() {
        out.push(&queue[start..]);
    }
    out
}

/// Blocks of one object, sorted by offset and cut into runs that one ranged GET covers.
fn coalesce(mut blocks: Vec<Target>) -> Vec<Vec<Target>> {
    blocks.sort_by_key(|(_, _, l)| l.offset);
    let mut runs: Vec<Vec<Target>> = Vec::new();
    for b in blocks {
        let end = b.2.offset + u64::from(b.2.len);
        match runs.last_mut() {
            Some(run)
                if {
                    let start = run[0].2.offset;
                    let last = run[run.len() - 1].2;
                    b.2.offset <= last.offset + u64::from(last.len) + COALESCE_GAP && end - start <= RUN_MAX
                } =>
            {
                run.push(b)
            }
            _ => runs.push(vec![b]),
        }
    }
    runs
}

impl Tier {
    /// One ranged GET over a run of blocks of one object; each block checked and cached.
    async fn fetch_run(&self, key: &str, run: &[Target]) -> Result<()> {
        let start = run[0].2.offset;
        let end = run.iter().map(|(_, _, l)| l.offset + u64::from(l.len)).max().unwrap_or(start);
        let data = match self.objects.get(key, Some(start..end)).await {
            Ok(d) => d,
            // GC moved these blocks meanwhile: fetch them one by one at their new place.
            Err(crate::ObjectError::NotFound(_)) => {
                for (_, id, loc) in run {
                    self.fetch_block(*id, *loc).await.map_err(super::TierEngineError::Fs)?;
                }
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        };
        let block = |loc: &ObjectLocator| {
            let at = (loc.offset - start) as usize;
            &data[at..at + loc.len as usize]
        };
        for (_, id, loc) in run {
            let actual = crc32c::crc32c(block(loc));
            if actual != loc.crc {
                return Err(super::TierEngineError::Fs(
                    tidepool_fs::TierError::Checksum { block: *id, expected: loc.crc, actual }.into(),
                ));
            }
        }
        // The blocks of a run go onto NVMe several at a time (a pack run holds hundreds).
        stream::iter(run).for_each_concurrent(CACHE_PARALLELISM, |(_, id, loc)| self.cache(*id, block(loc))).await;
        let n: u64 = run.iter().map(|(_, _, l)| u64::from(l.len)).sum();
        self.rehydrate.bytes_fetched.fetch_add(n, Ordering::SeqCst);
        super::TierCounters::add(&self.counters.read_through_bytes, n);
        Ok(())
    }

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
        let keys: HashMap<u128, String> =
            self.fs()?.meta().read(|s| queue.iter().map(|(_, _, loc)| (loc.object, self.key_of(s, loc))).collect());
        let remaining = std::sync::Mutex::new(remaining);
        let done = |ino: u64, len: u32| {
            p.bytes_done.fetch_add(u64::from(len), Ordering::SeqCst);
            let mut r = lock(&remaining);
            if let Some(n) = r.get_mut(&ino) {
                *n -= 1;
                if *n == 0 {
                    p.files_done.fetch_add(1, Ordering::SeqCst);
                }
            }
        };
        let cap = self.store.stats().capacity_bytes;
        let limit = (cap as f64 * self.cfg.evict_low) as u64;
        let full = AtomicBool::new(false);
        let first_err = std::sync::Mutex::new(None);
        // Bytes of runs planned and not yet on NVMe: a window is planned while the previous
        // one's last runs are still in flight, and the evict_low check must count them.
        let pending = AtomicU64::new(0);
        // Windows of the queue, in its order (pinned, then hottest); inside a window, the
        // blocks of one object that lie close together are fetched with ONE ranged GET (a
        // pack of small files comes back in a request or two, not one per file). The next
        // window is planned as soon as every run of this one has started, so
        // `rehydrate_parallelism` GETs stay in flight across window boundaries (no barrier).
        let plan = |window: &[Target]| -> Vec<Vec<Target>> {
            if self.stopping() || full.load(Ordering::SeqCst) || lock(&first_err).is_some() {
                return Vec::new();
            }
            let mut runs: BTreeMap<u128, Vec<Target>> = BTreeMap::new();
            for &(ino, id, loc) in window {
                if self.store.contains(id) {
                    done(ino, loc.len);
                } else {
                    runs.entry(loc.object).or_default().push((ino, id, loc));
                }
            }
            let runs: Vec<Vec<Target>> = runs.into_values().flat_map(coalesce).collect();
            let need: u64 = runs.iter().flatten().map(|(_, _, l)| u64::from(l.len)).sum();
            if self.store.stats().live_bytes + pending.load(Ordering::SeqCst) + need > limit {
                full.store(true, Ordering::SeqCst);
                return Vec::new();
            }
            pending.fetch_add(need, Ordering::SeqCst);
            runs
        };
        stream::iter(windows(&queue, WINDOW_BYTES))
            .flat_map(|window| stream::iter(plan(window)))
            .for_each_concurrent(self.cfg.rehydrate_parallelism.max(1), |run| {
                let key = &keys[&run[0].2.object];
                let (done, pending, first_err) = (&done, &pending, &first_err);
                async move {
                    let res = self.fetch_run(key, &run).await;
                    pending.fetch_sub(run.iter().map(|(_, _, l)| u64::from(l.len)).sum(), Ordering::SeqCst);
                    match res {
                        Ok(()) => run.iter().for_each(|(ino, _, loc)| done(*ino, loc.len)),
                        // The runs in flight finish; no new window is planned.
                        Err(e) => {
                            lock(first_err).get_or_insert(e);
                        }
                    }
                }
            })
            .await;
        let (full, first_err) = (full.into_inner(), first_err.into_inner().unwrap_or_else(|e| e.into_inner()));
        p.active.store(false, Ordering::SeqCst);
        if let Some(e) = first_err {
            *lock(&p.stopped_reason) = Some(e.to_string());
            return Err(e);
        }
        if full {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn t(object: u128, offset: u64, len: u32) -> Target {
        (1, offset, ObjectLocator { object, offset, len, crc: 0 })
    }

    #[test]
    fn close_blocks_of_one_object_share_a_get() {
        // Back to back, a small gap, a large gap, and a run that would pass RUN_MAX.
        let runs = coalesce(vec![t(1, 4096, 100), t(1, 0, 4096), t(1, 5000, 10), t(1, 10 << 20, 10)]);
        let shape: Vec<Vec<u64>> = runs.iter().map(|r| r.iter().map(|b| b.2.offset).collect()).collect();
        assert_eq!(shape, vec![vec![0, 4096, 5000], vec![10 << 20]]);
        let big: Vec<Target> = (0..8).map(|i| t(2, i * (4 << 20), 4 << 20)).collect();
        assert_eq!(coalesce(big).iter().map(Vec::len).collect::<Vec<_>>(), vec![4, 4]);
    }

    #[test]
    fn windows_cover_the_queue_in_order() {
        let q: Vec<Target> = (0..10).map(|i| t(1, i * 100, 100)).collect();
        let w = windows(&q, 350);
        assert_eq!(w.iter().map(|w| w.len()).collect::<Vec<_>>(), vec![3, 3, 3, 1]);
        assert!(windows(&[], 10).is_empty());
    }
}
